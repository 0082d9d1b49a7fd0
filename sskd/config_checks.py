"""Range and choice checks of a whole config, run whenever a config is loaded or read.

:func:`problems` lists every bad value as ``"<key> = <value>: must be <allowed>"``; the caller
(:func:`sskd.config.validate`) raises one :class:`~sskd.config.ConfigError` with all of them, so
a typo is reported when the config is loaded, not when the stage that uses it runs hours later.
Each ablation's overrides are checked as the full config they produce, with keys reported as
``ablations.<name>.<key>``.

Nothing here imports torch: model names and sizes come from :data:`MODEL_SIZES` (pure Python)
plus whatever is registered already in this process (see :func:`known_models`).
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DATA_KINDS = ("synthetic", "coco", "cityscapes", "ade20k")
SAMPLERS = ("fused", "uniform", "mask_only", "class_only")
CANDIDATES = ("batch", "other_images")
# pseudo_label.class_prior: none (the teacher's first choice), labeled (D_l's class
# frequencies), uniform (every class equally often); sskd.engine.class_alignment
CLASS_PRIORS = ("none", "labeled", "uniform")
#: pseudo_label.mask_refine: none (the teacher's masks) or guided (guided-filter refinement)
MASK_REFINERS = ("none", "guided")
# Training configs whose ``steps: 0`` means "off" (no pretraining); every stage needs >= 1 step
# (a stage is switched off with ``enabled: false``, not with 0 steps that save an untrained model).
OPTIONAL_TRAININGS = ("teacher_pretrain", "student_pretrain")
STAGES = ("adapt_1a", "adapt_1b", "transfer", "refine", "teacher_supervised", "student_supervised")
FIELD_PREFIXES = ("pl_", "pred_")  # FiftyOne label fields: pseudo-labels / predictions


def mask2former_sizes():
    """:mod:`sskd.models.sizes` (pure Python), loaded from its file: importing it as
    ``sskd.models.sizes`` would first run ``sskd/models/__init__.py``, which imports torch."""
    mod = sys.modules.get("sskd.models.sizes") or sys.modules.get("sskd._mask2former_sizes")
    if mod is None:
        spec = importlib.util.spec_from_file_location(
            "sskd._mask2former_sizes", Path(__file__).parent / "models" / "sizes.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[spec.name] = mod
    return mod


def _mask2former_sizes() -> list[str]:
    return mask2former_sizes().list_sizes()


# Model family -> its size names. Kept here (not read from the model modules, which import torch,
# transformers or detectron2); tests/test_config.py checks they match the modules.
MODEL_SIZES: dict[str, Callable[[], list[str]]] = {
    "mask2former": _mask2former_sizes,
    "grounded_sam": lambda: ["tiny", "paper"],
    "detectron2": lambda: ["tiny", "demo", "full"],
}


def known_models() -> list[str]:
    """The shipped model families plus any model registered in this process so far."""
    names = set(MODEL_SIZES)
    base = sys.modules.get("sskd.models.base")   # only when already imported (it imports torch)
    if base is not None:
        names.update(base.list_models())
    return sorted(names)


class _Checker:
    """Collects ``key = value: must be ...`` lines; ``prefix`` is prepended to every key."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.errors = prefix, []

    def need(self, ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            self.errors.append(f"{self.prefix}{key} = {value!r}: must be {allowed}")

    def at_least(self, key: str, value: float, lo: float, hint: str = "") -> None:
        self.need(_finite(value) and value >= lo, key, value, f">= {lo}{hint}")

    def positive(self, key: str, value: float) -> None:
        self.need(_finite(value) and value > 0, key, value, "> 0")

    def unit(self, key: str, value: float) -> None:
        self.need(_finite(value) and 0 <= value <= 1, key, value, "in [0, 1]")

    def choice(self, key: str, value: Any, choices) -> None:
        self.need(value in choices, key, value, "one of " + " | ".join(map(str, choices)))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value) and not math.isinf(value)


