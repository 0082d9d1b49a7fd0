"""Negative sampling for the pixel-wise contrastive loss (PAPER.md, "debiased, instance-aware").

Every anchor pixel ``a`` draws ``R`` negatives WITHOUT replacement from the candidate pixels ``q``
of the batch, with probability proportional to

    s_deb(a, q) = max(0, 1 - <y~_a, y~_q>)

where ``y~`` are the L2-normalised non-negative pseudo-probability vectors of
:func:`sskd.losses.pixel_contrastive.fused_pseudo_probabilities`; ``<y~_a, y~_q>`` lies in
``[0, 1]``, so ``s_deb`` does too. Pixels that look like the anchor's own instance (similar
``y``) are rarely drawn. ``mode="uniform"`` uses equal weights.

Candidates (``candidates=``): ``"other_images"`` (default, as in the paper's implementation):
pixels of the other images of the batch; ``"batch"``: every pixel of the batch except the
anchor's own location (that pixel is its positive). Invalid pixels (``valid=False``, e.g. the
zero padding of :func:`sskd.data.views.make_views`) are never candidates.

Sampling method: "without replacement, proportional to w" means successive sampling: the first
negative is drawn with ``P(q) = w_q / sum w``, the next one the same way among the rest, and so
on. Two exact implementations:

* ``method="gumbel"`` (Gumbel top-k): keys ``log w_q + G_q`` with i.i.d. Gumbel noise ``G``; the
  ``R`` largest keys are an exact successive sample. It needs a key for EVERY candidate, i.e.
  an ``N x P`` matrix for ``N`` anchors and ``P`` candidate pixels, so it runs over chunks of
  ``c`` anchors at a time: peak extra memory ~ ``2 * 4 B * c * P`` (float sims/keys) +
  ``c * P`` B (exclusion mask) + ``8 B * N * R`` (indices), with
  ``c = max(1, chunk_elements // P)`` and ``chunk_elements = max(N * R, P, 2**20)`` by default,
  i.e. O(N R) (never the full N x P). Time is O(N P M) (``M`` = length of ``y``).
* ``method="rejection"``: because ``0 <= w_q <= 1``, proposing ``q`` uniformly and accepting it
  with probability ``w_q`` draws exactly ``P(q) ∝ w_q``; proposals that hit an already accepted
  pixel are rejected too, which turns the accepted sequence into an exact successive sample
  without replacement. Memory and time O(N R M / acceptance), independent of ``P``; rounds of
  proposals are repeated until every anchor has ``R`` negatives (or gives up after
  ``max_rounds``, then fills the rest with the Gumbel method).

Not used: a uniformly pre-drawn candidate pool followed by weighted sampling inside the pool. It
is exact only conditionally on the pool (the marginal ``P(q)`` becomes
``E_pool[w_q 1(q in pool) / W_pool]``, not ``w_q / W``), so it biases the distribution.

Zero weights: weights are floored at ``1e-20`` for the Gumbel keys, so a zero-weight candidate is
drawn only when fewer than ``R`` candidates have a positive weight, and then uniformly among the
zero-weight ones; an anchor whose weights are ALL zero (its ``y`` equals every candidate's)
therefore falls back to uniform sampling. Such anchors are counted in ``fallback_uniform``.
Slots that cannot be filled at all (fewer than ``R`` allowed candidates) get index ``-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FusedNegativeSampler", "NegativeSample", "SAMPLER_MODES", "CANDIDATE_SETS"]

SAMPLER_MODES = ("fused", "mask_only", "class_only", "uniform")
CANDIDATE_SETS = ("other_images", "batch")
METHODS = ("gumbel",)  # "rejection": see below, not yet enabled
_WEIGHT_FLOOR = 1e-20  # log-weight floor: zero-weight candidates lose to any positive weight


@dataclass
class NegativeSample:
    """Negatives drawn for ``N`` anchors."""

    index: torch.Tensor           # N x R long: flat candidate index into B*h*w, -1 = unfilled slot
    fallback_uniform: int         # anchors whose weights were all zero (sampled uniformly)


class FusedNegativeSampler:
    """Draws ``R`` negatives per anchor without replacement, ``P(q) ∝ max(0, 1 - <y~_a, y~_q>)``.

    Args:
        mode: ``"fused"`` | ``"mask_only"`` | ``"class_only"`` (weighted by ``s_deb`` of the given
            ``y``; the mode only says which ``y`` the caller built) or ``"uniform"`` (equal weights).
        num_negatives: ``R``, negatives per anchor.
        generator: source of randomness (same state -> same negatives); ``None`` = torch default.
        candidates: ``"other_images"`` | ``"batch"`` (see module docstring).
        method: ``"gumbel"`` | ``"rejection"`` (both exact; see module docstring).
        chunk_elements: Gumbel chunk budget in matrix elements (``None`` = ``max(N R, P, 2**20)``).
        max_rounds: rejection method: proposal rounds before the Gumbel fallback.
    """

    def __init__(self, mode: str = "fused", num_negatives: int = 200,
                 generator: torch.Generator | None = None, *, candidates: str = "other_images",
                 method: str = "gumbel", chunk_elements: int | None = None,
                 max_rounds: int = 64) -> None:
        if mode not in SAMPLER_MODES:
            raise ValueError(f"sampler mode {mode!r} unknown; use one of {SAMPLER_MODES} "
                             "(config key pixel_contrast.sampler)")
        if candidates not in CANDIDATE_SETS:
            raise ValueError(f"candidates {candidates!r} unknown; use one of {CANDIDATE_SETS}")
        if method not in METHODS:
            raise ValueError(f"method {method!r} unknown; use one of {METHODS}")
        if int(num_negatives) < 1:
            raise ValueError(f"num_negatives must be >= 1 (config key pixel_contrast."
                             f"num_negatives), got {num_negatives!r}")
        self.mode = mode
        self.num_negatives = int(num_negatives)
        self.generator = generator
        self.candidates = candidates
        self.method = method
        self.chunk_elements = chunk_elements
        self.max_rounds = int(max_rounds)

    def __repr__(self) -> str:
        return (f"FusedNegativeSampler(mode={self.mode!r}, R={self.num_negatives}, "
                f"candidates={self.candidates!r}, method={self.method!r})")

    # ------------------------------------------------------------------------------ public
    @torch.no_grad()
    def sample(self, y: torch.Tensor | None, pixel_image: torch.Tensor, anchors: torch.Tensor,
               valid: torch.Tensor | None = None) -> NegativeSample:
        """Draw negatives.

        Args:
            y: ``P x M`` L2-normalised non-negative vectors of all ``P = B*h*w`` pixels (flat),
                or ``None`` for ``mode="uniform"``.
            pixel_image: ``P`` long, the batch image of each pixel.
            anchors: ``N`` long, flat pixel index of each anchor.
            valid: ``P`` bool, pixels allowed as candidates (``None`` = all).

        Returns:
            :class:`NegativeSample` with ``index``: ``N x R`` long (``-1`` = unfilled).
        """
        P = pixel_image.numel()
        if self.mode != "uniform":
            if y is None:
                raise ValueError(f"sampler mode {self.mode!r} needs the pseudo-probabilities y "
                                 "(fused_pseudo_probabilities); pass y or use mode='uniform'")
            if y.ndim != 2 or y.shape[0] != P:
                raise ValueError(f"y must be P x M with P = {P} pixels, got {tuple(y.shape)}")
            y = y.float()
        else:
            y = None
        if valid is None:
            valid = torch.ones(P, dtype=torch.bool, device=pixel_image.device)
        R = self.num_negatives
        if anchors.numel() == 0:
            return NegativeSample(anchors.new_empty((0, R)), 0)
        return self._gumbel(y, pixel_image, anchors, valid)

    # ------------------------------------------------------------------------------ helpers
    def _excluded(self, rows: torch.Tensor, pixel_image: torch.Tensor, cols: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
        """``c x K`` bool: candidate ``cols[k]`` is not allowed for anchor ``rows[i]``."""
        if self.candidates == "other_images":
            ex = pixel_image[rows][:, None] == pixel_image[cols][None, :]
        else:
            ex = rows[:, None] == cols[None, :]
        return ex | ~valid[cols][None, :]


    def _gumbel(self, y: torch.Tensor | None, pixel_image: torch.Tensor, anchors: torch.Tensor,
                valid: torch.Tensor, exclude: torch.Tensor | None = None) -> NegativeSample:
        """Exact Gumbel top-k over the full candidate set, chunked over anchors.

        ``exclude``: optional ``N x E`` flat indices (``-1`` = none) also forbidden per anchor.
        """
        R = self.num_negatives
        N, P = anchors.numel(), pixel_image.numel()
        budget = self.chunk_elements or max(N * R, P, 1 << 20)
        chunk = max(1, budget // P)
        cols = torch.arange(P, device=anchors.device)
        k = min(R, P)
        out = anchors.new_full((N, R), -1)
        fallback = 0
        for s in range(0, N, chunk):
            rows = anchors[s:s + chunk]
            ex = self._excluded(rows, pixel_image, cols, valid)          # c x P bool
            if exclude is not None:
                e = exclude[s:s + chunk]
                r, c = (e >= 0).nonzero(as_tuple=True)
                ex[r, e[r, c]] = True
            if y is None:
                keys = torch.zeros(rows.numel(), P, device=anchors.device)
            else:
                keys = (y[rows] @ y.T).neg_().add_(1.0).clamp_(min=0.0)  # c x P s_deb
                keys.masked_fill_(ex, 0.0)
                fallback += int((keys.amax(1) <= 0).sum())
                keys.clamp_(min=_WEIGHT_FLOOR).log_()
            noise = torch.empty_like(keys).exponential_(generator=self.generator)
            keys.sub_(noise.log_())            # log w - log E(1)  ==  log w + Gumbel(0, 1)
            del noise
            keys.masked_fill_(ex, float("-inf"))
            val, idx = keys.topk(k, dim=1)     # sorted: column j = (j+1)-th successive draw
            idx[val == float("-inf")] = -1     # fewer allowed candidates than R
            out[s:s + chunk, :k] = idx
        return NegativeSample(out, fallback)
