"""COCO instance json <-> :class:`~sskd.data.records.Dataset`.

Reads polygons, compressed RLE (``str`` or ``bytes`` counts) and uncompressed RLE; maps the
category ids (any integers, in any order) to a contiguous ``class_id`` in sorted-id order, as
detectron2 does, and keeps the original ids in ``Dataset.category_ids`` so :func:`write_coco`
writes them back. Bad input follows the table in :mod:`sskd.data.errors`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from pycocotools import mask as mask_utils

from sskd.data.errors import DataError, SkipLog
from sskd.data.images import image_size, load_image
from sskd.data.records import (Dataset, ImageRecord, Instance, mask_area, mask_bbox,
                               to_coco, write_json_atomic)

# boxes are compared to the image border with this slack (float noise in exported json)
_BOX_EPS = 1e-3


def load_json(path: str | Path) -> Any:
    """Parse a json file; a missing file or bad json gives a DataError with line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "annotation file not found",
                        "check the path (data.train_json / data.val_json settings)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed json at line {e.lineno}, column {e.colno} ({e.msg})",
                        "repair or re-export the file (a truncated download often causes this)"
                        ) from e
    except UnicodeDecodeError as e:
        raise DataError(path, f"not a utf-8 text file ({e})", "point to the json file") from e


def read_coco(json_path: str | Path, image_root: str | Path, *, skip_log: SkipLog | None = None,
              check_images: bool = False, name: str | None = None) -> Dataset:
    """Read a COCO instance-segmentation json.

    Args:
        json_path: the annotation file.
        image_root: folder that the images' ``file_name`` entries are relative to.
        skip_log: collects counted skips and repairs (a new one when ``None``).
        check_images: decode every image: missing, corrupt or wrongly sized images become
            counted skips (slow on big sets; without it, a bad image fails when loaded).
        name: ``Dataset.name`` (default: the json file's stem).

    Returns:
        Dataset whose records hold absolute image paths, sorted as in the json.
    """
    json_path = Path(json_path)
    return from_coco_dict(load_json(json_path), image_root, source=str(json_path),
                          skip_log=skip_log, check_images=check_images,
                          name=json_path.stem if name is None else name)


def write_coco(dataset: Dataset, json_path: str | Path, image_root: str | Path | None = None,
               include_scores: bool = False) -> Path:
    """Write ``dataset`` as COCO json (atomically: temp file + rename).

    ``file_name`` entries are made relative to ``image_root`` when given.
    """
    return write_json_atomic(to_coco(dataset, image_root, include_scores=include_scores), json_path)


# --------------------------------------------------------------------------- dict -> Dataset


def _require(d: dict, key: str, source: str, what: str) -> Any:
    if key not in d:
        raise DataError(source, f"{what} has no {key!r} key",
                        "the file must be COCO instance json (images, annotations, categories)")
    return d[key]


def _categories(d: dict, source: str) -> tuple[list[int], list[str]]:
    cats = _require(d, "categories", source, "the json")
    if not isinstance(cats, list) or not cats:
        raise DataError(source, "'categories' is empty or not a list",
                        "list the classes as [{'id': int, 'name': str}, ...]")
    by_id: dict[int, str] = {}
    for c in cats:
        cid = int(_require(c, "id", source, f"category {c!r}"))
        if cid in by_id:
            raise DataError(source, f"duplicate category id {cid}", "make category ids unique")
        by_id[cid] = str(c.get("name", cid))
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def _image_id_map(images: list[dict], source: str) -> dict[Any, int]:
    """json image id -> int ``image_id``; raises on duplicates."""
    raw = [_require(im, "id", source, f"image entry {im.get('file_name', im)!r}") for im in images]
    seen: set = set()
    for rid in raw:
        if rid in seen:
            raise DataError(source, f"duplicate image id {rid!r}",
                            "every entry of 'images' needs its own id")
        seen.add(rid)
    if all(isinstance(r, int) and not isinstance(r, bool) for r in raw):
        return {r: r for r in raw}
    # String ids (e.g. "ADE_train_00000001" from the ADE20K conversion): use their trailing
    # number when that is unique, else the position in the file, so ids stay ints everywhere.
    nums = [re.search(r"(\d+)$", str(r)) for r in raw]
    if all(nums) and len({int(m.group(1)) for m in nums}) == len(raw):
        return {r: int(m.group(1)) for r, m in zip(raw, nums)}
    return {r: i + 1 for i, r in enumerate(raw)}


def _segmentation_rle(seg: Any, h: int, w: int, where: str) -> dict | None:
    """COCO segmentation (polygons / RLE) -> compressed RLE with ``str`` counts.

    Returns None when no polygon ring has an area (fewer than 3 points).
    """
    if isinstance(seg, list):
        if all(isinstance(v, (int, float)) for v in seg):
            seg = [seg]  # some exporters write one flat polygon
        # pycocotools reads a ring of 4 numbers as a box, and <6 numbers is no area anyway.
        rings = [list(map(float, p)) for p in seg
                 if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not rings:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(rings, h, w))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = [int(v) for v in seg["size"]]
        if size != [h, w]:
            raise DataError(where, f"mask size {size} differs from the image size {[h, w]}",
                            "the annotations belong to other (resized?) images; re-export them")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed RLE (usual for iscrowd=1)
            rle = mask_utils.frPyObjects({"size": size, "counts": counts}, h, w)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str)
                   else counts}
        else:
            raise DataError(where, f"RLE counts of type {type(counts).__name__}",
                            "counts must be a string, bytes or a list of ints")
    else:
        raise DataError(where, f"segmentation of unknown form {str(seg)[:80]!r}",
                        "use COCO polygons [[x1, y1, ...]] or RLE {'size', 'counts'}")
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [h, w], "counts": counts}