def _train(c: _Checker, key: str, tc, min_steps: int, hint: str = "") -> None:
    c.at_least(f"{key}.steps", tc.steps, min_steps, hint)
    c.at_least(f"{key}.batch_size", tc.batch_size, 1)
    c.unit(f"{key}.unlabeled_ratio", tc.unlabeled_ratio)
    c.positive(f"{key}.lr", tc.lr)
    c.at_least(f"{key}.weight_decay", tc.weight_decay, 0)
    c.at_least(f"{key}.backbone_lr_mult", tc.backbone_lr_mult, 0)
    c.at_least(f"{key}.poly_power", tc.poly_power, 0)
    c.at_least(f"{key}.warmup_steps", tc.warmup_steps, 0)
    c.at_least(f"{key}.grad_clip", tc.grad_clip, 0, " (0 = off)")
    c.at_least(f"{key}.checkpoint_every", tc.checkpoint_every, 1)
    c.at_least(f"{key}.log_every", tc.log_every, 1)
    c.at_least(f"{key}.seed", tc.seed, 0)
    c.need(_finite(tc.ema_decay) and 0 <= tc.ema_decay < 1, f"{key}.ema_decay", tc.ema_decay,
           "in [0, 1) (0 = off; 0.99-0.999 average over ~100-1000 steps)")


def _model(c: _Checker, key: str, mc) -> None:
    c.need(bool(mc.trainable) and all(isinstance(x, str) and x for x in mc.trainable),
           f"{key}.trainable", mc.trainable,
           "a non-empty list of part names, 'default' or 'all' (docs/method.md, 'What trains')")
    models = known_models()
    c.choice(f"{key}.name", mc.name, models)
    if mc.name in MODEL_SIZES:
        c.choice(f"{key}.size", mc.size, MODEL_SIZES[mc.name]())
    if mc.name == "mask2former":
        bad = sorted(set(mc.options) - set(mask2former_sizes().DEFAULTS))
        c.need(not bad, f"{key}.options", mc.options,
               f"keys of sskd.models.sizes.DEFAULTS (unknown: {bad})")


def _thresholds(c: _Checker, key: str, t) -> None:
    c.unit(f"{key}.score_threshold", t.score_threshold)
    c.unit(f"{key}.mask_threshold", t.mask_threshold)
    c.at_least(f"{key}.max_instances", t.max_instances, 1)


def _synthetic(c: _Checker, s) -> None:
    from sskd.config import ConfigError
    from sskd.data.synthetic import (BACKGROUNDS, PALETTES, corpus_domains,  # numpy + PIL only
                                     validate_domain)
    for key in ("n_source", "n_train", "n_val"):
        c.at_least(f"data.synthetic.{key}", getattr(s, key), 1)
    c.at_least("data.synthetic.seed", s.seed, 0)
    for key in ("source", "target"):
        try:
            validate_domain(getattr(s, key), s.classes, s.image_size,
                            where=f"{c.prefix}data.synthetic.{key}")
        except ConfigError as e:
            c.errors.append(str(e).removeprefix("config key "))
    for key, names in (("corpus_backgrounds", BACKGROUNDS), ("corpus_palettes", PALETTES)):
        values = getattr(s, key)
        c.need(all(v in names for v in values), f"data.synthetic.{key}", values,
               "a list of " + " | ".join(names))
    try:
        corpus_domains(s)          # both lists or neither, and not only the target's pair
    except ConfigError as e:
        c.errors.append(f"{c.prefix}{str(e).removeprefix('config keys ')}")


def _geometry(c: _Checker, d) -> None:
    """The input geometry keys (:class:`sskd.engine.data.InputGeometry`)."""
    c.need(not d.train_crop or (len(d.train_crop) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in d.train_crop)),
        "data.train_crop", d.train_crop, "[h, w] in px (positive ints) or []")
    c.need(len(d.scale_range) == 2 and all(_finite(v) for v in d.scale_range)
           and 0 < d.scale_range[0] <= d.scale_range[1], "data.scale_range", d.scale_range,
           "[lo, hi] with 0 < lo <= hi")
    for key in ("test_short_side", "num_workers", "cache_mb"):
        c.at_least(f"data.{key}", getattr(d, key), 0)


