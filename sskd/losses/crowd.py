"""Crowd regions in the point-sampled mask losses: neither object nor background.

``transformers``' ``Mask2FormerLoss.loss_masks`` samples points (importance sampling on the
prediction's uncertainty) and scores each matched query's mask there with BCE + dice. A crowd
region (``iscrowd=1``: many objects of a class without instance outlines) is no target, and
calling it background would teach the model that the people in a crowd are not people. So the
points that fall on a crowd region get weight 0: they are left out of the BCE average and of
both sums of the dice. Batches without a crowd region take the unchanged ``transformers`` code
(same random draws, same numbers).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss, sample_point


def ignore_maps(targets: list[dict]) -> list[Tensor] | None:
    """Per-image ``H x W`` float crowd maps of ``targets`` (``"ignore"`` key), None when none."""
    if not any("ignore" in t and bool(t["ignore"].any()) for t in targets):
        return None
    out = []
    for t in targets:
        m = t["masks"]
        ign = t.get("ignore")
        out.append(ign.float().to(m.device) if ign is not None else
                   torch.zeros(m.shape[-2:], device=m.device))
    return out


def masked_point_losses(point_logits: Tensor, point_labels: Tensor, point_weights: Tensor,
                        num_masks: Tensor | float) -> tuple[Tensor, Tensor]:
    """BCE and dice of ``M x P`` point logits/labels, each point weighted (0 = ignored).

    BCE: the weighted mean over each mask's points, summed over masks / ``num_masks``; dice:
    ``1 - (2 sum w p y + 1) / (sum w p + sum w y + 1)``, summed / ``num_masks`` (Mask2Former's
    definitions with weights all 1).
    """
    bce = torch.nn.functional.binary_cross_entropy_with_logits(point_logits, point_labels,
                                                               reduction="none")
    w = point_weights
    bce = ((bce * w).sum(1) / w.sum(1).clamp(min=1e-6)).sum() / num_masks
    probs = point_logits.sigmoid() * w
    labels = point_labels * w
    dice = 1 - (2 * (probs * labels).sum(1) + 1) / (probs.sum(1) + labels.sum(1) + 1)
    return bce, dice.sum() / num_masks


class CrowdAwareMask2FormerLoss(Mask2FormerLoss):
    """``Mask2FormerLoss`` whose ``loss_masks`` skips points on crowd regions (see module doc).

    Use ``with criterion.ignoring(maps): criterion(...)`` (or call ``loss_masks`` inside it);
    ``maps``: one ``H x W`` float map per image (1 = crowd), or None for the unchanged loss.
    """

    _ignore: list[Tensor] | None = None

    @contextlib.contextmanager
    def _setting(self, attr: str, value):
        """``self.<attr> = value`` inside a ``with`` block: per-call inputs of the loss that
        ``Mask2FormerLoss.forward`` has no argument for."""
        setattr(self, attr, value)
        try:
            yield self
        finally:
            setattr(self, attr, None)

    def ignoring(self, maps: list[Tensor] | None):
        return self._setting("_ignore", maps)

    def loss_masks(self, masks_queries_logits: Tensor, mask_labels: list[Tensor], indices,
                   num_masks) -> dict[str, Tensor]:
        if self._ignore is None:
            return super().loss_masks(masks_queries_logits, mask_labels, indices, num_masks)
        src_idx = self._get_predictions_permutation_indices(indices)
        tgt_idx = self._get_targets_permutation_indices(indices)
        pred_masks = masks_queries_logits[src_idx][:, None]
        target_masks, _ = self._pad_images_to_max_in_batch(mask_labels)
        target_masks = target_masks[tgt_idx][:, None]
        ignore = torch.stack(self._ignore)[src_idx[0]][:, None].to(pred_masks)  # per matched mask
        with torch.no_grad():
            coords = self.sample_points_using_uncertainty(
                pred_masks, lambda logits: self.calculate_uncertainty(logits), self.num_points,
                self.oversample_ratio, self.importance_sample_ratio)
            labels = sample_point(target_masks, coords, align_corners=False).squeeze(1)
            # border padding: a crowd touching the image edge stays fully ignored up to the edge
            weights = 1.0 - sample_point(ignore, coords, align_corners=False,
                                         padding_mode="border").squeeze(1)
            weights = weights.masked_fill(weights < 1e-4, 0.0)  # 1 - (~1.0 in float) is 0
        logits = sample_point(pred_masks, coords, align_corners=False).squeeze(1)
        bce, dice = masked_point_losses(logits, labels, weights, num_masks)
        return {"loss_mask": bce, "loss_dice": dice}