def _clip_box(bbox: Any, rle: dict, h: int, w: int, where: str, log: SkipLog) -> list[float]:
    """Clip a COCO ``[x, y, w, h]`` box to the image; fall back to the mask's tight box."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
        return mask_bbox(rle)
    x, y, bw, bh = (float(v) for v in bbox)
    x0, y0 = min(max(x, 0.0), w), min(max(y, 0.0), h)
    x1, y1 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
    outside = (x < -_BOX_EPS or y < -_BOX_EPS or x + bw > w + _BOX_EPS or y + bh > h + _BOX_EPS)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        log.fix("bbox clipped", where, f"box {bbox} empty inside {w}x{h}; using the mask box")
        return mask_bbox(rle)
    if outside:
        log.fix("bbox clipped", where, f"box {bbox} clipped to the {w}x{h} image")
    return [x0, y0, x1 - x0, y1 - y0]


def _check_image(path: Path, h: int, w: int, log: SkipLog) -> bool:
    """Decode the image; record a skip and return False when it is missing/corrupt/mis-sized."""
    if not path.is_file():
        log.skip("missing image", path)
        return False
    try:
        arr = load_image(path)
    except DataError as e:
        log.skip("corrupt image", path, e.problem)
        return False
    if arr.shape[:2] != (h, w):
        log.skip("size mismatch", path, f"file is {arr.shape[0]}x{arr.shape[1]}, json says {h}x{w}")
        return False
    return True


def from_coco_dict(d: dict, image_root: str | Path, *, source: str = "<coco dict>",
                   skip_log: SkipLog | None = None, check_images: bool = False,
                   name: str = "") -> Dataset:
    """Build a Dataset from a parsed COCO dict (see :func:`read_coco`; ``source`` names it in
    messages)."""
    log = skip_log if skip_log is not None else SkipLog(name or Path(source).stem)
    if not isinstance(d, dict):
        raise DataError(source, f"top level is a {type(d).__name__}, not a COCO dict",
                        "the file must be COCO instance json (images, annotations, categories)")
    cat_ids, classes = _categories(d, source)
    class_of = {cid: k for k, cid in enumerate(cat_ids)}
    images = _require(d, "images", source, "the json")
    id_map = _image_id_map(images, source)
    root = Path(os.path.abspath(Path(image_root).expanduser()))

    records: dict[Any, ImageRecord] = {}
    dropped: set = set()  # ids of images skipped while reading their size (check_images=True)
    for im in images:
        fname = _require(im, "file_name", source, f"image {im['id']!r}")
        path = root / fname
        h, w = int(im.get("height") or 0), int(im.get("width") or 0)
        if not (h > 0 and w > 0):  # some exporters omit the size: read it from the header
            try:
                h, w = image_size(path)
            except DataError as e:
                if not check_images:
                    raise
                reason = "missing image" if not path.is_file() else "corrupt image"
                log.skip(reason, path, e.problem)
                dropped.add(im["id"])
                continue
        records[im["id"]] = ImageRecord(str(path), h, w, id_map[im["id"]])

    for ann in d.get("annotations") or []:
        aid = ann.get("id", "?")
        if ann.get("image_id") in dropped:
            continue
        if ann.get("image_id") not in records:
            raise DataError(source, f"annotation {aid} refers to image id "
                            f"{ann.get('image_id')!r}, which is not in 'images'",
                            "add the image entry or drop the annotation")
        rec = records[ann["image_id"]]
        cid = ann.get("category_id")
        if cid not in class_of:
            raise DataError(source, f"annotation {aid} has category id {cid!r}, not in "
                            f"'categories' {cat_ids}",
                            "add that category to 'categories' or remove its annotations")
        where = f"{source}: annotation {aid} (image {Path(rec.file_name).name})"
        seg = ann.get("segmentation")
        if seg is None or (isinstance(seg, (list, dict)) and not seg):
            log.skip("no segmentation", where)
            continue
        rle = _segmentation_rle(seg, rec.height, rec.width, where)
        if rle is None or mask_area(rle) <= 0:
            log.skip("empty mask", where)
            continue
        box = _clip_box(ann.get("bbox"), rle, rec.height, rec.width, where, log)
        rec.instances.append(Instance(class_id=class_of[cid], segmentation=rle, bbox=box,
                                      score=ann.get("score"), iscrowd=int(ann.get("iscrowd", 0))))

    out = list(records.values())
    if check_images:
        out = [r for r in out if _check_image(Path(r.file_name), r.height, r.width, log)]
        if images and not out:
            raise DataError(root, f"none of the {len(images)} images of {source} could be read",
                            "image_root is probably wrong: it must be the folder that the "
                            "json's file_name entries are relative to")
    if log.count or log.fix_count:
        log.log_summary()
    return Dataset(out, classes, name=name, category_ids=cat_ids)
