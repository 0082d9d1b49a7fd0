"""Stage 0: the data of a run: generate or read the datasets, write the seeded split files."""

from __future__ import annotations

import json
from pathlib import Path

from sskd.data.records import Dataset
from sskd.stages.run import Run, as_run, locked, log


def _source_datasets(run: Run) -> dict[str, Dataset]:
    """``train`` (to be split), ``val`` and, for the synthetic benchmark, ``source``."""
    from sskd.data.coco import read_coco
    cfg = run.cfg.data
    root = Path(cfg.root)
    if cfg.kind == "synthetic":
        from sskd.data.synthetic import generate_benchmark
        jsons = generate_benchmark(cfg.synthetic, root)
        return {name: read_coco(path, Path(path).parent) for name, path in jsons.items()}
    if cfg.kind == "cityscapes":
        from sskd.data.cityscapes import read_cityscapes
        return {"train": read_cityscapes(root, "train"), "val": read_cityscapes(root, "val")}
    reader = read_coco
    if cfg.kind == "ade20k":
        from sskd.data.ade20k import read_ade20k_instances as reader
    out = {}
    for split, js, im in (("train", cfg.train_json, cfg.train_images), ("val", cfg.val_json, cfg.val_images)):
        if not js:
            raise ValueError(f"data.{split}_json is empty: set it to the {split} annotation json "
                             f"of your {cfg.kind} dataset (relative to data.root={root})")
        # ADE20K's reader finds images/<split> beside the json when no image dir is given
        out[split] = reader(root / js, (root / im) if im else None) if cfg.kind == "ade20k" \
            else reader(root / js, root / im)
    return out


def _extra_unlabeled(run: Run, train: Dataset) -> Dataset | None:
    if not run.cfg.data.unlabeled_dir:
        return None
    from sskd.data.folder import read_image_folder
    extra = read_image_folder(Path(run.cfg.data.root) / run.cfg.data.unlabeled_dir,
                              classes=train.classes)
    clash = {r.image_id for r in extra.records} & {r.image_id for r in train.records}
    if clash:
        raise ValueError(f"data.unlabeled_dir images share ids with the train set: {sorted(clash)[:5]}")
    return extra


@locked
def prepare_data(run: Run | str | Path) -> dict:
    """Generate/read the data and write ``splits/{labeled,unlabeled,val}.json`` (seeded)."""
    from sskd.data.splits import make_splits, write_split
    run = as_run(run)
    d = run.dir
    cfg = run.cfg.data
    sets = _source_datasets(run)
    train, val = sets["train"], sets["val"]
    split = make_splits([r.image_id for r in train.records], cfg.labeled_fraction, cfg.split_seed)
    extra = _extra_unlabeled(run, train)
    if extra is not None:  # an extra folder of unlabeled images joins D_u
        split["unlabeled"] = sorted(split["unlabeled"] + [r.image_id for r in extra.records])
    val_ids = sorted(r.image_id for r in val.records)
    if cfg.max_val:
        val_ids = val_ids[: cfg.max_val]
    meta = dict(seed=cfg.split_seed, fraction=cfg.labeled_fraction)
    write_split(d.split("labeled"), split["labeled"], dataset="train", name="labeled", **meta)
    write_split(d.split("unlabeled"), split["unlabeled"], dataset="train", name="unlabeled", **meta)
    write_split(d.split("val"), val_ids, dataset="val", name="val", **meta)
    summary = {"classes": train.classes, "labeled": len(split["labeled"]),
               "unlabeled": len(split["unlabeled"]), "val": len(val_ids),
               "source": len(sets["source"]) if "source" in sets else 0}
    log.info("data: %s", json.dumps(summary))
    return summary


def load_datasets(run: Run | str | Path, with_source: bool = False) -> dict[str, Dataset]:
    """``labeled``, ``unlabeled`` and ``val`` datasets as the run's split files name them.

    For the synthetic benchmark the unlabeled records keep their (hidden) ground truth: stages
    never train on it, but it lets the kit measure pseudo-label quality and bias.
    """
    from sskd.data.splits import read_split
    run = as_run(run)
    sets = _source_datasets(run)
    extra = _extra_unlabeled(run, sets["train"])
    if extra is not None:
        sets["train"] = Dataset(sets["train"].records + extra.records, sets["train"].classes,
                                "train", sets["train"].category_ids)
    out = {name: sets[src].subset(read_split(run.dir.split(name)), name=name)
           for name, src in (("labeled", "train"), ("unlabeled", "train"), ("val", "val"))}
    if with_source and "source" in sets:
        out["source"] = sets["source"]
    return out
