"""One record type for an image and its instances, and conversions to and from COCO json.

Conventions (used everywhere in sskd):

* ``class_id`` is a contiguous index ``0 .. K-1`` into the dataset's ``classes`` list. COCO
  ``category_id`` values are mapped to it by the readers and back (``class_id + 1``, or the
  original ids when known) by :func:`to_coco`.
* ``bbox`` is COCO ``[x, y, w, h]`` in absolute pixels of the original image.
* ``segmentation`` is a COCO RLE ``{"size": [H, W], "counts": str}`` (compressed, utf-8 string).
* ``score`` is ``None`` for ground truth and a float in ``[0, 1]`` for predictions/pseudo-labels.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from pycocotools import mask as mask_utils


# --------------------------------------------------------------------------- masks


def encode_mask(mask: np.ndarray) -> dict:
    """``H x W`` boolean/0-1 array -> compressed COCO RLE with a ``str`` counts field."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    if m.ndim != 2:
        raise ValueError(f"encode_mask expects an H x W mask, got shape {m.shape}")
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"]}


def _as_pycoco_rle(rle: dict) -> dict:
    counts = rle["counts"]
    h, w = int(rle["size"][0]), int(rle["size"][1])
    if isinstance(counts, list):  # uncompressed RLE (COCO iscrowd style)
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return {"size": [h, w], "counts": counts}


def decode_mask(rle: dict) -> np.ndarray:
    """COCO RLE (compressed or uncompressed) -> ``H x W`` ``uint8`` array of 0/1."""
    return mask_utils.decode(_as_pycoco_rle(rle)).astype(np.uint8)


def mask_area(rle: dict) -> float:
    return float(mask_utils.area(_as_pycoco_rle(rle)))


def mask_bbox(rle: dict) -> list[float]:
    """Tight ``[x, y, w, h]`` box of an RLE mask (zeros for an empty mask)."""
    return [float(v) for v in mask_utils.toBbox(_as_pycoco_rle(rle))]


def mask_iou(a: Sequence["Instance"], b: Sequence["Instance"]) -> np.ndarray:
    """``len(a) x len(b)`` mask IoU of two instance lists of one image (pycocotools; crowd
    flags ignored: plain IoU both ways)."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    iou = mask_utils.iou([_as_pycoco_rle(i.segmentation) for i in a],
                         [_as_pycoco_rle(i.segmentation) for i in b], [0] * len(b))
    return np.asarray(iou, dtype=np.float64).reshape(len(a), len(b))


def polygons_to_rle(polygons: Sequence[Sequence[float]], height: int, width: int) -> dict:
    """COCO polygon list ``[[x1, y1, x2, y2, ...], ...]`` -> compressed RLE (``str`` counts)."""
    rles = mask_utils.frPyObjects([list(map(float, p)) for p in polygons], height, width)
    rle = mask_utils.merge(rles)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


# --------------------------------------------------------------------------- records


@dataclass
class Instance:
    """One object instance: class, box, mask (COCO RLE) and an optional confidence.

    ``class_probs``: optional ``K`` probabilities over the classes (a teacher's class
    distribution for the query that drew this mask; ``class_id`` is its first choice among the
    ranked hypotheses). Pseudo-labels carry it when a stage trains on soft class targets
    (``stages.<stage>.soft_classes``).
    """

    class_id: int
    segmentation: dict
    bbox: list[float] = field(default_factory=list)
    score: float | None = None
    iscrowd: int = 0
    class_probs: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.bbox:
            self.bbox = mask_bbox(self.segmentation)

    @classmethod
    def from_mask(
        cls, mask: np.ndarray, class_id: int, score: float | None = None, iscrowd: int = 0,
        class_probs: list[float] | None = None,
    ) -> "Instance":
        """Build from an ``H x W`` binary mask; the box is the mask's tight box."""
        rle = encode_mask(mask)
        return cls(class_id=int(class_id), segmentation=rle, bbox=mask_bbox(rle),
                   score=None if score is None else float(score), iscrowd=int(iscrowd),
                   class_probs=None if class_probs is None else [float(p) for p in class_probs])

    @property
    def area(self) -> float:
        return mask_area(self.segmentation)

    def mask(self) -> np.ndarray:
        """``H x W`` uint8 0/1 mask."""
        return decode_mask(self.segmentation)

    def to_dict(self) -> dict:
        d = {"class_id": self.class_id, "bbox": [round(float(v), 2) for v in self.bbox],
             "segmentation": self.segmentation, "iscrowd": self.iscrowd}
        if self.score is not None:
            d["score"] = round(float(self.score), 6)
        if self.class_probs is not None:
            d["class_probs"] = [round(float(p), 5) for p in self.class_probs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Instance":
        return cls(class_id=int(d["class_id"]), segmentation=d["segmentation"],
                   bbox=list(d.get("bbox") or []), score=d.get("score"),
                   iscrowd=int(d.get("iscrowd", 0)), class_probs=d.get("class_probs"))


@dataclass
class ImageRecord:
    """An image (path and size) and its instances (ground truth or predictions)."""

    file_name: str
    height: int
    width: int
    image_id: int
    instances: list[Instance] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"file_name": self.file_name, "height": self.height, "width": self.width,
                "image_id": self.image_id, "instances": [i.to_dict() for i in self.instances]}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageRecord":
        return cls(file_name=str(d["file_name"]), height=int(d["height"]), width=int(d["width"]),
                   image_id=int(d["image_id"]),
                   instances=[Instance.from_dict(i) for i in d.get("instances", [])])

    def without_instances(self) -> "ImageRecord":
        return ImageRecord(self.file_name, self.height, self.width, self.image_id, [])

    def masks(self) -> np.ndarray:
        """``N x H x W`` uint8 stack of instance masks (``0 x H x W`` when empty)."""
        if not self.instances:
            return np.zeros((0, self.height, self.width), dtype=np.uint8)
        return np.stack([i.mask() for i in self.instances])


