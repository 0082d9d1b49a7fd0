"""Streaming inference: predictions / pseudo-labels written to disk one image per line.

Memory is constant in the number of images (nothing is accumulated), and a killed run resumes:
lines already in ``<out>.partial`` are kept and their images skipped; the file is renamed to
``<out>`` only when every image is done, so a complete file is never half-written.

Geometry (:class:`~sskd.engine.data.InputGeometry`): in square mode each image is resized to
``input_size x input_size``; in aspect-preserving mode its short side is scaled to
``test_short_side``, the batch is zero-padded bottom/right to the model's patch multiple, and
each prediction is cropped to its image's extent. Either way the masks are resized back to the
record's original ``height x width`` before they are written (evaluation happens there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sskd.config import EvaluationConfig, PseudoLabelConfig
from sskd.data.records import Dataset, ImageRecord, Instance
from sskd.engine.data import InputGeometry, SampleCache, pad_batch
from sskd.models.base import Prediction, Segmenter


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _done_ids(partial: Path) -> set[int]:
    """Image ids already written; a torn last line (killed mid-write) is cut off."""
    if not partial.is_file():
        return set()
    good, ids = [], set()
    for line in partial.read_text().splitlines():
        try:
            ids.add(int(json.loads(line)["image_id"]))
            good.append(line)
        except (json.JSONDecodeError, KeyError):
            break
    partial.write_text("".join(g + "\n" for g in good))
    return ids


def prediction_to_record(pred: Prediction, record: ImageRecord,
                         extent: tuple[int, int] | None = None,
                         class_probs: bool = False) -> ImageRecord:
    """Masks at model resolution -> instances at the record's original resolution.

    ``extent``: ``(h, w)`` of the image inside a padded input; the masks (``N x H x W``) are
    cropped to ``[:h, :w]`` before the resize (``None``: no padding). ``class_probs``: keep
    each instance's class distribution (soft pseudo-label targets), when the model gives one.
    """
    masks = pred.masks
    if extent is not None:
        masks = masks[:, :extent[0], :extent[1]]
    if masks.shape[0] and masks.shape[-2:] != (record.height, record.width):
        masks = F.interpolate(masks[None].float(), size=(record.height, record.width),
                              mode="nearest")[0].bool()
    dists = pred.class_probs.tolist() if class_probs and pred.class_probs is not None \
        else [None] * len(pred)
    insts = []
    for m, c, s, d in zip(masks.cpu().numpy(), pred.class_ids.tolist(), pred.scores.tolist(), dists):
        if m.any():
            insts.append(Instance.from_mask(m.astype(np.uint8), int(c), score=float(s),
                                            class_probs=d))
    return ImageRecord(record.file_name, record.height, record.width, record.image_id, insts)


def masks_overlap(cfg: PseudoLabelConfig | EvaluationConfig) -> bool:
    """Whether predictions made with ``cfg`` keep overlapping masks: only evaluation may rank
    them (COCO protocol); pseudo-labels are instance maps (one instance per pixel)."""
    return isinstance(cfg, EvaluationConfig) and cfg.overlapping_masks


@torch.no_grad()
def iter_predictions(model: Segmenter, dataset: Dataset,
                     cfg: PseudoLabelConfig | EvaluationConfig, *,
                     input_size: int = 64, batch_size: int = 16,
                     device: str | torch.device = "cpu", skip_ids: set[int] | None = None,
                     cache: SampleCache | None = None, progress: bool = False,
                     desc: str = "predict",
                     geometry: InputGeometry | None = None,
                     class_probs: bool = False) -> Iterator[ImageRecord]:
    """Yield one predicted :class:`ImageRecord` per image of ``dataset`` (in order), masks at
    each record's original size. ``geometry`` overrides the square ``input_size``;
    ``class_probs`` keeps each instance's class distribution (:func:`prediction_to_record`).
    Pseudo-labels (``cfg`` a :class:`PseudoLabelConfig`) get ``cfg.mask_refine``'s refinement;
    evaluation never does."""
    from sskd.engine.mask_refinement import mask_refiner
    refiner = mask_refiner(cfg) if isinstance(cfg, PseudoLabelConfig) else None
    device = torch.device(device)
    model.to(device).eval()
    overlapping = masks_overlap(cfg)
    geometry = geometry or InputGeometry(int(input_size))
    cache = cache or SampleCache(geometry, max_mb=0)  # each image is read once: cache nothing
    multiple = int(getattr(model, "patch_size", 1) or 1)
    todo = [r for r in dataset.records if not skip_ids or r.image_id not in skip_ids]
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = todo[start:start + batch_size]
        loaded = [cache.image(r) for r in chunk]
        images = pad_batch(loaded, multiple if geometry.aspect else 1).to(device)
        # each model scores its own instances (Mask2Former: class x mask probability;
        # Grounding DINO + SAM: the box score), so go through its predict()
        preds = model.predict(images, score_threshold=cfg.score_threshold,
                              max_instances=cfg.max_instances, mask_threshold=cfg.mask_threshold,
                              overlapping=overlapping,
                              # only when set: a user's registered model may predate the keyword
                              **({"mask_refiner": refiner} if refiner is not None else {}))
        for rec, img, pred in zip(chunk, loaded, preds):
            yield prediction_to_record(pred, rec, tuple(img.shape[-2:]), class_probs)


def predict_to_jsonl(model: Segmenter, dataset: Dataset, out_path: str | Path,
                     cfg: PseudoLabelConfig | EvaluationConfig, *, input_size: int = 64,
                     batch_size: int = 16, device: str | torch.device = "cpu",
                     progress: bool = False, desc: str = "predict",
                     geometry: InputGeometry | None = None, class_probs: bool = False) -> Path:
    """Stream predictions of every image to ``out_path`` (JSON lines), resumable.

    Returns ``out_path``; if it already exists the work is considered done and nothing runs.
    """
    out_path = Path(out_path)
    if out_path.is_file():
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(out_path)
    done = _done_ids(partial)
    with open(partial, "a") as f:
        for n, rec in enumerate(iter_predictions(model, dataset, cfg, input_size=input_size,
                                                 batch_size=batch_size, device=device,
                                                 skip_ids=done, progress=progress, desc=desc,
                                                 geometry=geometry, class_probs=class_probs)):
            f.write(json.dumps(rec.to_dict()) + "\n")
            if n % 64 == 63:
                f.flush()
                os.fsync(f.fileno())
        f.flush()
        os.fsync(f.fileno())
    partial.replace(out_path)
    return out_path
