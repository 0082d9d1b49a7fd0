"""sskd records/predictions <-> detectron2 dataset dicts and ``Instances``.

* :class:`~sskd.data.records.ImageRecord` <-> detectron2 "standard dataset dict"
  (``bbox_mode`` XYWH_ABS, ``category_id`` = sskd's contiguous ``class_id``, ``segmentation``
  a COCO RLE dict (exact) or COCO polygons (lossy: contours of the mask; holes are filled and
  parts under ~3 pixels vanish). Predictions/pseudo-labels keep their ``score`` in each
  annotation (detectron2 ignores the extra key).
* :class:`~sskd.models.base.Prediction` / records <-> ``Instances``: predictions as
  ``pred_masks`` (``N x H x W`` bool), ``pred_boxes`` (XYXY ``Boxes``), ``scores``,
  ``pred_classes``; ground truth as ``gt_masks`` (``BitMasks``), ``gt_boxes``, ``gt_classes``.
"""

from __future__ import annotations

import logging
from typing import Any

from sskd.integrations.detectron2_require import require_detectron2

require_detectron2()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.layers import paste_masks_in_image  # noqa: E402
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks  # noqa: E402

from sskd.data.records import (ImageRecord, Instance, decode_mask, encode_mask,  # noqa: E402
                               polygons_to_rle)
from sskd.models.base import Prediction, resolve_overlaps  # noqa: E402

log = logging.getLogger(__name__)

MASK_FORMATS = ("rle", "polygon")


# --------------------------------------------------------------------------- masks


def _rle_str(rle: dict) -> dict:
    """A compressed RLE with ``str`` counts (sskd's convention); list counts are re-encoded."""
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed (iscrowd-style) RLE
        return encode_mask(decode_mask(rle))
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": str(counts)}


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """``H x W`` 0/1 mask -> COCO polygons (outer contours; lossy, see module doc)."""
    from detectron2.utils.visualizer import GenericMask  # uses OpenCV, imported on demand
    h, w = mask.shape
    return [[float(v) for v in p] for p in GenericMask(mask.astype(np.uint8), h, w).polygons]


def segmentation_to_rle(segm: Any, height: int, width: int, where: str = "annotation") -> dict:
    """detectron2 ``segmentation`` (RLE dict, polygon list or ``H x W`` array) -> sskd RLE."""
    if isinstance(segm, dict):
        rle = _rle_str(segm)
        if rle["size"] != [height, width]:
            raise ValueError(f"{where}: RLE size {rle['size']} differs from the image size "
                             f"{[height, width]}")
        return rle
    if isinstance(segm, (list, tuple)):
        if not segm:
            raise ValueError(f"{where}: empty polygon list")
        return polygons_to_rle(segm, height, width)
    if isinstance(segm, (np.ndarray, torch.Tensor)):
        arr = np.asarray(segm.cpu() if isinstance(segm, torch.Tensor) else segm)
        if arr.shape != (height, width):
            raise ValueError(f"{where}: bitmask shape {arr.shape} differs from {(height, width)}")
        return encode_mask(arr.astype(np.uint8))
    raise TypeError(f"{where}: unsupported segmentation type {type(segm).__name__}; expected an "
                    "RLE dict, a polygon list or an H x W array")


# --------------------------------------------------------------------------- dataset dicts


