"""Set-prediction loss of the Grounding DINO + SAM teacher (stage-1 adaptation).

Hungarian matching of the ``Q`` detector queries to the ``N`` targets of each image on a cost
that mixes class, box and mask terms; then, on the matches:

* class: sigmoid focal loss on the per-class logits (Grounding DINO's classification loss, at
  class rather than token level), all queries, unmatched ones pushed to "no class";
* box: L1 + generalised IoU on normalised ``cx, cy, w, h`` (DETR / Grounding DINO);
* mask: point-sampled BCE + dice (``transformers``' Mask2FormerLoss with importance sampling);
* mask quality: MSE between SAM's predicted IoU and the IoU of its mask with the target (this
  is what trains SAM's IoU head, so every trainable mask-decoder weight gets a gradient).

Pieces reused from ``transformers``: ``sigmoid_focal_loss`` (Grounding DINO), box conversions
and ``generalized_box_iou`` (DETR), ``Mask2FormerLoss.loss_masks`` and the pair-wise mask costs.
Targets with zero instances give a finite loss (class term only; the rest is 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from transformers import Mask2FormerConfig
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import generalized_box_iou
from transformers.loss.loss_grounding_dino import sigmoid_focal_loss
from transformers.models.mask2former.modeling_mask2former import (
    pair_wise_dice_loss, pair_wise_sigmoid_cross_entropy_loss, sample_point)

from sskd.losses.crowd import CrowdAwareMask2FormerLoss, ignore_maps


@dataclass
class LossWeights:
    """Weights of the loss terms (also used as matching-cost weights, as DETR-style models do)."""

    cls: float = 2.0      # sigmoid focal class loss (Grounding DINO: 2.0)
    bbox: float = 5.0     # L1 on normalised boxes (Grounding DINO: 5.0)
    giou: float = 2.0     # 1 - GIoU (Grounding DINO: 2.0)
    mask: float = 5.0     # point-sampled mask BCE (Mask2Former: 5.0)
    dice: float = 5.0     # point-sampled dice (Mask2Former: 5.0)
    iou: float = 1.0      # MSE of SAM's predicted mask IoU
    focal_alpha: float = 0.25  # focal-loss alpha (positives' weight)


@lru_cache(maxsize=8)
def _mask_criterion(num_points: int) -> CrowdAwareMask2FormerLoss:
    """Mask2Former's loss object, used only for ``loss_masks`` (point sampling + BCE + dice;
    points on crowd regions left out, see :mod:`sskd.losses.crowd`)."""
    cfg = Mask2FormerConfig(num_labels=1, train_num_points=num_points, oversample_ratio=3.0,
                            importance_sample_ratio=0.75)
    return CrowdAwareMask2FormerLoss(cfg, weight_dict={})


def masks_to_boxes_cxcywh(masks: torch.Tensor) -> torch.Tensor:
    """``N x H x W`` binary masks -> ``N x 4`` tight boxes ``cx, cy, w, h`` normalised to [0, 1].

    A pixel covers ``[x, x + 1)``, so a one-pixel mask has width ``1 / W``; empty masks give 0s.
    """
    n, h, w = masks.shape
    if n == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    m = masks > 0.5
    ys, xs = m.any(2), m.any(1)                          # N x H, N x W
    ar_y = torch.arange(h, device=masks.device, dtype=torch.float32)
    ar_x = torch.arange(w, device=masks.device, dtype=torch.float32)
    big = float(max(h, w) + 1)
    y0 = torch.where(ys, ar_y, big).amin(1)
    y1 = torch.where(ys, ar_y, -1.0).amax(1) + 1
    x0 = torch.where(xs, ar_x, big).amin(1)
    x1 = torch.where(xs, ar_x, -1.0).amax(1) + 1
    boxes = torch.stack([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h], 1)
    return torch.where(m.flatten(1).any(1, keepdim=True), boxes, torch.zeros_like(boxes))


@torch.no_grad()
def hungarian_match(class_logits: torch.Tensor, pred_boxes: torch.Tensor, mask_logits: torch.Tensor,
                    labels: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor,
                    weights: LossWeights, num_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Match one image's queries to its targets on class + box + mask cost.

    ``class_logits``: ``Q x C`` sigmoid logits; ``pred_boxes``: ``Q x 4`` cxcywh; ``mask_logits``:
    ``Q x h x w``; ``labels``: ``N``; ``boxes``: ``N x 4``; ``masks``: ``N x H x W``.
    Returns (query indices, target indices), each ``min(Q, N)`` long.
    """
    prob = class_logits.float().sigmoid()[:, labels]                      # Q x N
    a, g = weights.focal_alpha, 2.0
    pos = a * (1 - prob) ** g * -(prob + 1e-8).log()
    neg = (1 - a) * prob ** g * -(1 - prob + 1e-8).log()
    cost = weights.cls * (pos - neg)
    cost = cost + weights.bbox * torch.cdist(pred_boxes.float(), boxes, p=1)
    cost = cost - weights.giou * generalized_box_iou(center_to_corners_format(pred_boxes.float()),
                                                     center_to_corners_format(boxes))
    pts = torch.rand(1, num_points, 2, device=mask_logits.device)
    pred_pts = sample_point(mask_logits[:, None].float(), pts.expand(mask_logits.shape[0], -1, -1),
                            align_corners=False).squeeze(1)              # Q x P
    tgt_pts = sample_point(masks[:, None].float(), pts.expand(masks.shape[0], -1, -1),
                           align_corners=False).squeeze(1)               # N x P
    cost = cost + weights.mask * pair_wise_sigmoid_cross_entropy_loss(pred_pts, tgt_pts)
    cost = cost + weights.dice * pair_wise_dice_loss(pred_pts, tgt_pts)
    cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8).cpu()
    q, t = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(q, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)