def problems(cfg, prefix: str = "") -> list[str]:
    """Every out-of-range or unknown value of ``cfg`` (its ablations included), one line each."""
    c = _Checker(prefix)
    c.at_least("seed", cfg.seed, 0)
    c.need(bool(DEVICE.match(cfg.device)), "device", cfg.device, "auto | cpu | cuda | cuda:N")
    c.at_least("workers", cfg.workers, 1, " (1 = no side process)")
    d = cfg.data
    c.choice("data.kind", d.kind, DATA_KINDS)
    c.need(_finite(d.labeled_fraction) and 0 < d.labeled_fraction <= 1, "data.labeled_fraction",
           d.labeled_fraction, "in (0, 1]")
    c.at_least("data.split_seed", d.split_seed, 0)
    c.at_least("data.max_val", d.max_val, 0, " (0 = all)")
    c.at_least("data.input_size", d.input_size, 1)
    _geometry(c, d)
    _synthetic(c, d.synthetic)
    _model(c, "teacher", cfg.teacher)
    _model(c, "student", cfg.student)
    _thresholds(c, "pseudo_label", cfg.pseudo_label)
    c.choice("pseudo_label.class_prior", cfg.pseudo_label.class_prior, CLASS_PRIORS)
    c.choice("pseudo_label.mask_refine", cfg.pseudo_label.mask_refine, MASK_REFINERS)
    c.at_least("pseudo_label.refine_radius", cfg.pseudo_label.refine_radius, 1, " (pixels)")
    c.positive("pseudo_label.refine_eps", cfg.pseudo_label.refine_eps)
    if cfg.pseudo_label.class_prior != "none":
        c.need(cfg.teacher.name != "grounded_sam", "pseudo_label.class_prior",
               cfg.pseudo_label.class_prior, "none with teacher.name grounded_sam (its "
               "pseudo-labels carry no class distribution to align)")
    _thresholds(c, "evaluation", cfg.evaluation)
    c.at_least("evaluation.seed_noise_ap", cfg.evaluation.seed_noise_ap, 0)
    pc = cfg.pixel_contrast
    c.positive("pixel_contrast.temperature", pc.temperature)
    c.at_least("pixel_contrast.temperature_start", pc.temperature_start, 0, " (0 = no annealing)")
    c.at_least("pixel_contrast.num_anchors", pc.num_anchors, 1)
    c.at_least("pixel_contrast.num_negatives", pc.num_negatives, 1)
    c.at_least("pixel_contrast.embed_dim", pc.embed_dim, 1)
    c.choice("pixel_contrast.sampler", pc.sampler, SAMPLERS)
    c.choice("pixel_contrast.candidates", pc.candidates, CANDIDATES)
    for name in OPTIONAL_TRAININGS:
        _train(c, f"stages.{name}", getattr(cfg.stages, name), 0, " (0 = no pretraining)")
    for name in STAGES:
        sc = getattr(cfg.stages, name)
        c.at_least(f"stages.{name}.l_semi", sc.l_semi, 0)
        c.at_least(f"stages.{name}.l_pxl", sc.l_pxl, 0)
        _train(c, f"stages.{name}.train", sc.train, 1,
               f" (to skip the stage set stages.{name}.enabled: false)")
        if sc.soft_classes:  # the teacher's class distributions as L_semi targets
            c.need(sc.l_semi > 0, f"stages.{name}.soft_classes", True,
                   f"false where stages.{name}.l_semi is 0 (no pseudo-labels to take them from)")
            c.need(cfg.teacher.name != "grounded_sam", f"stages.{name}.soft_classes", True,
                   "false with teacher.name grounded_sam (its pseudo-labels carry no class "
                   "distribution: a box score per class name, not probabilities over the classes)")
    bad_fields = [f for f in cfg.inspect.view_fields
                  if not (isinstance(f, str) and f.startswith(FIELD_PREFIXES))]
    c.need(not bad_fields, "inspect.view_fields", cfg.inspect.view_fields,
           "a list of pl_<tag> / pred_<tag> field names")
    if not c.errors:   # an ablation is the parent plus its overrides: check the parent first
        c.errors += ablation_problems(cfg, prefix)
    return c.errors


def ablation_problems(cfg, prefix: str = "") -> list[str]:
    """Each ablation's overrides applied to ``cfg``, checked as a full config."""
    from sskd.config import Config, ConfigError, _from_dict, merge_dicts, nest_keys, to_dict
    errors = []
    base = to_dict(cfg)
    base["ablations"] = {}
    for name, overrides in cfg.ablations.items():
        where = f"{prefix}ablations.{name}"
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.-]+$", name):
            errors.append(f"{where}: the name must be letters, digits, '_', '-' or '.' "
                          "(it becomes a directory name)")
            continue
        if not isinstance(overrides, dict):
            errors.append(f"{where} = {overrides!r}: must be a mapping of config overrides, "
                          "e.g. {pixel_contrast: {sampler: uniform}}")
            continue
        nested = nest_keys(overrides)
        if "ablations" in nested:
            errors.append(f"{where}.ablations: an ablation cannot define ablations of its own")
            continue
        try:
            child = _from_dict(Config, merge_dicts(base, nested), f"{where}.")
        except ConfigError as e:
            errors.append(str(e))
            continue
        errors += problems(child, f"{where}.")
    return errors