def record_to_dict(record: ImageRecord, mask_format: str = "rle") -> dict:
    """ImageRecord -> detectron2 dataset dict (``annotations`` is ``[]`` for unlabeled images).

    ``mask_format``: "rle" (exact; train with ``cfg.INPUT.MASK_FORMAT = "bitmask"``) or
    "polygon" (lossy; instances whose mask yields no polygon are dropped and logged).
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    anns = []
    for k, inst in enumerate(record.instances):
        ann: dict[str, Any] = {"bbox": [float(v) for v in inst.bbox], "bbox_mode": BoxMode.XYWH_ABS,
                               "category_id": int(inst.class_id), "iscrowd": int(inst.iscrowd)}
        if mask_format == "rle":
            ann["segmentation"] = _rle_str(inst.segmentation)
        else:
            polys = mask_to_polygons(inst.mask())
            if not polys:
                log.warning("%s: instance %d too small for a polygon, dropped", record.file_name, k)
                continue
            ann["segmentation"] = polys
        if inst.score is not None:
            ann["score"] = float(inst.score)
        anns.append(ann)
    return {"file_name": record.file_name, "height": int(record.height), "width": int(record.width),
            "image_id": int(record.image_id), "annotations": anns}


def dict_to_record(d: dict, num_classes: int | None = None, image_id: int | None = None) -> ImageRecord:
    """detectron2 dataset dict -> ImageRecord (boxes converted to XYWH, masks to RLE).

    ``image_id`` overrides ``d["image_id"]`` (needed when that is not an integer, e.g. the
    Cityscapes loader's string ids). ``num_classes`` checks ``category_id`` in ``0..K-1``.
    """
    where = d.get("file_name", "<dataset dict>")
    for key in ("file_name", "height", "width"):
        if key not in d:
            raise ValueError(f"{where}: detectron2 dict lacks {key!r}")
    H, W = int(d["height"]), int(d["width"])
    if image_id is None:
        try:
            image_id = int(d["image_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: image_id {d.get('image_id')!r} is not an integer; pass "
                             "image_id= (sskd ids are ints)") from e
    instances = []
    for k, ann in enumerate(d.get("annotations", [])):
        at = f"{where} annotation {k}"
        if "segmentation" not in ann:
            raise ValueError(f"{at}: no 'segmentation'; sskd instances need masks")
        cid = int(ann["category_id"])
        if cid < 0 or (num_classes is not None and cid >= num_classes):
            raise ValueError(f"{at}: category_id {cid} outside the contiguous range "
                             f"0..{(num_classes or 0) - 1}; map dataset ids to contiguous ones first")
        rle = segmentation_to_rle(ann["segmentation"], H, W, at)
        bbox = [float(v) for v in BoxMode.convert(list(ann["bbox"]), ann.get("bbox_mode", BoxMode.XYWH_ABS),
                                                  BoxMode.XYWH_ABS)] if "bbox" in ann else []
        instances.append(Instance(class_id=cid, segmentation=rle, bbox=bbox, score=ann.get("score"),
                                  iscrowd=int(ann.get("iscrowd", 0))))
    return ImageRecord(str(d["file_name"]), H, W, int(image_id), instances)


# --------------------------------------------------------------------------- Instances


def _boxes_xyxy(masks: torch.Tensor) -> Boxes:
    """Tight XYXY boxes of ``N x H x W`` bool masks (x2/y2 exclusive, as detectron2 does)."""
    return BitMasks(masks).get_bounding_boxes()


def prediction_to_instances(pred: Prediction) -> Instances:
    """Prediction (``N x H x W`` masks) -> ``Instances`` with ``pred_masks/boxes/classes, scores``."""
    masks = pred.masks.bool()
    inst = Instances(tuple(int(v) for v in masks.shape[-2:]))
    inst.pred_masks = masks
    inst.pred_boxes = _boxes_xyxy(masks)
    inst.scores = pred.scores.float().reshape(-1)
    inst.pred_classes = pred.class_ids.long().reshape(-1)
    return inst


def instances_to_prediction(inst: Instances, mask_threshold: float = 0.5,
                            resolve: bool = False) -> Prediction:
    """Predicted ``Instances`` -> Prediction at ``inst.image_size``.

    ``pred_masks`` may be full-image (``N x H x W`` bool/float) or the raw mask-head output
    (``N x 1 x M x M`` probabilities), which is pasted into the image with ``pred_boxes``.
    ``resolve=True`` sorts by score and gives each pixel to its best instance only (sskd's
    convention for model outputs), dropping instances left empty.
    """
    H, W = (int(v) for v in inst.image_size)
    masks = inst.pred_masks
    if masks.dim() == 4:  # N x 1 x M x M raw head output
        masks = paste_masks_in_image(masks[:, 0], inst.pred_boxes, (H, W), threshold=mask_threshold)
    elif masks.dtype != torch.bool:
        masks = masks >= mask_threshold
    scores, classes = inst.scores.float(), inst.pred_classes.long()
    if resolve:
        order = scores.argsort(descending=True)
        masks, scores, classes = resolve_overlaps(masks[order]), scores[order], classes[order]
        keep = masks.flatten(1).any(1)
        masks, scores, classes = masks[keep], scores[keep], classes[keep]
    return Prediction(masks.bool(), classes, scores)


def record_to_instances(record: ImageRecord, as_prediction: bool | None = None) -> Instances:
    """ImageRecord -> ``Instances`` at the record's size.

    Ground truth (``gt_masks`` as ``BitMasks``, ``gt_boxes`` from the record's boxes,
    ``gt_classes``) unless ``as_prediction`` (default: every instance has a score), then the
    ``pred_*`` fields and ``scores``.
    """
    if as_prediction is None:
        as_prediction = bool(record.instances) and all(i.score is not None for i in record.instances)
    masks = torch.from_numpy(record.masks()).bool()
    classes = torch.tensor([i.class_id for i in record.instances], dtype=torch.long)
    inst = Instances((record.height, record.width))
    if as_prediction:
        inst.pred_masks = masks
        inst.pred_boxes = _boxes_xyxy(masks)
        inst.scores = torch.tensor([float(i.score if i.score is not None else 1.0)
                                    for i in record.instances], dtype=torch.float32)
        inst.pred_classes = classes
    else:
        xywh = torch.tensor([i.bbox for i in record.instances], dtype=torch.float64).reshape(-1, 4)
        inst.gt_boxes = Boxes(BoxMode.convert(xywh, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS).float())
        inst.gt_classes = classes
        inst.gt_masks = BitMasks(masks)
    return inst


def instances_to_record(inst: Instances, file_name: str, image_id: int,
                        mask_threshold: float = 0.5) -> ImageRecord:
    """``Instances`` (``pred_*`` or ``gt_*`` fields) -> ImageRecord at ``inst.image_size``."""
    H, W = (int(v) for v in inst.image_size)
    out = []
    if inst.has("pred_classes"):
        pred = instances_to_prediction(inst, mask_threshold)
        for m, c, s in zip(pred.masks.cpu().numpy(), pred.class_ids.tolist(), pred.scores.tolist()):
            out.append(Instance.from_mask(m, c, score=s))
    elif inst.has("gt_classes"):
        gm = inst.gt_masks if inst.has("gt_masks") else None
        if isinstance(gm, PolygonMasks):
            gm = BitMasks.from_polygon_masks(gm, H, W)
        if gm is None:
            raise ValueError(f"{file_name}: Instances have gt_classes but no gt_masks")
        masks = gm.tensor.cpu().numpy()
        boxes = BoxMode.convert(inst.gt_boxes.tensor.double().cpu(), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS) \
            if inst.has("gt_boxes") else None
        for k, (m, c) in enumerate(zip(masks, inst.gt_classes.tolist())):
            rle = encode_mask(m)
            bbox = [float(v) for v in boxes[k]] if boxes is not None else []
            out.append(Instance(class_id=int(c), segmentation=rle, bbox=bbox))
    elif len(inst):
        raise ValueError(f"{file_name}: Instances carry neither pred_classes nor gt_classes "
                         f"(fields: {list(inst.get_fields())})")
    return ImageRecord(str(file_name), H, W, int(image_id), out)


def targets_to_instances(target: dict, image_size: tuple[int, int], num_classes: int,
                         where: str = "target") -> Instances:
    """sskd training target ``{"masks": N x h x w, "labels": N}`` -> gt ``Instances`` at ``image_size``.

    Masks at another resolution are resized (nearest); empty masks (e.g. cropped away by
    augmentation) are dropped, since a zero-size box cannot be regressed.
    """
    H, W = int(image_size[0]), int(image_size[1])
    masks = torch.as_tensor(target["masks"])
    labels = torch.as_tensor(target["labels"]).long().reshape(-1).to(masks.device)
    if masks.dim() != 3 or masks.shape[0] != labels.numel():
        raise ValueError(f"{where}: masks must be N x H x W with N = len(labels) = {labels.numel()}, "
                         f"got {tuple(masks.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where}: labels must be class ids in [0, {num_classes}), got {labels.tolist()}")
    if masks.shape[0] and tuple(masks.shape[-2:]) != (H, W):
        masks = torch.nn.functional.interpolate(masks[None].float(), size=(H, W), mode="nearest")[0]
    masks = masks > 0.5 if masks.dtype != torch.bool else masks
    keep = masks.flatten(1).any(1) if masks.shape[0] else torch.zeros(0, dtype=torch.bool,
                                                                      device=masks.device)
    masks, labels = masks[keep], labels[keep]
    inst = Instances((H, W))
    inst.gt_masks = BitMasks(masks)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes().to(masks.device)
    inst.gt_classes = labels
    return inst
