"""The config tree, preset loading and YAML round-trip.

Every key carries a one-line comment on its meaning and units. A run is configured by a preset
(``sskd/presets/<name>.yaml``, only the keys that differ from these defaults), then optional
overrides given as dotted keys (``train.lr=1e-3`` style, values parsed as YAML).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


# --------------------------------------------------------------------------- tree


@dataclass
class SyntheticDomainConfig:
    """Appearance of one synthetic domain (see :mod:`sskd.data.synthetic`)."""

    background: str = "flat"          # "flat" | "gradient" | "stripes" | "noise" | "clutter"
    clutter: int = 0                  # number of distractor blobs (not instances) per image
    palette: str = "primary"          # colour palette name: "primary" | "pastel" | "dark" | "muted"
    scale_min: float = 0.15           # smallest object side as a fraction of the image side
    scale_max: float = 0.45           # largest object side as a fraction of the image side
    noise_std: float = 0.0            # std of additive Gaussian pixel noise, in 0..255 units
    occlusion: float = 0.3            # probability an object is placed overlapping an earlier one
    min_objects: int = 1              # fewest instances per image
    max_objects: int = 4              # most instances per image
    aspect_min: float = 0.5           # smallest short/long side ratio of rectangles and triangles
    color_jitter: float = 0.0         # per-instance uniform RGB jitter of palette colours, 0..255 units
    min_visible_fraction: float = 0.25  # drop an instance whose visible part is below this share of it
    min_visible_pixels: int = 12      # drop an instance with fewer visible pixels than this
    # Unlabelled look-alikes: objects of these shapes (not among the classes), painted in object
    # colours before the instances and never annotated, as a target dataset's label convention
    # may leave out things a foundation model detects
    distractor_shapes: list = field(default_factory=list)
    distractors: int = 0              # such unlabelled objects per image
    # Fill of the instances: "flat" (one colour) or "stripes" (the instance colour alternating
    # with a darker shade of it, random period and angle per instance). Set on the target only,
    # it is a style a flat-filled corpus shows only as a background: a real gap for the stand-in
    object_texture: str = "flat"


@dataclass
class SyntheticConfig:
    """The synthetic domain-shift benchmark used by the offline default."""

    image_size: int = 64              # side of the square images, in pixels
    classes: list[str] = field(default_factory=lambda: ["circle", "rectangle", "triangle"])
    n_source: int = 600               # images of the pretraining corpus (all its domains together)
    n_train: int = 400                # target-domain training images (split labeled/unlabeled)
    n_val: int = 100                  # target-domain validation images
    seed: int = 0                     # generator seed; same seed -> identical images and json
    # The corpus the stand-ins are pretrained on ("source"). With corpus_backgrounds and
    # corpus_palettes set it is a broad "foundation corpus": one domain per (background, palette)
    # pair, each a copy of ``source`` with that background and palette, the target's own pair held
    # out, image i drawn from domain i mod #domains; [] and [] = the single ``source`` domain.
    corpus_backgrounds: list = field(default_factory=list)  # backgrounds crossed into the corpus
    corpus_palettes: list = field(default_factory=list)     # palettes crossed into the corpus
    source: SyntheticDomainConfig = field(default_factory=SyntheticDomainConfig)  # corpus domain template
    target: SyntheticDomainConfig = field(default_factory=lambda: SyntheticDomainConfig(
        background="clutter", clutter=3, palette="muted", scale_min=0.12, scale_max=0.4,
        noise_std=8.0, occlusion=0.4, aspect_min=0.35, color_jitter=12.0))


@dataclass
class DataConfig:
    """Where the images come from and how the train set is split."""

    kind: str = "synthetic"           # "synthetic" | "coco" | "cityscapes" | "ade20k"
    root: str = "data/synthetic"      # data dir: generated into (synthetic) or read from
    train_json: str = ""              # coco/ade20k: train annotation json (relative to root ok)
    train_images: str = ""            # coco/ade20k: train image dir
    val_json: str = ""                # coco/ade20k: val annotation json
    val_images: str = ""              # coco/ade20k: val image dir
    unlabeled_dir: str = ""           # optional extra unlabeled image folder (recursive)
    labeled_fraction: float = 0.1     # share of the train set kept labeled (0 < f <= 1)
    split_seed: int = 0               # seed of the labeled/unlabeled split
    max_val: int = 0                  # evaluate on at most this many val images (0 = all)
    input_size: int = 64              # square mode: images are resized to this side for the models
    # > 0: keep the aspect ratio: the short side is scaled to this many px for prediction (padded
    # to the patch multiple, predictions mapped back to the original size) and as the training
    # base size; 0: square input_size x input_size
    test_short_side: int = 0
    train_crop: list = field(default_factory=list)  # [h, w] training crop in px (patch multiples); [] = input_size square
    scale_range: list = field(default_factory=lambda: [0.75, 1.25])  # random training scale relative to the base size
    num_workers: int = 0              # loader processes building training batches (0 = in the training process)
    cache_mb: float = 2048.0          # bound of the decoded-image LRU cache in MB, split over the loader's processes
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """A segmenter built from the registry in :mod:`sskd.models`."""

    name: str = "mask2former"         # registry name (see ``sskd.models.list_models()``)
    size: str = "tiny"                # size preset of that model ("tiny", "demo", "paper", ...)
    weights: str = ""                 # local dir (or hub id when online) of pretrained weights
    # Parts trained in every stage of this role: "default" (the family's documented choice),
    # "all", or part names, combinable (e.g. [default, image_encoder]); docs/method.md, "What trains"
    trainable: list = field(default_factory=lambda: ["default"])
    # teacher only: on non-synthetic data, run even though the teacher has no pretrained weights
    # (its "zero-shot" pseudo-labels are then noise); see sskd.stages.checks
    allow_random_init: bool = False
    options: dict = field(default_factory=dict)  # extra builder keyword arguments


@dataclass
class TrainConfig:
    """One training run (a stage or a baseline)."""

    steps: int = 200                  # optimizer steps
    batch_size: int = 8               # images per step (labeled + unlabeled)
    unlabeled_ratio: float = 0.5      # share of each batch drawn from pseudo-labeled D_u
    lr: float = 1e-3                  # AdamW peak learning rate
    weight_decay: float = 0.05        # AdamW weight decay
    backbone_lr_mult: float = 0.1     # learning-rate multiplier of the encoder parameters
    poly_power: float = 0.9           # poly schedule lr * (1 - step/steps) ** power
    warmup_steps: int = 0             # linear warm-up steps
    grad_clip: float = 1.0            # max global gradient norm (0 = off)
    amp: bool = True                  # mixed precision on CUDA (ignored on CPU)
    checkpoint_every: int = 100       # steps between checkpoints (resume granularity)
    log_every: int = 10               # steps between metric log lines
    seed: int = 0                     # seed of batch sampling, augmentation and loss points (combined with the run's ``seed``)
    # Polyak/EMA weight averaging: >0 keeps an exponential moving average of the weights
    # (decay warmed up as min(ema_decay, (1 + t) / (10 + t))) and saves it instead of the last
    # step's weights; 0 = the last step's weights (docs/method.md, 'Weight averaging')
    ema_decay: float = field(default=0.0, metadata={"fingerprint_omit": 0.0})


@dataclass
class PixelContrastConfig:
    """The instance-aware pixel-wise contrastive loss L_pxl (docs/method.md)."""

    temperature: float = 0.07         # NT-Xent temperature T (final value when annealed)
    temperature_start: float = 0.0    # >0: anneal linearly from this to ``temperature``
    num_anchors: int = 256            # anchor pixels subsampled per image
    num_negatives: int = 200          # R negatives per anchor, drawn without replacement
    sampler: str = "fused"            # "fused" | "uniform" | "mask_only" | "class_only"
    # Where negatives come from: "batch" (every other pixel of the batch, the anchor's own image
    # included) or "other_images" (the authors' implementation). With "other_images" no negative can
    # lie in the anchor's instance, so FNR is 0 by construction and the debiasing only acts
    # across images; "batch" is the setting where instance-aware sampling matters.
    candidates: str = "batch"
    embed_dim: int = 128              # projection-head output dimension


@dataclass
class PseudoLabelConfig:
    """How teacher outputs become hard pseudo-labels."""

    score_threshold: float = 0.3      # keep instances with score >= this
    max_instances: int = 100          # keep at most this many per image (highest score)
    mask_threshold: float = 0.5       # binarise mask probabilities at this value
    # Distribution alignment of the pseudo-labels' classes (a deviation: docs/method.md, 'Class
    # prior alignment'). none: the teacher's first choice (the paper); labeled: rename each
    # instance after argmax p(c) * prior(c) / mean p(c), prior = D_l's class frequencies;
    # uniform: the same with every class equally likely. Renames only (masks, scores and which
    # instances are kept stay the teacher's); needs a teacher with class probabilities
    class_prior: str = field(default="none", metadata={"fingerprint_omit": "none"})
    # Edge-aware refinement of the pseudo-labels' masks before binarisation (a deviation:
    # docs/method.md, 'Mask refinement'). none: the teacher's own masks (the paper); guided: each
    # mask probability re-fitted to the image's colour edges by a guided filter of this radius
    # (px at the model's input size) and eps (colour variance below it is not an edge).
    # Pseudo-labels only: evaluation always scores the model's own masks
    mask_refine: str = field(default="none", metadata={"fingerprint_omit": "none"})
    refine_radius: int = field(default=4, metadata={"fingerprint_omit": 4})
    refine_eps: float = field(default=1e-3, metadata={"fingerprint_omit": 1e-3})


@dataclass
class EvaluationConfig:
    """Which predictions are scored by mask AP (COCO keeps low-confidence ones: AP rewards recall)."""

    score_threshold: float = 0.0      # keep predictions with score >= this
    max_instances: int = 100          # COCO's maxDets: at most this many per image
    mask_threshold: float = 0.5       # binarise mask probabilities at this value
    # COCO instance protocol (Mask2Former's): masks of the kept (query, class) pairs may overlap.
    # false: each pixel to one instance, as pseudo-labels (lowers AP: a query's second class
    # hypothesis and lower-scored duplicates are dropped instead of ranked)
    overlapping_masks: bool = True
    # AP difference below which the report calls a claim WITHIN NOISE: one short CPU run's
    # seed-to-seed spread (docs/method.md, 'Training on a CPU': 3-4 AP); measure yours with
    # benchmarks/seed_noise.py
    seed_noise_ap: float = 3.5


@dataclass
class StageConfig:
    """One stage of the pipeline: on/off, its loss weights and its training schedule."""

    enabled: bool = True              # False skips the stage (ablation)
    l_semi: float = 0.0               # weight of L_semi (pseudo-labels on D_u)
    l_pxl: float = 0.0                # weight of L_pxl
    train: TrainConfig = field(default_factory=TrainConfig)
    # L_semi's class target. false: the teacher's first choice (the paper's hard pseudo-label);
    # true: the teacher's class distribution p(c | object) for that mask (a deviation:
    # docs/method.md, 'Soft class targets'); masks and matching stay hard. Needs a teacher that
    # gives class probabilities (the Mask2Former family; grounded_sam gives none)
    soft_classes: bool = field(default=False, metadata={"fingerprint_omit": False})  # soft L_semi classes


def _stage(l_semi: float, l_pxl: float, enabled: bool = True) -> Any:
    return field(default_factory=lambda: StageConfig(enabled=enabled, l_semi=l_semi, l_pxl=l_pxl))


@dataclass
class StagesConfig:
    """The three stages of the method (docs/method.md) plus the supervised-only baselines."""

    teacher_pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000))  # stand-in teacher on the corpus (``data.synthetic.source``/``corpus_*``); seed-independent
    # Stand-in for the student's foundation backbone (DINOv2-S in the paper): with steps > 0 and
    # the synthetic benchmark, a student is pretrained on the corpus (cached like the stand-in
    # teacher, seed-independent) and every student stage starts from its *encoder* (neck,
    # decoder and heads from the run's seed); 0 = random init / student.weights.
    student_pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(steps=0))
    adapt_1a: StageConfig = _stage(0.0, 0.1)        # teacher on D_l with L_pxl
    adapt_1b: StageConfig = _stage(1.0, 0.1)        # teacher re-init, D_l + pseudo D_u + L_pxl
    transfer: StageConfig = _stage(1.0, 0.1)        # student on D_l + teacher pseudo D_u + L_pxl
    refine: StageConfig = _stage(0.0, 0.0)          # student on D_l only
    teacher_supervised: StageConfig = _stage(0.0, 0.0)  # baseline: teacher fine-tuned on D_l
    student_supervised: StageConfig = _stage(0.0, 0.0)  # baseline: student trained on D_l


@dataclass
class InspectConfig:
    """The run's FiftyOne dataset (notebook 04, ``sskd app``; see :mod:`sskd.inspect.run`)."""

    # pl_/pred_ fields that get a FiftyOne evaluation and bias views ([] = every field). Every
    # field is exported either way; evaluating one costs ~3-12 s on the demo's 600 images.
    view_fields: list = field(default_factory=list)
    mistakenness: bool = True         # FiftyOne Brain mistakenness of pseudo-labels (~15 s per field on the demo)


