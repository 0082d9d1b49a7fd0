"""The instance-aware pixel-wise contrastive loss L_pxl (docs/method.md) and its diagnostics.

Pipeline of one call of :func:`pixel_contrastive_loss`:

1. ``num_anchors`` anchor pixels per image, drawn uniformly without replacement (valid pixels
   only);
2. ``R`` negatives per anchor from :class:`FusedNegativeSampler` (``P(q) ∝ s_deb``, see
   :mod:`sskd.losses.negative_sampling`), using the pseudo-probabilities ``y`` of
   :func:`fused_pseudo_probabilities`;
3. NT-Xent on L2-normalised embeddings, the strong branch under stop-gradient:
   ``L = -mean_a log( exp(s+_a) / (exp(s+_a) + sum_r exp(s-_ar)) )``,
   ``s+_a = <z_w(a), z_s(a)> / T`` (same location, other view), ``s-_ar = <z_w(a), z_s(r)> / T``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .negative_sampling import FusedNegativeSampler, NegativeSample

__all__ = ["fused_pseudo_probabilities", "pixel_contrastive_loss", "temperature_at",
           "instance_ids_from_probabilities", "instance_ids_from_masks", "FusedNegativeSampler",
           "NegativeSample", "PSEUDO_MODES"]

PSEUDO_MODES = ("fused", "mask_only", "class_only")


# --------------------------------------------------------------------------- pseudo-probabilities


def fused_pseudo_probabilities(pm: torch.Tensor, pc: torch.Tensor,
                               mode: str = "fused") -> torch.Tensor:
    """Per-pixel pseudo-probability vectors ``y~`` for the debiased negative sampler.

    Args:
        pm: ``B x Q x h x w`` mask probabilities (softmax over the ``Q`` queries at each pixel).
        pc: ``B x Q x (C+1)`` class distribution of each query (last = no-object).
        mode: ``"fused"``: ``y = [P_m || F_c]`` (``M = Q + C + 1``), with
            ``F_c[b, c, p] = sum_k P_m[b, k, p] P_c[b, k, c]``; ``"mask_only"``: ``y = P_m``
            (``M = Q``); ``"class_only"``: ``y = F_c`` (``M = C + 1``).

    Returns:
        ``B x M x h x w`` float, detached, L2-normalised over ``M``. Every entry is
        non-negative, so ``<y~_p, y~_q>`` lies in ``[0, 1]`` (L2, not L1: the inner product of
        two unit vectors is their cosine, 1 for identical distributions). A pixel whose ``y`` is
        all zero stays zero (similarity 0 to everything, i.e. maximal ``s_deb``).
    """
    if mode not in PSEUDO_MODES:
        raise ValueError(f"pseudo-probability mode {mode!r} unknown; use one of {PSEUDO_MODES} "
                         "(the 'uniform' sampler needs no y)")
    if pm.ndim != 4 or pc.ndim != 3 or pm.shape[:2] != pc.shape[:2]:
        raise ValueError(f"pm must be B x Q x h x w and pc B x Q x (C+1) with the same B, Q; got "
                         f"pm {tuple(pm.shape)}, pc {tuple(pc.shape)}")
    pm = pm.detach().float()
    pc = pc.detach().float()
    parts = []
    if mode in ("fused", "mask_only"):
        parts.append(pm)
    if mode in ("fused", "class_only"):
        parts.append(torch.einsum("bkhw,bkc->bchw", pm, pc))   # F_c: B x (C+1) x h x w
    return F.normalize(torch.cat(parts, 1), dim=1)


def instance_ids_from_probabilities(pm: torch.Tensor, pc: torch.Tensor | None = None) -> torch.Tensor:
    """``B x Q x h x w`` (+ ``B x Q x (C+1)``) -> ``B x h x w`` long instance id per pixel.

    The id is the arg-max query at the pixel. With ``pc``, pixels whose arg-max query's most
    likely class is no-object (the last) get ``-1`` (background: never a false negative).
    Ids are per image (compare them only within an image).
    """
    ids = pm.detach().argmax(1)
    if pc is not None:
        bg = pc.detach().argmax(-1) == pc.shape[-1] - 1                # B x Q
        ids = torch.where(torch.gather(bg, 1, ids.flatten(1)).view_as(ids), -1, ids)
    return ids


def instance_ids_from_masks(masks: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """A list of ``B`` ``N_b x H x W`` masks -> ``B x h x w`` long ids (``-1`` = no instance).

    Masks are resized nearest-neighbour to ``size = (h, w)``; where masks overlap the later one
    wins (pseudo-labels are non-overlapping anyway).
    """
    out = torch.full((len(masks), *size), -1, dtype=torch.long)
    for b, m in enumerate(masks):
        if m.numel() == 0:
            continue
        m = F.interpolate(m[None].float(), size=size, mode="nearest-exact")[0] > 0.5
        idx = torch.arange(1, m.shape[0] + 1, device=m.device)[:, None, None]
        out[b] = (m.long() * idx).amax(0).cpu() - 1
    return out.to(masks[0].device) if masks else out


# --------------------------------------------------------------------------- temperature


def temperature_at(step: int, total: int, start: float, end: float,
                   schedule: str = "linear") -> float:
    """Annealed temperature: ``start`` at step 0 -> ``end`` at step ``total`` (held after).

    ``"linear"``: ``start + (end - start) t``; ``"cosine"``:
    ``end + (start - end) (1 + cos(pi t)) / 2``, with ``t = clamp(step / total, 0, 1)``.
    ``start <= 0`` means no annealing (always ``end``), matching ``temperature_start: 0``.
    """
    if start <= 0 or total <= 0:
        return float(end)
    t = min(max(step / total, 0.0), 1.0)
    if schedule == "linear":
        return float(start + (end - start) * t)
    if schedule == "cosine":
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))
    raise ValueError(f"temperature schedule {schedule!r} unknown; use 'linear' or 'cosine'")


# --------------------------------------------------------------------------- loss


def _to_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a ``B x C x H x W`` map to the embedding grid ``size``.

    Float maps (``y``) use area averaging when both sides shrink (each embedding cell sees the
    mean distribution of the pixels it covers) and nearest otherwise; integer/bool maps use
    nearest.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.is_floating_point():
        shrink = x.shape[-2] >= size[0] and x.shape[-1] >= size[1]
        return F.interpolate(x, size=size, mode="area" if shrink else "nearest-exact")
    dtype = x.dtype
    return F.interpolate(x.float(), size=size, mode="nearest-exact").to(dtype)


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Random numbers are drawn on the embeddings' device, so the generator must live there."""
    if generator is not None and torch.device(generator.device).type != torch.device(device).type:
        raise ValueError(f"generator is on {generator.device} but the embeddings are on {device}; "
                         f"pass torch.Generator(device={str(device)!r}).manual_seed(...)")


