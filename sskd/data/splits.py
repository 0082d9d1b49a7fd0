"""Seeded labeled/unlabeled splits, saved as small json files in the run dir.

A split is a pure function of (sorted image ids, labeled fraction, seed): the ids are sorted,
permuted with ``numpy.random.Generator(PCG64(seed))`` and the first ``max(1, round(f * n))``
become the labeled set. Files are written with sorted keys and fixed formatting, so the same
inputs give byte-identical files in any process.

File format (``splits/<name>.json``)::

    {"dataset": "train", "fraction": 0.1, "image_ids": [3, 8, ...], "name": "labeled",
     "num_images": 40, "seed": 0}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np

from sskd.data.records import Dataset, write_atomic
from sskd.rundir import RunDir

SPLIT_NAMES = ("labeled", "unlabeled", "val")


def _ids(dataset_or_image_ids: Dataset | Iterable[int], what: str = "image ids") -> list[int]:
    """Sorted image ids; duplicates are an error (a split must partition the set)."""
    if isinstance(dataset_or_image_ids, Dataset):
        raw = [r.image_id for r in dataset_or_image_ids.records]
    else:
        raw = list(dataset_or_image_ids)
    ids = sorted(int(i) for i in raw)
    dup = sorted({a for a, b in zip(ids, ids[1:]) if a == b})
    if dup:
        raise ValueError(f"{what} contain duplicates {dup[:10]}: every image needs a unique id")
    return ids


def make_splits(dataset_or_image_ids: Dataset | Iterable[int], labeled_fraction: float,
                seed: int) -> dict[str, list[int]]:
    """``{"labeled": [ids], "unlabeled": [ids]}``, each sorted, disjoint, covering all ids.

    ``labeled_fraction`` in ``(0, 1]``; the labeled count is ``round(f * n)`` (halves round up),
    at least 1. Raises ``ValueError`` for an empty id list or a fraction outside ``(0, 1]``.
    """
    ids = _ids(dataset_or_image_ids)
    f = float(labeled_fraction)
    if not 0 < f <= 1 or math.isnan(f):
        raise ValueError(f"labeled_fraction must be in (0, 1] (data.labeled_fraction), got {labeled_fraction}")
    if not ids:
        raise ValueError("cannot split an empty set of images: the training set has no images")
    n = len(ids)
    n_labeled = min(n, max(1, int(math.floor(f * n + 0.5))))
    perm = np.random.Generator(np.random.PCG64(int(seed))).permutation(n)
    chosen = set(perm[:n_labeled].tolist())
    return {"labeled": [ids[i] for i in range(n) if i in chosen],
            "unlabeled": [ids[i] for i in range(n) if i not in chosen]}


def split_bytes(image_ids: Iterable[int], *, dataset: str, seed: int | None,
                fraction: float | None, name: str) -> bytes:
    """The exact file content :func:`write_split` writes (sorted keys, 1-space indent, newline)."""
    ids = _ids(image_ids, f"split {name!r}")
    obj = {"dataset": str(dataset), "fraction": None if fraction is None else float(fraction),
           "image_ids": ids, "name": str(name), "num_images": len(ids),
           "seed": None if seed is None else int(seed)}
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode("utf-8")


def write_split(path: str | Path, image_ids: Iterable[int], *, dataset: str, seed: int | None,
                fraction: float | None, name: str) -> Path:
    """Write one split file atomically (unique temp file + rename); returns ``path``.

    ``dataset``: which set the ids index (e.g. "train", "val"); ``seed``/``fraction``: the split
    parameters that produced the ids (informational); ``name``: "labeled" | "unlabeled" | "val".
    """
    path = Path(path)
    data = split_bytes(image_ids, dataset=dataset, seed=seed, fraction=fraction, name=name)
    return write_atomic(path, data)


def read_split_file(path: str | Path) -> dict:
    """The whole split file as a dict, validated; clear errors for missing/corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist: run the data stage "
                                "(notebook 00, `sskd run`, or sskd.data.splits.write_splits) first")
    fix = "delete it and re-run the data stage to rewrite it"
    try:
        obj = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"split file {path} is corrupt (not valid JSON: {e}); {fix}") from e
    ids = obj.get("image_ids") if isinstance(obj, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"split file {path} is corrupt: 'image_ids' must be a list of integers; {fix}")
    if obj.get("num_images", len(ids)) != len(ids):
        raise ValueError(f"split file {path} is corrupt: num_images={obj.get('num_images')} but "
                         f"{len(ids)} image_ids (truncated or edited?); {fix}")
    return obj


def read_split(path: str | Path) -> list[int]:
    """Image ids of a split file (sorted, as written)."""
    return list(read_split_file(path)["image_ids"])


def write_splits(run_dir: RunDir | str | Path, train: Dataset | Iterable[int],
                 val: Dataset | Iterable[int], *, labeled_fraction: float, seed: int,
                 train_name: str = "train", val_name: str = "val") -> dict[str, Path]:
    """Split ``train`` and write ``splits/{labeled,unlabeled,val}.json`` into ``run_dir``.

    ``val`` is written whole (its ``fraction`` field is ``None``). ``train_name``/``val_name``
    go into the files' ``dataset`` field. Returns ``{"labeled": path, "unlabeled": path,
    "val": path}``.
    """
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    split = make_splits(train, labeled_fraction, seed)
    paths = {}
    for name in ("labeled", "unlabeled"):
        paths[name] = write_split(rd.split(name), split[name], dataset=train_name, seed=seed,
                                  fraction=labeled_fraction, name=name)
    paths["val"] = write_split(rd.split("val"), _ids(val, "val image ids"), dataset=val_name,
                               seed=seed, fraction=None, name="val")
    return paths
