"""Image-guided convex upsampling of the stride-4 mask features to the input resolution.

Mask2Former draws its masks at stride 4 and upsamples the logits bilinearly. At the paper's
1024 px that is a 256 x 256 mask; at the offline demo's 64 px it is 16 x 16, and every outline
is a 4-pixel blur (on the demo's target, sharpening the outlines with a guided filter lifted
both stand-ins' AP by 8-10: docs/method.md, "Mask refinement in the demo"). The paper's teacher
takes its masks from SAM, which has no such blur. What this upsampler did in the demo:
docs/method.md, "A full-resolution mask head in the demo".

:class:`ConvexMaskUpsampler` (option ``mask_upsampler_channels > 0``; off in every size) lifts
the mask features, not each query's logits: a query's mask logits are a dot product with the
features, so upsampling the ``M`` feature channels once per image upsamples every query's mask.
Each full-resolution pixel takes a convex combination of the 3 x 3 coarse cells around its own,
with weights predicted at full resolution from the image and the coarse features (the convex
upsampling of RAFT, Teed & Deng 2020). Where the image has an edge the weights can pick the
cells on the pixel's own side, so an outline can be as sharp as the image's; the combination is
convex, so the features never leave the range of their neighbours (no ringing).
"""

from __future__ import annotations

import torch
from torch import nn


class ConvexMaskUpsampler(nn.Module):
    """``B x M x h x w`` features + ``B x 3 x H x W`` image -> ``B x M x H x W`` (``H = f h``).

    Args:
        feature_channels: ``M``, the mask-feature channels.
        channels: width ``c`` of the small full-resolution CNN that predicts the weights.
        factor: ``f``, the upsampling factor (4: stride-4 features to the input's pixels).

    The weights: two 3 x 3 convolutions on the (normalised) image, concatenated with a 1 x 1
    reduction of the features (nearest-upsampled: the features are constant within a cell, so
    the network sees which cell a pixel belongs to), a 3 x 3 convolution and a 1 x 1 to 9 logits
    per pixel, added to the log of the bilinear weights of the pixel's position in its cell,
    softmax over the 3 x 3 neighbourhood. The last layer starts at zero, so a new upsampler is
    exactly the bilinear upsampling (align_corners=False) that Mask2Former applies to its
    logits, and it learns where to depart from it.
    """

    def __init__(self, feature_channels: int, channels: int = 16, factor: int = 4) -> None:
        super().__init__()
        c, self.factor = int(channels), int(factor)
        if c < 1 or self.factor < 2:
            raise ValueError(f"ConvexMaskUpsampler needs channels >= 1 and factor >= 2, got "
                             f"channels={channels}, factor={factor}")
        self.image = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(inplace=True),
                                   nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True))
        self.reduce = nn.Conv2d(feature_channels, c, 1)
        self.fuse = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU(inplace=True))
        self.weights = nn.Conv2d(c, 9, 1)
        nn.init.zeros_(self.weights.weight)
        nn.init.zeros_(self.weights.bias)
        self.register_buffer("bilinear_logits", _bilinear_logits(self.factor), persistent=False)

    def forward(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        B, M, h, w = features.shape
        f = self.factor
        if images.shape[-2:] != (h * f, w * f):
            raise ValueError(f"ConvexMaskUpsampler: image {tuple(images.shape[-2:])} is not "
                             f"{f} x the features' {(h, w)}")
        cells = nn.functional.interpolate(self.reduce(features), scale_factor=f, mode="nearest")
        logits = self.weights(self.fuse(torch.cat([self.image(images), cells], 1)))
        # B x 9 x H x W -> B x 1 x 9 x f x f x h x w (pixel (y, x) = cell (y // f, x // f))
        logits = logits + self.bilinear_logits.repeat(1, 1, h, w).to(logits.dtype)
        weights = logits.view(B, 9, h, f, w, f).softmax(1)
        # replicate padding: a border pixel's outer neighbours are its own cell, as in
        # bilinear upsampling with align_corners=False
        padded = nn.functional.pad(features, (1, 1, 1, 1), mode="replicate")
        neighbours = nn.functional.unfold(padded, 3).view(B, M, 9, h, w)
        # one (M x 9) @ (9 x f f) product per cell (an einsum, not a broadcast multiply: that
        # would hold B x M x 9 x H x W numbers and made a CPU training step 3x slower)
        out = torch.einsum("bkyixj,bmkyx->bmyixj", weights, neighbours)
        return out.reshape(B, M, h * f, w * f)


def _bilinear_logits(f: int) -> torch.Tensor:
    """``1 x 9 x f x f`` log-weights of bilinear upsampling (align_corners=False) by ``f``.

    Pixel ``i`` of a cell sits at coarse coordinate ``(i + 0.5) / f - 0.5`` from the cell's
    centre; bilinear interpolation mixes the cell with the neighbour on that side. Weights that
    are 0 get a log of -30 (softmax ~1e-13).
    """
    t = (torch.arange(f, dtype=torch.float64) + 0.5) / f - 0.5      # in (-0.5, 0.5)
    w1 = torch.zeros(f, 3, dtype=torch.float64)                      # per axis: cells -1, 0, +1
    w1[:, 1] = 1 - t.abs()
    w1[:, 0] = (-t).clamp(min=0)
    w1[:, 2] = t.clamp(min=0)
    w2 = w1[:, None, :, None] * w1[None, :, None, :]                  # f x f x 3 x 3 (y, x, dy, dx)
    return w2.reshape(f, f, 9).permute(2, 0, 1).clamp(min=1e-13).log().float()[None]
