"""Soft class targets in Mask2Former's set-prediction loss (``stages.<stage>.soft_classes``).

A hard pseudo-label keeps the teacher's first class choice. When that choice is often wrong
but the teacher's distribution still ranks the right class high (its AP comes from that
ranking), the student learns more from the distribution: each matched query's class target
is the teacher's ``p(c | object)`` for that mask instead of a one-hot vector. Unmatched
queries keep the no-object target and the Hungarian matching keeps the hard class, so masks
and assignments are trained exactly as before; only the class term's target changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sskd.losses.crowd import CrowdAwareMask2FormerLoss


def soft_class_cross_entropy(logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
    """Weighted cross-entropy of ``M x C`` logits against ``M x C`` target distributions.

    ``sum_i sum_c w_c q_ic (-log p_ic) / sum_i sum_c w_c q_ic``: for one-hot ``q`` this is
    ``torch.nn.functional.cross_entropy(logits, labels, weight)`` (its weighted mean), so soft
    and hard targets are on one scale and the no-object weight keeps its meaning.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    w = targets if weight is None else targets * weight
    nll = -(w * logits.log_softmax(-1)).sum()
    return nll / w.sum().clamp(min=1e-12)


class SoftClassMask2FormerLoss(CrowdAwareMask2FormerLoss):
    """:class:`CrowdAwareMask2FormerLoss` whose class term can take soft targets.

    ``with criterion.soft_targets(probs): criterion(...)``; ``probs``: one ``N_i x K`` tensor
    per image (rows sum to 1; a one-hot row is a hard label), or None for the unchanged loss.
    """

    _soft: list[Tensor] | None = None

    def soft_targets(self, probs: list[Tensor] | None):
        return self._setting("_soft", probs)

    def loss_labels(self, class_queries_logits: Tensor, class_labels: list[Tensor],
                    indices) -> dict[str, Tensor]:
        if self._soft is None:
            return super().loss_labels(class_queries_logits, class_labels, indices)
        B, Q, K1 = class_queries_logits.shape
        target = class_queries_logits.new_zeros(B, Q, K1)
        target[..., -1] = 1.0  # unmatched queries: no object
        idx = self._get_predictions_permutation_indices(indices)
        matched = torch.cat([p[j] for p, (_, j) in zip(self._soft, indices)]).to(target)
        target[idx] = torch.cat([matched, matched.new_zeros(len(matched), 1)], -1)
        loss = soft_class_cross_entropy(class_queries_logits.reshape(-1, K1),
                                        target.reshape(-1, K1), self.empty_weight.to(target))
        return {"loss_cross_entropy": loss}
