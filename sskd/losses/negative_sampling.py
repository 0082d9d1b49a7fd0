"""Negative sampling for the pixel-wise contrastive loss (docs/method.md, 'The fused negative sampler').

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
  ``R`` largest keys are an exact successive sample. Computed in the equivalent exponential-race
  form (the ``R`` smallest ``E_q / w_q``, ``E ~ Exp(1)``: the same ordering, no logs). It needs
  a key for EVERY candidate, i.e. an ``N x P`` matrix for ``N`` anchors and ``P`` candidate
  pixels, so it runs over chunks of ``c`` anchors (of one image) at a time: peak extra memory
  ~ ``2 * 4 B * c * P`` (weights, keys) + ``P`` B (column mask) + ``8 B * N * R`` (indices),
  with ``c = max(1, chunk_elements // P)`` and ``chunk_elements = max(N R, P, 2**20)`` by
  default, i.e. O(N R) and never the full ``N x P``. Time O(N P M) (``M`` = length of ``y``).
* ``method="rejection"``: because ``0 <= w_q <= 1``, proposing ``q`` uniformly from the ``P``
  pixels and accepting it with probability ``w_q`` draws exactly ``P(q) ∝ w_q``; proposals that
  are not allowed or hit an already accepted pixel are rejected too, which makes the accepted
  sequence an exact successive sample without replacement. Time O(N R M / acceptance) and
  memory ~ ``4 B * 4 * chunk_elements`` per chunk (the gathered ``y`` of ``rows x K`` proposals,
  ``K ~ 1.5 R / acceptance``), both independent of ``P``. Anchors with little allowed weight
  (total ``< 2 R`` or mean acceptance ``< 1/16``) use Gumbel top-k directly; anchors still short
  of ``R`` after ``max_rounds`` rounds continue with Gumbel top-k over the candidates not yet
  drawn (still exact: given its first draws, the rest of a successive sample is a successive
  sample of the remaining candidates). Choose it when ``P`` is large (high-resolution maps).

Not used: a uniformly pre-drawn candidate pool followed by weighted sampling inside the pool. It
is exact only conditionally on the pool (the marginal ``P(q)`` becomes
``E_pool[w_q 1(q in pool) / W_pool]``, not ``w_q / W``), so it biases the distribution.

Zero weights: ``s_deb < 1e-6`` (float32 rounding noise of ``1 - cos`` for equal ``y``) counts
as 0, and zero weights become ``1e-20`` in the keys (such a key never beats a positive weight's),
so a zero-weight candidate is drawn only when fewer than ``R`` candidates have a positive weight, and then uniformly among the
zero-weight ones; an anchor whose weights are ALL zero (its ``y`` equals every candidate's)
therefore falls back to uniform sampling. Such anchors are counted in ``fallback_uniform``.
Slots that cannot be filled at all (fewer than ``R`` allowed candidates) get index ``-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FusedNegativeSampler", "NegativeSample", "SAMPLER_MODES", "CANDIDATE_SETS"]

SAMPLER_MODES = ("fused", "mask_only", "class_only", "uniform")
CANDIDATE_SETS = ("other_images", "batch")
METHODS = ("gumbel", "rejection")
_WEIGHT_FLOOR = 1e-20  # key floor: zero-weight candidates lose to any positive weight
_ZERO_TOL = 1e-6       # s_deb below this is float32 rounding of 1 - cos(y, y) and counts as 0
_ONE = torch.ones(1)


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
                 max_rounds: int = 16) -> None:
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
        if self.method == "rejection":
            return self._rejection(y, pixel_image, anchors, valid)
        return self._gumbel(y, pixel_image, anchors, valid)

    # ------------------------------------------------------------------------------ gumbel
    def _gumbel(self, y: torch.Tensor | None, pixel_image: torch.Tensor, anchors: torch.Tensor,
                valid: torch.Tensor, exclude: torch.Tensor | None = None) -> NegativeSample:
        """Exact Gumbel top-k over the full candidate set, chunked over anchors of one image.

        ``exclude``: optional ``N x E`` flat indices (``-1`` = none) also forbidden per anchor.
        Chunks never mix images, so the excluded columns are one ``P`` row mask per chunk
        (plus single entries), not a ``c x P`` boolean matrix.
        """
        R = self.num_negatives
        N, P = anchors.numel(), pixel_image.numel()
        budget = self.chunk_elements or max(N * R, P, 1 << 20)
        chunk = max(1, budget // P)
        k = min(R, P)
        out = anchors.new_full((N, R), -1)
        fallback = 0
        img = pixel_image[anchors]
        order = torch.argsort(img, stable=True)
        bounds = torch.searchsorted(img[order], torch.unique(img), right=True).tolist()
        start = 0
        for end in bounds:                                      # one image at a time
            b = int(img[order[start]])
            colmask = ~valid
            if self.candidates == "other_images":
                colmask = colmask | (pixel_image == b)
            for s in range(start, end, chunk):
                sel = order[s:min(end, s + chunk)]
                rows = anchors[sel]
                c = rows.numel()
                # single excluded entries: the anchor itself ("batch"), earlier draws (`exclude`)
                r_ex, c_ex = torch.arange(c, device=rows.device), rows
                if exclude is not None:
                    e = exclude[sel]
                    r2, k2 = (e >= 0).nonzero(as_tuple=True)
                    r_ex, c_ex = torch.cat([r_ex, r2]), torch.cat([c_ex, e[r2, k2]])
                # Exponential race, the same ordering as Gumbel top-k on log w: E_q / w_q with
                # E ~ Exp(1); the R smallest are an exact successive sample.
                # E = -log(u), u in [2**-25, 1): finite and > 0 (rand + log is ~5x faster
                # than exponential_ on CPU).
                keys = torch.rand(c, P, generator=self.generator, device=rows.device)
                keys.clamp_(min=2.0 ** -25).log_().neg_()
                if y is not None:
                    w = torch.addmm(_ONE.to(y.device), y[rows], y.T, alpha=-1.0)  # 1 - <y_a, y_q>
                    w.masked_fill_(colmask, 0.0)
                    w[r_ex, c_ex] = 0.0
                    fallback += int((w.amax(1) < _ZERO_TOL).sum())
                    keys.div_(w.masked_fill_(w < _ZERO_TOL, _WEIGHT_FLOOR))
                    del w
                keys.masked_fill_(colmask, float("inf"))
                keys[r_ex, c_ex] = float("inf")
                val, idx = keys.topk(k, dim=1, largest=False)   # sorted: j-th successive draw
                idx[val == float("inf")] = -1                   # fewer allowed candidates than R
                out[sel, :k] = idx
            start = end
        return NegativeSample(out, fallback)

    # ------------------------------------------------------------------------------ rejection
    def _allowed_mass(self, y: torch.Tensor | None, pixel_image: torch.Tensor,
                      anchors: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``N`` float: total weight ``sum_q s_deb(a, q)`` over each anchor's allowed candidates.

        Exact in O((P + N) M) because ``s_deb = 1 - <y_a, y_q>`` is linear in ``y_q`` (the
        ``max(0, .)`` never clips for non-negative unit vectors): ``count - <y_a, sum_q y_q>``.
        """
        B = int(pixel_image.max()) + 1
        vf = valid.float()
        n_img = torch.zeros(B, device=vf.device).index_add_(0, pixel_image, vf)
        img = pixel_image[anchors]
        if self.candidates == "other_images":
            count = vf.sum() - n_img[img]
        else:
            count = vf.sum() - vf[anchors]
        if y is None:
            return count
        s_img = torch.zeros(B, y.shape[1], device=y.device).index_add_(0, pixel_image,
                                                                       y * vf[:, None])
        ya = y[anchors]
        if self.candidates == "other_images":
            s = s_img.sum(0) - s_img[img]
        else:
            s = s_img.sum(0) - ya * vf[anchors][:, None]
        return (count - (ya * s).sum(1)).clamp(min=0)

    def _excluded_pairs(self, rows: torch.Tensor, pixel_image: torch.Tensor, prop: torch.Tensor,
                        valid: torch.Tensor) -> torch.Tensor:
        """``n x K`` bool: proposal ``prop[i, k]`` is not allowed for anchor ``rows[i]``."""
        if self.candidates == "other_images":
            ex = pixel_image[prop] == pixel_image[rows][:, None]
        else:
            ex = prop == rows[:, None]
        return ex | ~valid[prop]

    def _rejection(self, y: torch.Tensor | None, pixel_image: torch.Tensor,
                   anchors: torch.Tensor, valid: torch.Tensor) -> NegativeSample:
        """Exact successive sampling by uniform proposals accepted with probability ``w``.

        Anchors with little allowed weight (total ``< 2 R`` or mean acceptance ``< 1/16``) and
        anchors still short of ``R`` negatives after ``max_rounds`` continue with Gumbel top-k
        on the candidates not yet drawn, which keeps the successive sample exact.
        """
        R = self.num_negatives
        N, P = anchors.numel(), pixel_image.numel()
        acc_all = self._allowed_mass(y, pixel_image, anchors, valid)
        use = (acc_all >= 2 * R) & (acc_all >= P / 16)
        acc = acc_all / P                                  # acceptance of one uniform proposal
        out = anchors.new_full((N, R), -1)
        filled = torch.zeros(N, dtype=torch.long, device=anchors.device)
        sel = use.nonzero().flatten()
        if sel.numel():
            K = int(math.ceil(1.5 * R / float(acc[sel].min()))) + 8  # proposals per round
            M = 1 if y is None else y.shape[1]
            budget = self.chunk_elements or max(N * R, P, 1 << 20)
            rows = max(1, 4 * budget // (K * (M + 2)))     # gathered y: rows x K x M floats
            for s in range(0, sel.numel(), rows):
                part = sel[s:s + rows]
                out[part], filled[part] = self._rounds(y, pixel_image, anchors[part], valid, K)
        rest = (filled < R).nonzero().flatten()
        fallback = 0
        if rest.numel():
            more = self._gumbel(y, pixel_image, anchors[rest], valid, exclude=out[rest])
            fallback = more.fallback_uniform
            src = torch.arange(R, device=out.device)[None] - filled[rest][:, None]
            cont = more.index.gather(1, src.clamp(min=0))  # Gumbel draws continue after `filled`
            out[rest] = torch.where(src >= 0, cont, out[rest])
        return NegativeSample(out, fallback)

    def _rounds(self, y, pixel_image, rows, valid, K) -> tuple[torch.Tensor, torch.Tensor]:
        """Proposal rounds for anchors ``rows``: ``(n x R negatives (-1 = unfilled), n filled)``."""
        R, P, g = self.num_negatives, pixel_image.numel(), self.generator
        dev = rows.device
        out = rows.new_full((rows.numel(), R), -1)
        filled = torch.zeros(rows.numel(), dtype=torch.long, device=dev)
        for _ in range(self.max_rounds):
            act = (filled < R).nonzero().flatten()
            if act.numel() == 0:
                break
            a = rows[act]
            prop = torch.randint(P, (act.numel(), K), generator=g, device=dev)
            ok = ~self._excluded_pairs(a, pixel_image, prop, valid)
            if y is not None:
                w = _s_deb(torch.einsum("nm,nkm->nk", y[a], y[prop]))
                ok &= torch.rand(w.shape, generator=g, device=dev) < w
            # A hit on a pixel accepted before (earlier round or earlier in this round) is
            # rejected: the accepted sequence is then an exact successive sample.
            prev = out[act]
            first = _first_occurrence(torch.cat([prev, prop], 1),
                                      torch.cat([prev >= 0, ok], 1))[:, R:]
            rank = first.long().cumsum(1) - 1
            need = R - filled[act]
            take = first & (rank < need[:, None])
            r, k = take.nonzero(as_tuple=True)
            out[act[r], filled[act][r] + rank[r, k]] = prop[r, k]
            filled[act] += take.sum(1)
        return out, filled


def _s_deb(sim: torch.Tensor) -> torch.Tensor:
    """In place: cosine of the y's -> ``1 - sim``, with values below 1e-6 (rounding noise) -> 0."""
    w = sim.neg_().add_(1.0)
    return w.masked_fill_(w < _ZERO_TOL, 0.0)


def _first_occurrence(seq: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``n x L`` bool: ``ok[i, j]`` and no ``ok`` entry before ``j`` in row ``i`` equals ``seq[i, j]``."""
    n, L = seq.shape
    big = int(seq.max()) + 1 if seq.numel() else 1
    pos = torch.arange(L, device=seq.device)
    # Sort by (value, position) with every non-ok entry after all ok ones; an ok entry repeats a
    # value iff its predecessor in that order is ok with the same value.
    order = (torch.where(ok, seq, big) * L + pos).argsort(dim=1)
    sv = torch.gather(torch.where(ok, seq, -1), 1, order)
    so = torch.gather(ok, 1, order)
    rep = torch.zeros_like(ok)
    rep[:, 1:] = so[:, 1:] & so[:, :-1] & (sv[:, 1:] == sv[:, :-1])
    dup = torch.zeros_like(ok).scatter_(1, order, rep)
    return ok & ~dup