def _sample_anchors(valid: torch.Tensor, num_anchors: int,
                    generator: torch.Generator | None) -> torch.Tensor:
    """``B x P`` bool -> flat anchor indices (``num_anchors`` per image, uniform, valid only)."""
    B, hw = valid.shape
    k = min(int(num_anchors), hw)
    keys = torch.rand(B, hw, generator=generator, device=valid.device).masked_fill_(~valid, -1.0)
    val, idx = keys.topk(k, dim=1)
    flat = idx + torch.arange(B, device=valid.device)[:, None] * hw
    return flat[val >= 0]


class _NegativeCosine(torch.autograd.Function):
    """``cos[n, r] = <za[n], zs[idx[n, r]]>`` without keeping the ``N x R x D`` gathered ``zs``.

    ``za``: ``N x D`` (with grad), ``zs``: ``P x D`` (no grad), ``idx``: ``N x R`` long.
    Forward and backward gather ``zs`` for a chunk of anchors at a time (``<= 2**20`` gathered
    elements, or one anchor), so memory is O(N R) besides the inputs, not O(N R D).
    """

    @staticmethod
    def forward(ctx, za: torch.Tensor, zs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(za, zs, idx)
        out = za.new_empty(idx.shape)
        for s, e in _chunks(idx, za.shape[1]):
            out[s:e] = torch.einsum("nd,nrd->nr", za[s:e], zs[idx[s:e]])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        za, zs, idx = ctx.saved_tensors
        g = torch.empty_like(za)
        for s, e in _chunks(idx, za.shape[1]):
            g[s:e] = torch.einsum("nr,nrd->nd", grad[s:e], zs[idx[s:e]])
        return g, None, None


def _chunks(idx: torch.Tensor, D: int, budget: int = 1 << 20):
    N, R = idx.shape
    step = max(1, budget // max(1, R * D))
    return [(s, min(N, s + step)) for s in range(0, N, step)]


def pixel_contrastive_loss(z_weak: torch.Tensor, z_strong: torch.Tensor,
                           y: torch.Tensor | None = None, *, num_anchors: int,
                           num_negatives: int, temperature: float,
                           sampler: str | FusedNegativeSampler = "fused",
                           generator: torch.Generator | None = None,
                           instance_ids: torch.Tensor | None = None,
                           pm: torch.Tensor | None = None, pc: torch.Tensor | None = None,
                           class_ids: torch.Tensor | None = None,
                           valid: torch.Tensor | None = None,
                           candidates: str = "other_images",
                           method: str = "gumbel") -> tuple[torch.Tensor, dict]:
    """L_pxl of one batch and its diagnostics.

    Args:
        z_weak: ``B x D x h x w`` weak-view pixel embeddings (gets the gradient).
        z_strong: ``B x D x h x w`` strong-view embeddings (detached inside: stop-gradient).
            Both are L2-normalised over ``D`` inside (a no-op for normalised inputs).
        y: ``B x M x H' x W'`` pseudo-probabilities from :func:`fused_pseudo_probabilities`
            built with the sampler's mode; resized to ``h x w`` if needed (area when shrinking,
            else nearest) and re-normalised. ``None``: built from ``pm``/``pc`` when given;
            not needed for ``sampler="uniform"``.
        num_anchors: anchors per image (uniform without replacement; all pixels if fewer).
        num_negatives: ``R`` negatives per anchor.
        temperature: ``T`` (see :func:`temperature_at` for annealing).
        sampler: ``"fused"`` | ``"mask_only"`` | ``"class_only"`` | ``"uniform"``, or a
            :class:`FusedNegativeSampler` (then ``num_negatives``/``candidates`` are its own).
        generator: randomness of anchors and negatives (same state -> same result); on the
            embeddings' device (``torch.Generator(device=z_weak.device)``).
        instance_ids: ``B x H' x W'`` long, per-image instance id of each pixel, ``-1`` =
            background/unknown; for the FNR. ``None``: arg-max query of ``pm`` (background via
            ``pc``, see :func:`instance_ids_from_probabilities`); without ``pm`` FNR is NaN.
        pm, pc: ``B x Q x h' x w'`` / ``B x Q x (C+1)`` detached probabilities (optional).
        class_ids: ``B x H' x W'`` long class of each pixel (``-1`` = background), optional,
            for ``same_class_rate`` (compared across images).
        valid: ``B x H' x W'`` bool, pixels with image content (``Views.valid``); others are
            neither anchors nor negatives. ``None`` = all valid.
        candidates: ``"other_images"`` (default) | ``"batch"``, see the sampler module.
        method: ``"gumbel"`` (default) | ``"rejection"``: two exact samplers, the second one
            independent of ``h*w`` (faster on large maps), see the sampler module.

    Returns:
        ``(loss, diagnostics)``: ``loss`` a scalar (0 with a graph when no anchor exists);
        ``diagnostics`` (floats unless noted; distance = ``1 - cosine``):

        * ``margin``: mean negative distance - mean positive distance (paper Fig. 3);
        * ``pos_distance``, ``neg_distance``: those two means;
        * ``s_pos``, ``s_neg``: mean ``s+`` and mean ``s-`` (cosine / T);
        * ``fnr``: share of sampled negatives in the anchor's own instance (same image, same id
          ``>= 0``); 0 by construction with ``candidates="other_images"``;
        * ``same_class_rate``: share of negatives with the anchor's class (``class_ids``, ``>= 0``);
        * ``num_anchors`` (int), ``num_negatives`` (mean filled negatives per anchor),
          ``fallback_uniform`` (int, anchors whose weights were all zero);
        * ``anchor_index``: ``N`` long and ``negative_index``: ``N x R`` long tensors, flat
          indices into ``B*h*w`` (``-1`` = unfilled slot), to inspect or recompute the loss.
    """
    if z_weak.ndim != 4 or z_weak.shape != z_strong.shape:
        raise ValueError(f"z_weak and z_strong must both be B x D x h x w with equal shapes, got "
                         f"{tuple(z_weak.shape)} and {tuple(z_strong.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (config key pixel_contrast.temperature), "
                         f"got {temperature!r}")
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1 (config key pixel_contrast.num_anchors), "
                         f"got {num_anchors!r}")
    if isinstance(sampler, str):
        sampler = FusedNegativeSampler(sampler, num_negatives, generator, candidates=candidates,
                                       method=method)
    B, D, h, w = z_weak.shape
    dev = z_weak.device
    size = (h, w)
    _check_generator(generator, dev)
    if sampler.generator is not None:
        _check_generator(sampler.generator, dev)

    # Pseudo-probabilities on the embedding grid, flat: P x M.
    if sampler.mode != "uniform":
        if y is None:
            if pm is None or pc is None:
                raise ValueError(f"sampler {sampler.mode!r} needs y = fused_pseudo_probabilities("
                                 f"pm, pc, mode={sampler.mode!r}) (or pm and pc); pass it or use "
                                 "sampler='uniform'")
            y = fused_pseudo_probabilities(pm, pc, sampler.mode)
        if y.ndim != 4 or y.shape[0] != B:
            raise ValueError(f"y must be B x M x h x w with B = {B}, got {tuple(y.shape)}")
        y = F.normalize(_to_grid(y.detach().float(), size), dim=1)
        y_flat = y.permute(0, 2, 3, 1).reshape(B * h * w, -1)
    else:
        y_flat = None
    valid_flat = (torch.ones(B, h * w, dtype=torch.bool, device=dev) if valid is None
                  else _to_grid(valid[:, None].bool(), size)[:, 0].reshape(B, h * w))
    pixel_image = torch.arange(B, device=dev).repeat_interleave(h * w)

    anchors = _sample_anchors(valid_flat, num_anchors, generator)
    neg: NegativeSample = sampler.sample(y_flat, pixel_image, anchors, valid_flat.flatten())
    idx = neg.index                                                   # N x R, -1 = unfilled
    filled = idx >= 0

    zw = F.normalize(z_weak.float(), dim=1).permute(0, 2, 3, 1).reshape(B * h * w, D)
    zs = F.normalize(z_strong.detach().float(), dim=1).permute(0, 2, 3, 1).reshape(B * h * w, D)
    za = zw[anchors]                                                  # N x D (with grad)
    cos_pos = (za * zs[anchors]).sum(-1)                              # N
    cos_neg = _NegativeCosine.apply(za, zs, idx.clamp(min=0))         # N x R
    logits = torch.cat([cos_pos[:, None], cos_neg], 1) / temperature
    logits = logits.masked_fill(torch.cat([torch.zeros_like(filled[:, :1]), ~filled], 1),
                                float("-inf"))
    per_anchor = torch.logsumexp(logits, 1) - logits[:, 0]
    loss = per_anchor.mean() if anchors.numel() else z_weak.sum() * 0.0

    diag = _diagnostics(cos_pos.detach(), cos_neg.detach(), filled, temperature, anchors, idx,
                        size, instance_ids, pm, pc, class_ids)
    diag.update(num_anchors=int(anchors.numel()), fallback_uniform=int(neg.fallback_uniform),
                anchor_index=anchors, negative_index=idx)
    return loss, diag


def _diagnostics(cos_pos, cos_neg, filled, temperature, anchors, idx, size, instance_ids, pm, pc,
                 class_ids) -> dict:
    nan = float("nan")
    n_neg = int(filled.sum())
    pos_d = float((1 - cos_pos).mean()) if cos_pos.numel() else nan
    neg_d = float((1 - cos_neg)[filled].mean()) if n_neg else nan
    out = {
        "margin": neg_d - pos_d,
        "pos_distance": pos_d,
        "neg_distance": neg_d,
        "s_pos": float(cos_pos.mean() / temperature) if cos_pos.numel() else nan,
        "s_neg": float(cos_neg[filled].mean() / temperature) if n_neg else nan,
        "num_negatives": n_neg / max(1, anchors.numel()),
    }
    hw = size[0] * size[1]
    if instance_ids is None and pm is not None:
        instance_ids = instance_ids_from_probabilities(pm, pc)
    safe = idx.clamp(min=0)
    if instance_ids is not None and n_neg:
        ids = _to_grid(instance_ids[:, None].long(), size).flatten()
        same = (ids[anchors][:, None] == ids[safe]) & (ids[anchors][:, None] >= 0)
        same &= (anchors[:, None] // hw) == (safe // hw)      # instance ids are per image
        out["fnr"] = float(same[filled].float().mean())
    else:
        out["fnr"] = nan
    if class_ids is not None and n_neg:
        cls = _to_grid(class_ids[:, None].long(), size).flatten()
        same = (cls[anchors][:, None] == cls[safe]) & (cls[anchors][:, None] >= 0)
        out["same_class_rate"] = float(same[filled].float().mean())
    else:
        out["same_class_rate"] = nan
    return out
