"""COCO mask AP of predicted records against ground-truth records, via pycocotools COCOeval.

Both sides are built as in-memory ``COCO`` objects (no temp files). Conventions:

* AP values are in percent (0..100); AP is the mean over IoU 0.50:0.05:0.95, AP50/AP75 at one
  IoU, APs/APm/APl over COCO's absolute area ranges (< 32^2, 32^2..96^2, > 96^2 pixels), all
  with at most 100 detections per image, exactly as COCOeval's ``summarize``.
* A class without ground truth has no defined AP: ``per_class[name]`` is ``NaN`` (the key is
  kept so every class appears), and COCO's means (AP, AP50, ...) skip it. An area range with no
  ground truth gives ``NaN`` for APs/APm/APl likewise. False positives of such a class are not
  penalised anywhere (COCO behaviour).
* Every ground-truth image is evaluated; one without predictions counts its objects as misses.
  Predictions for an image id that is not in the ground truth raise ``ValueError``.
* pycocotools prints progress to stdout; it is captured, logged at DEBUG level on this module's
  logger and printed only with ``verbose=True``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from typing import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sskd.data.records import Dataset, ImageRecord, mask_area, to_coco

log = logging.getLogger(__name__)

_STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # first six COCOeval.stats entries


def _coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _pct(value: float) -> float:
    """COCOeval's -1 ("undefined") -> NaN, else a fraction -> percent."""
    return math.nan if value < 0 else float(value) * 100.0


def _predictions(gt: Dataset, pred: Dataset | Sequence[ImageRecord], iou_type: str) -> list[dict]:
    """Validated COCO result annotations (with ``id``, ``area``, ``bbox``) for ``pred``."""
    if isinstance(pred, Dataset):
        if list(pred.classes) != list(gt.classes):
            raise ValueError(f"prediction classes {pred.classes} differ from ground-truth classes "
                             f"{gt.classes}: class_id must index the same class list")
        records = pred.records
    else:
        records = list(pred)
    gt_index = gt.by_id()
    unknown = sorted({r.image_id for r in records} - set(gt_index))
    if unknown:
        raise ValueError(f"predictions for image ids {unknown[:10]}{' ...' if len(unknown) > 10 else ''} "
                         f"that are not in the ground truth {gt.name!r}: evaluate against the "
                         "dataset the predictions were made on")
    seen: set[int] = set()
    cat_ids = gt.category_ids or [i + 1 for i in range(len(gt.classes))]
    out = []
    for rec in records:
        if rec.image_id in seen:
            raise ValueError(f"predictions hold image id {rec.image_id} twice: merge its instances "
                             "into one record")
        seen.add(rec.image_id)
        g = gt_index[rec.image_id]
        for inst in rec.instances:
            where = f"prediction for image {rec.image_id} ({rec.file_name})"
            if not 0 <= inst.class_id < len(gt.classes):
                raise ValueError(f"{where}: class_id {inst.class_id} outside 0..{len(gt.classes) - 1}")
            if inst.score is None:
                raise ValueError(f"{where}: instance has no score; predictions need a confidence")
            size = [int(v) for v in inst.segmentation["size"]]
            if size != [g.height, g.width]:
                raise ValueError(f"{where}: mask size {size} but the ground-truth image is "
                                 f"{[g.height, g.width]}; resize predictions to the original image size")
            bbox = [float(v) for v in inst.bbox]
            area = mask_area(inst.segmentation) if iou_type == "segm" else bbox[2] * bbox[3]
            out.append({"id": len(out) + 1, "image_id": rec.image_id,
                        "category_id": cat_ids[inst.class_id], "segmentation": inst.segmentation,
                        "bbox": bbox, "area": area, "score": float(inst.score), "iscrowd": 0})
    return out


def evaluate_masks(gt: Dataset, pred: Dataset | Sequence[ImageRecord], *, iou_type: str = "segm",
                   verbose: bool = False) -> dict:
    """COCO AP of ``pred`` against ``gt``.

    Args:
        gt: ground truth; its records define the evaluated images and ``gt.classes`` the classes.
        pred: predicted records (instances with ``score``), masks at the gt image size.
        iou_type: "segm" (mask IoU) or "bbox" (box IoU).
        verbose: print pycocotools' summary instead of only logging it.

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl": float percent or NaN,
    "per_class": {name: AP}, "per_class_AP50": {name: AP50}, "num_images": int,
    "num_predictions": int, "iou_type": str}``.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    if not gt.records:
        raise ValueError(f"ground truth {gt.name!r} has no images to evaluate on")
    dets = _predictions(gt, pred, iou_type)
    gt_json = to_coco(gt)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = _coco(gt_json)
        coco_dt = _coco({"images": gt_json["images"], "categories": gt_json["categories"],
                         "annotations": dets})
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.imgIds = sorted(coco_gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    text = buf.getvalue()
    log.debug("pycocotools output:\n%s", text)
    if verbose:
        print(text, end="")

    result = {k: _pct(v) for k, v in zip(_STAT_KEYS, ev.stats[:6])}
    names = {c["id"]: c["name"] for c in gt_json["categories"]}
    precision = ev.eval["precision"]  # T x R x K x A x M; area "all" = 0, maxDets 100 = -1
    per_class, per_class50 = {}, {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        valid, valid50 = p[p > -1], p[0][p[0] > -1]
        per_class[names[cat_id]] = float(np.mean(valid)) * 100 if valid.size else math.nan
        per_class50[names[cat_id]] = float(np.mean(valid50)) * 100 if valid50.size else math.nan
    result.update(per_class=per_class, per_class_AP50=per_class50, num_images=len(gt.records),
                  num_predictions=len(dets), iou_type=iou_type)
    return result
