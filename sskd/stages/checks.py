"""Checks a stage runs before it trains anything, each failing with the setting and the fix."""

from __future__ import annotations

from typing import Sequence

from sskd.config import Config, ConfigError, ModelConfig
from sskd.models.base import Segmenter

#: per family: the settings that hold a teacher's pretrained weights, with a local example
_WEIGHT_SETTINGS = {
    "grounded_sam": (("options.detector_weights", "weights/mm_grounding_dino_large_all"),
                     ("options.sam_weights", "weights/sam2.1-hiera-large")),
}
_DEFAULT_WEIGHT_SETTINGS = (("weights", "weights/<your pretrained checkpoint dir>"),)


def missing_teacher_weights(mc: ModelConfig) -> list[tuple[str, str]]:
    """``[(setting, example value)]`` of the teacher's weight settings that are empty."""
    out = []
    for setting, example in _WEIGHT_SETTINGS.get(mc.name, _DEFAULT_WEIGHT_SETTINGS):
        value = mc.options.get(setting.split(".", 1)[1], "") if setting.startswith("options.") \
            else getattr(mc, setting)
        if not value:
            out.append((f"teacher.{setting}", example))
    return out


def check_teacher_weights(cfg: Config) -> None:
    """Stop a run on real data whose teacher would start from random weights.

    On the synthetic benchmark a kit-pretrained stand-in is the teacher (no weights needed). On
    any other data, a teacher without pretrained weights is a random network whose "zero-shot"
    pseudo-labels are noise; that is allowed only with ``teacher.allow_random_init: true``.
    Raises :class:`~sskd.config.ConfigError` naming each empty setting and the fix.
    """
    if cfg.data.kind == "synthetic" or cfg.teacher.allow_random_init:
        return
    missing = missing_teacher_weights(cfg.teacher)
    if not missing:
        return
    names = " and ".join(s for s, _ in missing)
    examples = ", ".join(f"{s}: {e}" for s, e in missing)
    raise ConfigError(
        f"{names} {'is' if len(missing) == 1 else 'are'} empty: the {cfg.teacher.name} teacher "
        f"would start from random weights on your {cfg.data.kind} data, and its 'zero-shot' "
        f"pseudo-labels would be noise. Fix: download the pretrained weights and set {examples} "
        "(README, 'Your own data'; sskd/presets/coco_custom.yaml), or set "
        "teacher.allow_random_init: true to run with a randomly initialised teacher anyway.")


def trainable_parts(model: Segmenter, selection: Sequence[str]) -> tuple[str, ...]:
    """``model.resolve_trainable(selection)``; an unknown part is a :class:`ConfigError` that
    names the ``teacher.trainable`` / ``student.trainable`` setting."""
    try:
        return model.resolve_trainable(list(selection))
    except ValueError as e:
        raise ConfigError(f"teacher.trainable / student.trainable: {e}") from e
