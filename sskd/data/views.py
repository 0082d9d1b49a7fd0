"""Weak and strong views of one image that share their geometry (docs/method.md, L_pxl).

The pixel-wise contrastive loss pairs pixel ``p`` of the weak view with pixel ``p`` of the strong
view, so both views must come from ONE random geometry (flip, scale, crop/pad); only the strong
view then gets photometric changes (colour jitter, grayscale, blur), which move no pixel.

Geometry, in this order (all random numbers from the caller's ``torch.Generator``):

1. the base resize (``H x W -> h0 x w0``): by default :func:`eval_view`'s square ``S x S``
   (``S = out_size``); with ``base_size`` any size, e.g. the image with its short side scaled
   and its aspect ratio kept. Scale 1 with no flip and no crop reproduces the evaluation input;
2. horizontal flip with probability ``flip_p``;
3. a random scale ``s ~ U(scale_range)``: the base image becomes ``round(s h0) x round(s w0)``;
4. a random ``out_h x out_w`` window at a uniform offset per axis: a crop where the scaled
   image is larger, zero padding (the image placed at a uniform position) where it is smaller.
   Padded pixels are reported in ``valid``.

A square ``out_size`` with no ``base_size`` is the original square pipeline, draw for draw.

Masks follow the geometry with nearest-neighbour resizing; masks left empty are dropped and
``keep`` tells which input rows survived (filter labels with ``labels[keep]``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import InterpolationMode

__all__ = ["Views", "make_views", "eval_view"]


class Views(NamedTuple):
    """Output of :func:`make_views` (``S = out_size``)."""

    weak: torch.Tensor            # 3 x h x w float in [0, 1]: geometry only
    strong: torch.Tensor          # 3 x h x w float in [0, 1]: same geometry + photometric ops
    masks: torch.Tensor | None    # N' x h x w bool, the non-empty masks after the geometry
    keep: torch.Tensor | None     # N' long: indices of the kept input masks (labels[keep])
    valid: torch.Tensor           # h x w bool: False on zero padding (no image content there)
    ignore: torch.Tensor | None = None  # h x w bool: crowd regions (neither object nor background)


def _check_image(image: torch.Tensor, what: str = "image") -> None:
    if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{what} must be a 3 x H x W tensor, got {shape}; convert with "
                         "image.permute(2, 0, 1) if it is H x W x 3")
    if not image.is_floating_point():
        raise ValueError(f"{what} must be float in [0, 1], got {image.dtype}; divide uint8 "
                         "images by 255")


def _check_size(out_size: int) -> int:
    if int(out_size) != out_size or out_size < 1:
        raise ValueError(f"out_size must be a positive int, got {out_size!r}")
    return int(out_size)


def _check_hw(size: int | tuple[int, int] | list[int], what: str = "out_size") -> tuple[int, int]:
    """An int ``S`` -> ``(S, S)``; ``(h, w)`` -> itself, both positive ints."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or any(int(v) != v or v < 1 for v in hw):
        raise ValueError(f"{what} must be a positive int or [h, w] of positive ints, got {size!r}")
    return int(hw[0]), int(hw[1])


def eval_view(image: torch.Tensor, out_size: int) -> torch.Tensor:
    """``3 x H x W`` float -> ``3 x S x S`` (bilinear, antialiased resize only; ``S = out_size``)."""
    _check_image(image)
    s = _check_size(out_size)
    out = TF.resize(image, [s, s], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return out.clamp(0.0, 1.0)


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=generator))


def _offset(generator: torch.Generator, span: int) -> int:
    """Window offset along one axis: uniform over all windows (crop, ``span >= 0``) or over all
    placements of the image inside the window (pad, negative offset)."""
    lo, hi = min(0, span), max(0, span)
    return lo + int(torch.randint(hi - lo + 1, (), generator=generator))


def _geometry(generator: torch.Generator, base: tuple[int, int], out: tuple[int, int],
              scale_range: tuple[float, float],
              flip_p: float) -> tuple[bool, tuple[int, int], int, int]:
    """Draw (flip, scaled size, top, left); top/left < 0 means zero padding before the image."""
    flip = bool(torch.rand((), generator=generator) < flip_p)
    s = _uniform(generator, *scale_range)
    size = (max(1, round(base[0] * s)), max(1, round(base[1] * s)))
    top = _offset(generator, size[0] - out[0])
    left = _offset(generator, size[1] - out[1])
    return flip, size, top, left


def _apply_geometry(x: torch.Tensor, flip: bool, size: tuple[int, int], top: int, left: int,
                    out: tuple[int, int], interpolation: InterpolationMode) -> torch.Tensor:
    """``C x h0 x w0`` -> flipped, resized to ``size``, cropped/zero-padded to ``C x out``."""
    if flip:
        x = TF.horizontal_flip(x)
    antialias = interpolation != InterpolationMode.NEAREST_EXACT
    x = TF.resize(x, list(size), interpolation=interpolation, antialias=antialias)
    return TF.crop(x, top, left, out[0], out[1])  # out-of-bounds parts are zero-filled


