"""Edge-aware refinement of pseudo-label masks (``pseudo_label.mask_refine``).

A Mask2Former-style teacher draws its masks at stride 4 and upsamples them bilinearly, so every
outline is a smooth blob: corners round off and edges fall up to a few pixels from the object's
colour edge. A guided filter (He, Sun & Tang, "Guided Image Filtering", TPAMI 2013) re-fits
each mask probability map, window by window, as a linear function of the image's colours, so
the map snaps to the colour edges the image has and stays smooth where it has none. Like the
CRF post-processing of weakly supervised segmentation, it uses nothing but the image itself.

``guided_filter`` is the torch-level function; :class:`GuidedMaskRefiner` is the callable
``(images, mask probabilities) -> mask probabilities`` that ``Segmenter.predict`` takes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sskd.config import PseudoLabelConfig

#: ``(images B x 3 x H x W in [0, 1], probabilities B x Q x H x W) -> B x Q x H x W``
MaskRefiner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _box(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean over a ``(2r+1)^2`` window, edges replicated (same size out)."""
    return F.avg_pool2d(F.pad(x, (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Colour guided filter of every channel of ``src`` by one image.

    ``guide``: ``C x H x W`` (C = 1 or 3, values in [0, 1]); ``src``: ``Q x H x W``. Returns
    ``Q x H x W``: per window ``q = a^T I + b`` with ``a = (Sigma + eps U)^-1 cov(I, p)``,
    then ``a`` and ``b`` averaged over the windows covering each pixel. ``eps`` sets which
    edges count: a colour variance well above it is an edge the output follows.
    """
    if guide.dim() != 3 or src.dim() != 3 or guide.shape[-2:] != src.shape[-2:]:
        raise ValueError(f"guided_filter: guide C x H x W and src Q x H x W of one size, got "
                         f"{tuple(guide.shape)} and {tuple(src.shape)}")
    c = guide.shape[0]
    I, p = guide[None].float(), src[None].float()                     # 1 x C, 1 x Q
    mI, mp = _box(I, radius), _box(p, radius)
    cov = torch.stack([_box(I[:, i:i + 1] * p, radius) - mI[:, i:i + 1] * mp
                       for i in range(c)], -1)                         # 1 x Q x H x W x C
    sigma = torch.stack([torch.stack([_box(I[:, i:i + 1] * I[:, j:j + 1], radius)[:, 0]
                                      - mI[:, i] * mI[:, j] for j in range(c)], -1)
                         for i in range(c)], -2)                       # 1 x H x W x C x C
    sigma = sigma + eps * torch.eye(c, dtype=sigma.dtype, device=sigma.device)
    # one C x C inverse per pixel, shared by every mask (solving per mask cost Q times more)
    a = torch.einsum("nhwij,nqhwj->nqhwi", torch.linalg.inv(sigma), cov)  # 1 x Q x H x W x C
    b = mp - (a * mI.permute(0, 2, 3, 1)[:, None]).sum(-1)
    ma = torch.stack([_box(a[..., i], radius) for i in range(c)], -1)
    return ((ma * I.permute(0, 2, 3, 1)[:, None]).sum(-1) + _box(b, radius))[0]


class GuidedMaskRefiner:
    """Mask probabilities re-fitted to the image's colour edges (:func:`guided_filter`),
    one image and at most ``chunk`` masks at a time (memory ~ ``chunk x H x W x 12`` floats)."""

    def __init__(self, radius: int = 4, eps: float = 1e-3, chunk: int = 16) -> None:
        if radius < 1 or not eps > 0:
            raise ValueError(f"GuidedMaskRefiner: radius >= 1 and eps > 0, got {radius}, {eps}")
        self.radius, self.eps, self.chunk = int(radius), float(eps), int(chunk)

    def __call__(self, images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(probs, dtype=torch.float32)
        for b in range(probs.shape[0]):
            for s in range(0, probs.shape[1], self.chunk):
                out[b, s:s + self.chunk] = guided_filter(images[b], probs[b, s:s + self.chunk],
                                                         self.radius, self.eps)
        return out.clamp_(0.0, 1.0)


def mask_refiner(cfg: PseudoLabelConfig) -> MaskRefiner | None:
    """The refiner ``cfg.mask_refine`` names (None for ``none``)."""
    if cfg.mask_refine == "none":
        return None
    if cfg.mask_refine == "guided":
        return GuidedMaskRefiner(cfg.refine_radius, cfg.refine_eps)
    raise ValueError(f"pseudo_label.mask_refine = {cfg.mask_refine!r}: must be none | guided")
