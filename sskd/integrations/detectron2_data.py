"""Register sskd datasets (and a whole run dir) in detectron2's ``DatasetCatalog``/``MetadataCatalog``.

Kinds of dataset and what detectron2 sees:

* ``labeled`` / ``val``: ground-truth instances as annotations.
* ``unlabeled``: every image with ``annotations: []`` (hidden ground truth, as the synthetic
  benchmark keeps for measurement, is stripped).
* ``pseudo``: teacher pseudo-labels read from a ``pseudo_labels/<tag>.jsonl`` of a run (lazily,
  when detectron2 asks for the dicts), made hard as the sskd trainer does (score threshold,
  max instances per image, :class:`~sskd.config.PseudoLabelConfig`).

Pitfall: detectron2's train loader drops images without annotations when
``cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS`` is True (the default), so an unlabeled set named
in ``cfg.DATASETS.TRAIN`` silently vanishes, and so do images whose pseudo-label set is empty
(they are valid "all background" examples). :func:`set_train_datasets` sets the flag off when a
named dataset has such images and logs a warning; registering an unlabeled set warns too.

Masks are stored as RLE by default: train with ``cfg.INPUT.MASK_FORMAT = "bitmask"``
(:func:`set_train_datasets` does this); ``mask_format="polygon"`` gives lossy polygons instead.

Metadata per dataset: ``thing_classes`` (sskd's class names, index = ``category_id``),
``thing_colors`` (RGB 0..255, one per class), ``evaluator_type="coco"``, ``sskd_kind``,
``mask_format``. Registering a name again replaces the old entry (no "already registered").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from sskd.integrations.detectron2_require import require_detectron2

require_detectron2()

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402

from sskd.config import PseudoLabelConfig  # noqa: E402
from sskd.data.records import Dataset, ImageRecord, iter_records_jsonl  # noqa: E402
from sskd.integrations.detectron2_convert import MASK_FORMATS, record_to_dict  # noqa: E402

log = logging.getLogger(__name__)

KINDS = ("labeled", "unlabeled", "pseudo", "val")


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """``num_classes`` distinct RGB colours (detectron2's own palette, cycled)."""
    from detectron2.utils.colormap import colormap
    palette = colormap(rgb=True, maximum=255)
    return [tuple(int(v) for v in palette[k % len(palette)]) for k in range(num_classes)]


def unregister(name: str) -> None:
    """Remove ``name`` from both catalogs (no error when absent)."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)


def _hard(record: ImageRecord, cfg: PseudoLabelConfig) -> ImageRecord:
    from sskd.engine.data import hard_pseudo_labels  # the trainer's own rule, kept in one place
    return hard_pseudo_labels(record, cfg)


def _pseudo_label_prior(name: str, kind: str, cfg: PseudoLabelConfig, classes: list[str],
                        given: Sequence[float] | None):
    """The class prior that renames ``kind="pseudo"`` records, or None."""
    import numpy as np
    if kind != "pseudo" or cfg.class_prior == "none":
        return None
    if given is None and cfg.class_prior == "uniform":
        given = [1.0 / len(classes)] * len(classes)
    if given is None:
        raise ValueError(f"register_dataset({name!r}): pseudo_label.class_prior is "
                         f"{cfg.class_prior!r}: pass class_prior= (D_l's class distribution, "
                         "sskd.engine.class_alignment.class_prior) or use register_run")
    if len(given) != len(classes):
        raise ValueError(f"register_dataset({name!r}): class_prior has {len(given)} values for "
                         f"{len(classes)} classes")
    return np.asarray(given, dtype=np.float64)


def register_dataset(name: str, dataset: Dataset | str | Path, *, kind: str = "labeled",
                     classes: Sequence[str] | None = None, mask_format: str = "rle",
                     pseudo_label: PseudoLabelConfig | None = None,
                     class_prior: Sequence[float] | None = None,
                     colors: Sequence[Sequence[int]] | None = None, **metadata: Any) -> str:
    """Register one dataset under ``name`` (replacing any previous registration) and return ``name``.

    Args:
        dataset: an sskd :class:`Dataset`, or (``kind="pseudo"``) the path of a jsonl of
            ImageRecords, read each time detectron2 asks for the dicts.
        kind: "labeled" | "unlabeled" | "pseudo" | "val" (see the module doc).
        classes: class names; required with a jsonl path, else ``dataset.classes``.
        mask_format: "rle" (exact) or "polygon" (lossy).
        pseudo_label: hardening rule of ``kind="pseudo"`` (default: ``PseudoLabelConfig()``).
            With ``class_prior`` other than none the classes are renamed as the stages rename
            them (:mod:`sskd.engine.class_alignment`).
        class_prior: the prior for ``pseudo_label.class_prior: labeled`` (``K`` numbers, e.g.
            ``class_prior(labeled, "labeled")``); :func:`register_run` passes the run's own.
        colors: RGB per class (default: :func:`class_colors`).
        **metadata: extra ``MetadataCatalog`` fields (e.g. ``gt_dir`` for Cityscapes).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    if isinstance(dataset, (str, Path)):
        path = Path(dataset)
        if kind != "pseudo":
            raise ValueError(f"{path}: a jsonl path is only accepted with kind='pseudo'; pass a "
                             "Dataset for labeled/unlabeled/val")
        if not path.is_file():
            raise FileNotFoundError(f"pseudo-label file {path} does not exist: run the stage that "
                                    "writes it (sskd.stages) first")
        if classes is None:
            raise ValueError(f"register_dataset({name!r}, {path}): pass classes= (the jsonl has no "
                             "class names)")
        load: Callable[[], list[ImageRecord]] = lambda: list(iter_records_jsonl(path))  # noqa: E731
    else:
        classes = list(dataset.classes) if classes is None else list(classes)
        if list(dataset.classes) != list(classes):
            raise ValueError(f"classes {list(classes)} differ from dataset {dataset.name!r} classes "
                             f"{dataset.classes}")
        records = list(dataset.records)
        load = lambda: records  # noqa: E731
    classes = list(classes)
    pl_cfg = pseudo_label or PseudoLabelConfig()
    prior = _pseudo_label_prior(name, kind, pl_cfg, classes, class_prior)

    def dicts() -> list[dict]:
        out = []
        recs = load()
        if prior is not None:
            from sskd.engine.class_alignment import align_classes
            recs = align_classes(Dataset(list(recs), classes, name), prior)[0].records
        for rec in recs:
            if kind == "unlabeled":
                rec = rec.without_instances()
            elif kind == "pseudo":
                rec = _hard(rec, pl_cfg)
            bad = [i.class_id for i in rec.instances if not 0 <= i.class_id < len(classes)]
            if bad:
                raise ValueError(f"dataset {name!r}, image {rec.file_name}: class ids {bad} outside "
                                 f"0..{len(classes) - 1} ({classes})")
            out.append(record_to_dict(rec, mask_format))
        return out

    unregister(name)
    DatasetCatalog.register(name, dicts)
    colors = [tuple(int(v) for v in c) for c in colors] if colors is not None else class_colors(len(classes))
    if len(colors) != len(classes):
        raise ValueError(f"got {len(colors)} colours for {len(classes)} classes")
    MetadataCatalog.get(name).set(thing_classes=classes, thing_colors=colors, evaluator_type="coco",
                                  sskd_kind=kind, mask_format=mask_format, **metadata)
    if kind == "unlabeled":
        log.warning("registered unlabeled dataset %r (no annotations): detectron2 drops such images "
                    "from cfg.DATASETS.TRAIN unless cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False "
                    "(sskd.integrations.detectron2.set_train_datasets sets it)", name)
    return name


def register_run(run: Any, prefix: str | None = None, *,
                 pseudo_labels: Mapping[str, str | Path] | None = None, mask_format: str = "rle",
                 pseudo_label: PseudoLabelConfig | None = None) -> dict[str, str]:
    """Register a run's datasets; returns ``{role: registered name}``.

    ``run``: a run dir (path or :class:`~sskd.stages.run.Run`): its ``labeled``, ``unlabeled``
    and ``val`` splits and every ``pseudo_labels/<tag>.jsonl`` (as ``pseudo_<tag>``), hardened
    with the run's ``pseudo_label`` config; or a mapping ``{role: Dataset}`` with roles among
    labeled/unlabeled/val (others register as "labeled"), plus ``pseudo_labels={tag: path}``.
    Names are ``<prefix>_<role>``; ``prefix`` defaults to ``sskd_<run name>`` (``sskd`` for a
    mapping).
    """
    pseudo = dict(pseudo_labels or {})
    if isinstance(run, Mapping):
        datasets = dict(run)
        prefix = prefix or "sskd"
    else:
        from sskd.stages.data import load_datasets
        from sskd.stages.run import as_run
        r = as_run(run)
        datasets = load_datasets(r)
        prefix = prefix or f"sskd_{r.dir.name}"
        pseudo_label = pseudo_label or r.cfg.pseudo_label
        pl_dir = r.dir.root / "pseudo_labels"
        for path in sorted(pl_dir.glob("*.jsonl")) if pl_dir.is_dir() else []:
            pseudo.setdefault(path.stem, path)
    if not datasets:
        raise ValueError("register_run: no datasets given")
    classes = next(iter(datasets.values())).classes
    prior = None  # pseudo_label.class_prior's distribution, from D_l as the stages take it
    if pseudo_label is not None and pseudo_label.class_prior != "none" and "labeled" in datasets:
        from sskd.engine.class_alignment import class_prior as prior_of
        prior = prior_of(datasets["labeled"], pseudo_label.class_prior)
    names = {}
    for role, ds in datasets.items():
        kind = role if role in ("labeled", "unlabeled", "val") else "labeled"
        names[role] = register_dataset(f"{prefix}_{role}", ds, kind=kind, mask_format=mask_format)
    for tag, path in pseudo.items():
        names[f"pseudo_{tag}"] = register_dataset(f"{prefix}_pseudo_{tag}", path, kind="pseudo",
                                                  classes=classes, mask_format=mask_format,
                                                  pseudo_label=pseudo_label,
                                                  class_prior=prior)
    log.info("registered in detectron2: %s", names)
    return names


def set_train_datasets(cfg: Any, names: Sequence[str]) -> Any:
    """Point ``cfg.DATASETS.TRAIN`` at ``names`` and make the loader keep every registered image.

    Turns ``cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS`` off (with a warning) when any named
    dataset has images without annotations (unlabeled sets, empty pseudo-label sets), and sets
    ``cfg.INPUT.MASK_FORMAT = "bitmask"`` when any is registered with RLE masks. Returns ``cfg``.
    """
    names = list(names)
    missing = [n for n in names if n not in DatasetCatalog.list()]
    if missing:
        raise KeyError(f"datasets {missing} are not registered; call register_dataset/register_run first")
    empty = {n: sum(1 for d in DatasetCatalog.get(n) if not d.get("annotations")) for n in names}
    empty = {n: c for n, c in empty.items() if c}
    cfg.defrost()
    cfg.DATASETS.TRAIN = tuple(names)
    if empty and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        log.warning("images without annotations in %s would be dropped by detectron2's train loader; "
                    "setting cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False", empty)
        cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False
    if any(MetadataCatalog.get(n).get("mask_format", "polygon") == "rle" for n in names):
        cfg.INPUT.MASK_FORMAT = "bitmask"
    return cfg