@dataclass
class Config:
    """The whole run."""

    run_name: str = "default"         # run dir is ``<runs_root>/<run_name>``
    runs_root: str = "runs"           # parent of all run dirs
    preset: str = ""                  # preset this config came from (informational)
    seed: int = 0                     # global seed: model init, and every stage's sampling together with its train.seed
    device: str = "auto"              # "auto" (cuda if available) | "cpu" | "cuda" | "cuda:N"
    cache_dir: str = ""               # stand-in teacher cache ("" = ~/.cache/sskd)
    # 2: on a CPU with >= 2 cores, independent trainings (stand-in student, supervised baselines,
    # ablations) run in a second process beside the stage's own, one core each (a second thread
    # speeds a small model up by 0-16%, a second job by ~2x); 1: everything in order
    workers: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(name="mask2former", size="teacher_demo"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(name="mask2former", size="student_demo"))
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    pixel_contrast: PixelContrastConfig = field(default_factory=PixelContrastConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    ablations: dict = field(default_factory=dict)  # name -> overrides dict, each a separate run
    inspect: InspectConfig = field(default_factory=InspectConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.run_name


# --------------------------------------------------------------------------- dict <-> tree


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def fingerprint_dict(cfg: Any) -> dict:
    """:func:`to_dict` for stage fingerprints: a key added after run dirs existed, declared with
    ``metadata={"fingerprint_omit": v}`` where ``v`` is the value that does what the code did
    before the key, is left out while it equals ``v``. Upgrading sskd then retrains nothing
    whose behaviour did not change, and setting the key retrains what it feeds."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if "fingerprint_omit" in f.metadata and value == f.metadata["fingerprint_omit"]:
            continue
        out[f.name] = fingerprint_dict(value) if dataclasses.is_dataclass(value) \
            else copy.deepcopy(value)
    return out


def _legacy_model_keys(data: Mapping, path: str) -> dict:
    """``freeze_encoder`` (replaced by ``trainable``): false, the old default found in every
    saved config, is dropped; true is an error that says what to write instead."""
    data = dict(data)
    if data.pop("freeze_encoder", False):
        raise ConfigError(
            f"config key {path}freeze_encoder was replaced by {path}trainable, the list of parts "
            f"that train: for mask2former write {path}trainable: [neck, pixel_decoder, decoder, "
            "class_head, projection_head] (all but the encoder); see docs/method.md, "
            "'What trains', for every family's parts")
    return data


def _from_dict(cls: type, data: Mapping, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"config key {path or '<root>'!r} must be a mapping, got {data!r}")
    if cls is ModelConfig:
        data = _legacy_model_keys(data, path)
    hints = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    defaults = cls()
    for key, value in data.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {path + key!r}; valid keys here: "
                              f"{sorted(hints)}")
        default = getattr(defaults, key)
        if dataclasses.is_dataclass(default):
            kwargs[key] = _from_dict(type(default), value, f"{path}{key}.")
        else:
            kwargs[key] = _coerce(value, default, path + key)
    return dataclasses.replace(defaults, **kwargs)


def _coerce(value: Any, default: Any, key: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true/false, got {value!r}")
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
        return type(default)(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    if isinstance(default, dict) and not isinstance(value, dict):
        raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
    if isinstance(default, list) and not isinstance(value, list):
        raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
    return copy.deepcopy(value)


def from_dict(data: Mapping) -> Config:
    return _from_dict(Config, data, "")


def merge_dicts(base: dict, update: Mapping) -> dict:
    """Deep merge, ``update`` wins; ``ablations`` is replaced whole (each preset names its own)."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict) and k != "ablations":
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_overrides(overrides: Mapping[str, Any] | list[str] | None) -> dict:
    """``{"train.lr": 1e-3}`` or ``["train.lr=1e-3"]`` -> nested dict (string values YAML-parsed)."""
    if not overrides:
        return {}
    items = overrides.items() if isinstance(overrides, Mapping) else [
        _split_override(o) for o in overrides]
    nested: dict = {}
    for key, value in items:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else ""
        node = nested
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


def _split_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. stages.refine.enabled=false)")
    k, v = text.split("=", 1)
    return k.strip(), v


def read_params_file(path: str | Path) -> dict:
    """A YAML parameter file of config keys (nested or dotted) -> nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"parameter file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"parameter file {path} must hold a mapping of config keys")
    return nest_keys(data)


def nest_keys(mapping: Mapping[str, Any]) -> dict:
    """Dotted keys (``{"stages.refine.enabled": False}``), nested mappings or both -> nested dict.

    Values are kept as given (no YAML parsing); ``ablations`` values stay whole.
    """
    nested: dict = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and key != "ablations":
            value = nest_keys(value)
        node = nested
        *parents, leaf = str(key).split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = merge_dicts(node[leaf], value) if isinstance(node.get(leaf), dict) \
            and isinstance(value, Mapping) else value
    return nested


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset_dict(name: str) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {list_presets()}")
    return yaml.safe_load(path.read_text()) or {}


def load_config(preset: str = "demo", overrides: Mapping | list[str] | None = None,
                yaml_file: str | Path | None = None, **top_level: Any) -> Config:
    """Preset -> YAML file (optional) -> dotted overrides -> keyword overrides, later wins."""
    data = to_dict(Config())
    if preset:
        data = merge_dicts(data, load_preset_dict(preset))
        data["preset"] = preset
    if yaml_file:
        data = merge_dicts(data, read_params_file(yaml_file))
    data = merge_dicts(data, parse_overrides(overrides))
    data = merge_dicts(data, {k: v for k, v in top_level.items() if v is not None})
    cfg = from_dict(data)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Raise :class:`ConfigError` listing every out-of-range or unknown value (see
    :mod:`sskd.config_checks`), each as ``key = value: must be <allowed>``."""
    from sskd.config_checks import problems
    errors = problems(cfg)
    if errors:
        raise ConfigError("invalid config value(s):\n  " + "\n  ".join(errors))


def save_config(cfg: Config, path: str | Path) -> Path:
    from sskd.data.records import write_atomic
    return write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: run the data stage (notebook 00 or "
                          "`sskd run`) first to create the run dir")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML ({e}); fix it, or delete the run dir and "
                          "start the run again") from e
    try:
        cfg = from_dict(data)
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}\nFix the value(s) in that file") from e
    return cfg


def config_hash(obj: Any) -> str:
    """Stable short hash of a (sub)config, used for caches. Keys declared with
    ``fingerprint_omit`` are left out at their omit value (:func:`fingerprint_dict`), so adding
    such a key to sskd keeps every existing cache (the stand-ins' pretraining above all)."""
    data = fingerprint_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