@dataclass
class Dataset:
    """Records plus the class-name map every reader returns (``classes[class_id]``)."""

    records: list[ImageRecord]
    classes: list[str]
    name: str = ""
    category_ids: list[int] | None = None  # original COCO ids, ``category_ids[class_id]``

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def by_id(self) -> dict[int, ImageRecord]:
        return {r.image_id: r for r in self.records}

    def subset(self, image_ids: Iterable[int], name: str | None = None) -> "Dataset":
        """The records whose ids are in ``image_ids``, in the order given."""
        index = self.by_id()
        missing = [i for i in image_ids if i not in index]
        if missing:
            raise KeyError(f"dataset {self.name!r} has no image ids {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}")
        return Dataset([index[i] for i in image_ids], list(self.classes),
                       name if name is not None else self.name, self.category_ids)


# --------------------------------------------------------------------------- COCO json


def to_coco(dataset: Dataset, image_root: str | Path | None = None,
            include_scores: bool = False) -> dict:
    """Dataset -> COCO instance json dict. ``file_name`` is made relative to ``image_root``."""
    cat_ids = dataset.category_ids or [i + 1 for i in range(len(dataset.classes))]
    images, annotations = [], []
    ann_id = 1
    for r in dataset.records:
        fname = r.file_name
        if image_root is not None:
            try:
                fname = str(Path(fname).resolve().relative_to(Path(image_root).resolve()))
            except ValueError:
                pass
        images.append({"id": r.image_id, "file_name": fname, "height": r.height, "width": r.width})
        for inst in r.instances:
            ann = {"id": ann_id, "image_id": r.image_id, "category_id": cat_ids[inst.class_id],
                   "segmentation": inst.segmentation, "bbox": [float(v) for v in inst.bbox],
                   "area": inst.area, "iscrowd": inst.iscrowd}
            if include_scores and inst.score is not None:
                ann["score"] = float(inst.score)
            annotations.append(ann)
            ann_id += 1
    categories = [{"id": cid, "name": name} for cid, name in zip(cat_ids, dataset.classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` via a per-process temp file + rename: readers never see half a file and
    concurrent writers (torchrun ranks) never share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    tmp.replace(path)
    return path


def write_json_atomic(obj: Any, path: str | Path, **dump_kwargs: Any) -> Path:
    """Write json to ``path`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, json.dumps(obj, **dump_kwargs))


# --------------------------------------------------------------------------- JSON lines


def write_records_jsonl(records: Iterable[ImageRecord], path: str | Path) -> Path:
    """Write records one per line, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")
    tmp.replace(path)
    return path


def iter_records_jsonl(path: str | Path) -> Iterator[ImageRecord]:
    """Stream records from a JSON-lines file written by :func:`write_records_jsonl` or
    :func:`sskd.engine.inference.predict_to_jsonl` (both atomic: a finished file is whole).

    Any unreadable line, the last one included (a truncated copy), raises ``CorruptFileError``
    naming the file, the line and the fix: silently dropping it would lose an image's labels.
    """
    from sskd.safe_load import CorruptFileError
    path = Path(path)
    fix = ("delete it and re-run the stage that writes it (pseudo_labels/<tag>.jsonl and "
           "predictions/<tag>.jsonl are recomputed from that stage's model)")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                yield ImageRecord.from_dict(json.loads(line))
            except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CorruptFileError(path, f"line {lineno} is not a record: "
                                             f"{type(e).__name__}: {e}", fix) from e