def set_prediction_loss(class_logits: torch.Tensor, pred_boxes: torch.Tensor,
                        mask_logits: torch.Tensor, iou_scores: torch.Tensor, targets: list[dict],
                        weights: LossWeights | None = None,
                        num_points: int = 12544) -> dict[str, torch.Tensor]:
    """Losses of a batch: ``class_logits`` ``B x Q x (C+1)`` (last column = no-object, unused:
    the class loss is per-class sigmoid focal), ``pred_boxes`` ``B x Q x 4`` cxcywh in [0, 1],
    ``mask_logits`` ``B x Q x h x w``, ``iou_scores`` ``B x Q``; ``targets`` as in
    :mod:`sskd.models.base` (masks ``N x H x W``, labels ``N``, optional ``ignore`` ``H x W``
    crowd regions: no target, and left out of the mask and mask-quality losses).

    Returns ``loss_class, loss_bbox, loss_giou, loss_mask, loss_dice, loss_iou`` and the
    weighted total ``loss``. Sums are normalised by the number of target instances (>= 1).
    """
    w = weights or LossWeights()
    B, Q, C1 = class_logits.shape
    C = C1 - 1
    if len(targets) != B:
        raise ValueError(f"got {len(targets)} targets for a batch of {B} images")
    logits = class_logits[..., :C].float()
    tgt_boxes, tgt_masks, indices = [], [], []
    for b, t in enumerate(targets):
        masks, labels = t["masks"].float(), t["labels"].long().to(logits.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= C):
            raise ValueError(f"target labels of image {b} must lie in [0, {C}), got "
                             f"{labels.tolist()}; check the class map of the dataset/pseudo-labels")
        boxes = masks_to_boxes_cxcywh(masks).to(logits.device)
        tgt_boxes.append(boxes), tgt_masks.append(masks.to(logits.device))
        if labels.numel() == 0:
            indices.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
        else:
            indices.append(hungarian_match(logits[b], pred_boxes[b], mask_logits[b], labels, boxes,
                                           tgt_masks[-1], w, num_points))
    num = max(sum(len(t["labels"]) for t in targets), 1)

    onehot = torch.zeros_like(logits)
    for b, (q, t) in enumerate(indices):
        onehot[b, q.to(logits.device), targets[b]["labels"].long().to(logits.device)[t]] = 1.0
    losses = {"loss_class": sigmoid_focal_loss(logits, onehot, num, alpha=w.focal_alpha, gamma=2)}

    bi = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)]).to(logits.device)
    qi = torch.cat([q for q, _ in indices]).to(logits.device)
    if qi.numel() == 0:  # no instance in the whole batch: keep the graph, contribute 0
        zero = (pred_boxes.sum() + mask_logits.sum() + iou_scores.sum()) * 0.0
        losses.update(loss_bbox=zero, loss_giou=zero, loss_mask=zero, loss_dice=zero, loss_iou=zero)
    else:
        src = pred_boxes[bi, qi].float()
        tgt = torch.cat([tb[t.to(tb.device)] for tb, (_, t) in zip(tgt_boxes, indices)])
        losses["loss_bbox"] = F.l1_loss(src, tgt, reduction="sum") / num
        giou = generalized_box_iou(center_to_corners_format(src), center_to_corners_format(tgt))
        losses["loss_giou"] = (1 - torch.diag(giou)).sum() / num
        ignore = ignore_maps(targets)
        with _mask_criterion(num_points).ignoring(ignore) as crit:
            m = crit.loss_masks(mask_logits.float(), tgt_masks,
                                [(q.to(logits.device), t.to(logits.device)) for q, t in indices],
                                num)
        losses["loss_mask"], losses["loss_dice"] = m["loss_mask"], m["loss_dice"]
        matched = [tm[t.to(tm.device)] for tm, (_, t) in zip(tgt_masks, indices)]
        crowd = None if ignore is None else torch.stack(ignore).to(logits.device)[bi] > 0.5
        losses["loss_iou"] = _iou_loss(mask_logits[bi, qi], iou_scores[bi, qi], matched, num,
                                       crowd)
    losses["loss"] = (w.cls * losses["loss_class"] + w.bbox * losses["loss_bbox"]
                      + w.giou * losses["loss_giou"] + w.mask * losses["loss_mask"]
                      + w.dice * losses["loss_dice"] + w.iou * losses["loss_iou"])
    return losses


def _iou_loss(mask_logits: torch.Tensor, iou_pred: torch.Tensor, tgt_masks: list[torch.Tensor],
              num: int, crowd: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between predicted and actual IoU of the matched masks (``M x h x w`` vs targets);
    ``crowd``: ``M x H x W`` bool pixels that count for neither (crowd regions)."""
    tgt = torch.cat(tgt_masks) > 0.5                                     # M x H x W
    with torch.no_grad():
        pred = F.interpolate(mask_logits[:, None].float(), size=tgt.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0] > 0
        if crowd is not None:
            pred = pred & ~crowd
        inter = (pred & tgt).flatten(1).sum(1).float()
        union = (pred | tgt).flatten(1).sum(1).float()
        actual = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return F.mse_loss(iou_pred.float(), actual, reduction="sum") / num