def _photometric(x: torch.Tensor, generator: torch.Generator, jitter: tuple[float, ...],
                 gray_p: float, blur_sigma: tuple[float, float], blur_p: float) -> torch.Tensor:
    """Strong-view colour ops on ``3 x S x S``; draws a fixed number of random numbers."""
    b, c, s, h = jitter
    # Always draw every factor (even for a zero range) so the stream does not depend on settings.
    factors = [_uniform(generator, max(0.0, 1 - v), 1 + v) for v in (b, c, s)]
    hue = _uniform(generator, -h, h)
    order = torch.randperm(4, generator=generator).tolist()  # ColorJitter applies ops in random order
    gray = bool(torch.rand((), generator=generator) < gray_p)
    blur = bool(torch.rand((), generator=generator) < blur_p)
    sigma = _uniform(generator, *blur_sigma)
    for op in order:
        if op == 0 and b > 0:
            x = TF.adjust_brightness(x, factors[0])
        elif op == 1 and c > 0:
            x = TF.adjust_contrast(x, factors[1])
        elif op == 2 and s > 0:
            x = TF.adjust_saturation(x, factors[2])
        elif op == 3 and h > 0:
            x = TF.adjust_hue(x, hue)
    if gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if blur and sigma > 0:
        # Kernel covers +-3 sigma, odd, and small enough for reflect padding of the S x S image.
        k = 2 * math.ceil(3 * sigma) + 1
        k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
        if k >= 3:
            x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    return x.clamp(0.0, 1.0)


def make_views(image: torch.Tensor, masks: torch.Tensor | None, generator: torch.Generator, *,
               out_size: int | tuple[int, int], base_size: tuple[int, int] | None = None,
               ignore: torch.Tensor | None = None, scale_range: tuple[float, float] = (0.75, 1.25),
               flip_p: float = 0.5, jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
               gray_p: float = 0.2, blur_sigma: tuple[float, float] = (0.1, 2.0),
               blur_p: float = 0.5) -> Views:
    """One image -> weak and strong ``3 x h x w`` views with identical geometry.

    Args:
        image: ``3 x H x W`` float in ``[0, 1]``.
        masks: ``N x H x W`` bool instance masks (or ``None``); they follow the geometry.
        generator: the only source of randomness: same generator state -> same views.
        out_size: ``S`` (square ``S x S`` outputs) or ``(h, w)``, the training crop.
        base_size: ``(h0, w0)`` of the base resize (default: ``out_size``, square ``S x S``).
        ignore: ``H x W`` bool crowd map (or ``None``); follows the geometry like a mask.
        scale_range: ``(lo, hi)`` of the random scale relative to the base resize.
        flip_p: probability of a horizontal flip (both views).
        jitter: colour-jitter strengths (brightness, contrast, saturation, hue), strong view only;
            factors are drawn from ``[1 - v, 1 + v]`` (hue from ``[-v, v]``), applied in random order.
        gray_p: probability of converting the strong view to grayscale.
        blur_sigma: ``(lo, hi)`` of the Gaussian-blur sigma in pixels of the output.
        blur_p: probability of blurring the strong view.

    Returns:
        :class:`Views` ``(weak, strong, masks, keep, valid, ignore)``; ``masks``/``keep``
        (``ignore``) are ``None`` when ``masks`` (``ignore``) is ``None``. Pixel ``(i, j)`` of
        ``weak``, ``strong``, ``masks``, ``valid`` and ``ignore`` show the same input point.
    """
    _check_image(image)
    out = _check_hw(out_size)
    base = out if base_size is None else _check_hw(base_size, "base_size")
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range!r}")
    if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
        raise ValueError(f"jitter must be 4 non-negative strengths (brightness, contrast, "
                         f"saturation, hue <= 0.5), got {jitter!r}")
    if masks is not None and (masks.ndim != 3 or masks.shape[-2:] != image.shape[-2:]):
        raise ValueError(f"masks must be N x H x W with H x W = {tuple(image.shape[-2:])} (the "
                         f"image's), got {tuple(masks.shape)}")

    if ignore is not None and ignore.shape != image.shape[-2:]:
        raise ValueError(f"ignore must be H x W = {tuple(image.shape[-2:])} (the image's), got "
                         f"{tuple(ignore.shape)}")

    flip, size, top, left = _geometry(generator, base, out, (lo, hi), flip_p)
    nearest = InterpolationMode.NEAREST_EXACT
    resized = TF.resize(image, list(base), interpolation=InterpolationMode.BILINEAR,
                        antialias=True).clamp(0.0, 1.0)  # = eval_view for a square base
    weak = _apply_geometry(resized, flip, size, top, left, out, InterpolationMode.BILINEAR)
    weak = weak.clamp(0, 1)
    ones = torch.ones(1, *base, dtype=torch.bool)
    valid = _apply_geometry(ones, flip, size, top, left, out, nearest)[0]
    strong = _photometric(weak, generator, tuple(jitter), gray_p, blur_sigma, blur_p)

    def follow(m: torch.Tensor) -> torch.Tensor:  # masks: nearest, no antialiasing
        m = TF.resize(m.bool(), list(base), interpolation=nearest, antialias=False)
        return _apply_geometry(m, flip, size, top, left, out, nearest)

    out_masks = keep = out_ignore = None
    if masks is not None:
        m = follow(masks)
        keep = m.flatten(1).any(1).nonzero().flatten()
        out_masks = m[keep]
    if ignore is not None:
        out_ignore = follow(ignore[None])[0]
    return Views(weak, strong, out_masks, keep, valid, out_ignore)
