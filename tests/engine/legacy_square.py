"""A frozen copy of the square input path as it was before aspect-preserving inputs existed.

The equality tests build batches and predictions with this code and with the engine's, and
require them to be bit-identical: the synthetic square demo must not change by one bit.
(Only the geometry and caching are copied; the photometric ops did not change.)
"""

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import InterpolationMode

from sskd.data.images import load_image
from sskd.data.views import _photometric, _uniform


def image(record, S):
    img = torch.from_numpy(np.ascontiguousarray(load_image(record.file_name))).permute(2, 0, 1)
    if img.shape[-2:] != (S, S):
        img = F.interpolate(img[None].float(), size=(S, S), mode="bilinear",
                            antialias=True, align_corners=False)[0].round().clamp(0, 255)
    return img.to(torch.uint8).float() / 255.0


def sample(record, S):
    masks = torch.from_numpy(record.masks()) if record.instances else \
        torch.zeros((0, record.height, record.width), dtype=torch.uint8)
    if masks.shape[0] and masks.shape[-2:] != (S, S):
        masks = F.interpolate(masks[None].float(), size=(S, S), mode="nearest")[0]
    masks = masks.reshape(-1, S, S).bool()
    labels = torch.tensor([i.class_id for i in record.instances], dtype=torch.long)
    keep = masks.flatten(1).any(1)
    return image(record, S), masks[keep], labels[keep]


def _geometry(generator, out_size, scale_range, flip_p):
    flip = bool(torch.rand((), generator=generator) < flip_p)
    side = max(1, round(out_size * _uniform(generator, *scale_range)))
    span = side - out_size
    lo, hi = min(0, span), max(0, span)
    top = lo + int(torch.randint(hi - lo + 1, (), generator=generator))
    left = lo + int(torch.randint(hi - lo + 1, (), generator=generator))
    return flip, side, top, left


def _apply_geometry(x, flip, side, top, left, out_size, interpolation):
    if flip:
        x = TF.horizontal_flip(x)
    antialias = interpolation != InterpolationMode.NEAREST_EXACT
    x = TF.resize(x, [side, side], interpolation=interpolation, antialias=antialias)
    return TF.crop(x, top, left, out_size, out_size)


def make_views(image, masks, generator, *, out_size, scale_range=(0.75, 1.25), flip_p=0.5,
               jitter=(0.4, 0.4, 0.4, 0.1), gray_p=0.2, blur_sigma=(0.1, 2.0), blur_p=0.5):
    s = out_size
    flip, side, top, left = _geometry(generator, s, scale_range, flip_p)
    base = TF.resize(image, [s, s], interpolation=InterpolationMode.BILINEAR,
                     antialias=True).clamp(0.0, 1.0)
    weak = _apply_geometry(base, flip, side, top, left, s, InterpolationMode.BILINEAR).clamp(0, 1)
    ones = torch.ones(1, s, s, dtype=torch.bool)
    valid = _apply_geometry(ones, flip, side, top, left, s, InterpolationMode.NEAREST_EXACT)[0]
    strong = _photometric(weak, generator, tuple(jitter), gray_p, blur_sigma, blur_p)
    m = TF.resize(masks.bool(), [s, s], interpolation=InterpolationMode.NEAREST_EXACT,
                  antialias=False)
    m = _apply_geometry(m, flip, side, top, left, s, InterpolationMode.NEAREST_EXACT)
    keep = m.flatten(1).any(1).nonzero().flatten()
    return weak, strong, m[keep], keep, valid


def step_batch(labeled, unlabeled, n_lab, n_unl, seed, step, S, step_seed):
    """The trainer's old per-step batch assembly (one rank)."""
    pick = torch.Generator().manual_seed(step_seed(seed, step, 0))
    lab_idx = torch.randint(len(labeled), (n_lab,), generator=pick).tolist() if n_lab else []
    unl_idx = torch.randint(len(unlabeled), (n_unl,), generator=pick).tolist() if n_unl else []
    slots = [("l", i) for i in lab_idx] + [("u", i) for i in unl_idx]
    weak, strong, valid, targets = [], [], [], []
    for slot, (kind, idx) in enumerate(slots):
        rec = labeled[idx] if kind == "l" else unlabeled[idx]
        img, masks, labels = sample(rec, S)
        g = torch.Generator().manual_seed(step_seed(seed, step, 1 + slot))
        w, s, m, keep, ok = make_views(img, masks, g, out_size=S)
        weak.append(w), strong.append(s), valid.append(ok)
        targets.append({"masks": m.float(), "labels": labels[keep]})
    return torch.stack(weak), torch.stack(strong), torch.stack(valid), targets


def predictions(model, records, S, cfg):
    """The old predict path: square resize, predict, nearest resize back."""
    from sskd.data.records import ImageRecord, Instance
    images = torch.stack([image(r, S) for r in records])
    preds = model.predict(images, score_threshold=cfg.score_threshold,
                          max_instances=cfg.max_instances, mask_threshold=cfg.mask_threshold,
                          overlapping=cfg.overlapping_masks)  # (added with that option)
    out = []
    for rec, pred in zip(records, preds):
        masks = pred.masks
        if masks.shape[0] and masks.shape[-2:] != (rec.height, rec.width):
            masks = F.interpolate(masks[None].float(), size=(rec.height, rec.width),
                                  mode="nearest")[0].bool()
        insts = [Instance.from_mask(m.astype(np.uint8), int(c), score=float(s))
                 for m, c, s in zip(masks.numpy(), pred.class_ids.tolist(), pred.scores.tolist())
                 if m.any()]
        out.append(ImageRecord(rec.file_name, rec.height, rec.width, rec.image_id, insts))
    return out
