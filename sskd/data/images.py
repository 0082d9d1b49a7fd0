"""Image loading: any common file -> ``H x W x 3`` uint8 RGB, with clear errors.

All readers and datasets of sskd load pixels through :func:`load_image`, so every model sees the
same conversion of odd files (see the table in :mod:`sskd.data.errors`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sskd.data.errors import DataError

#: file suffixes treated as images by the readers (compared lower-case)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# EXIF orientations 5..8 rotate by 90 degrees, so the upright image has width and height swapped.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise DataError(path, "image file not found" if not path.exists() else "not a file",
                        "check the path / image_root setting, or remove the entry")
    try:
        return Image.open(path)
    except UnidentifiedImageError as e:
        raise DataError(path, "not a readable image (unknown or corrupt format)",
                        "re-export or delete the file") from e
    except Image.DecompressionBombError as e:
        raise DataError(path, f"image too large for Pillow's safety limit ({e})",
                        "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it") from e
    except OSError as e:
        raise DataError(path, f"cannot open image ({e})", "check permissions and the file") from e


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of the upright image, from the file header only (no pixel decode)."""
    path = Path(path)
    with _open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block must not hide the image; load_image ignores it too
            orientation = 1
    return (w, h) if orientation in _TRANSPOSED else (h, w)


def _to_rgb_array(im: Image.Image, path: Path, background: tuple[int, int, int]) -> np.ndarray:
    """A loaded PIL image of any mode -> ``H x W x 3`` uint8 RGB."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's convert("L") clips values > 255; scale the full range instead.
        a = np.asarray(im)
        if mode == "F":
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            if not (np.isfinite(a).all() and lo >= 0.0 and hi <= 1.0):
                raise DataError(path, f"float image with values in [{lo}, {hi}], expected [0, 1]",
                                "save it as 8- or 16-bit integers")
            g = np.round(a * 255.0)
        else:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi > 65535:
                raise DataError(path, f"32-bit integer image with values in [{lo}, {hi}]",
                                "save it as 8- or 16-bit")
            g = np.round(a.astype(np.float64) / 257.0)  # 65535 -> 255 exactly
        g = g.astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        # Transparent pixels often hold arbitrary colours; composite so they show as background.
        bg = Image.new("RGBA", im.size, (*background, 255))
        im = Image.alpha_composite(bg, im.convert("RGBA"))
    # 1, L, P, CMYK, YCbCr, LAB, HSV, RGB: Pillow's own conversions are exact here.
    # (16-bit-per-channel RGB files are already reduced to 8 bits by Pillow's decoders.)
    return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy (augmentations edit it)


def load_image(path: str | Path, *, exif: bool = True,
               background: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """Decode an image file to an ``H x W x 3`` uint8 RGB array.

    Args:
        path: image file (jpg/png/bmp/tif/webp/...).
        exif: apply the EXIF orientation (upright image, as annotation tools show it).
        background: RGB colour that transparent pixels are composited over.

    Raises:
        DataError: the file is missing, not an image, truncated or corrupt (the message names it).
    """
    path = Path(path)
    with _open(path) as im:
        try:
            im.load()
            if exif:
                im = ImageOps.exif_transpose(im)
            return _to_rgb_array(im, path, background)
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError) as e:  # Pillow reports truncation as OSError
            raise DataError(path, f"corrupt or truncated image ({e})",
                            "re-download or re-export the file, or delete it") from e


def load_image_tensor(path: str | Path, size: int | tuple[int, int] | None = None):
    """Decode to a ``3 x H x W`` float32 torch tensor in ``[0, 1]``.

    ``size``: ``None`` keeps the size; an int gives a square ``size x size``; ``(h, w)`` that size
    (bilinear, antialiased, aspect ratio not kept).
    """
    import torch

    arr = load_image(path)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        arr = np.array(Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR))
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def is_image_file(path: str | Path) -> bool:
    """True when the suffix is one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_label_image(path: str | Path) -> np.ndarray:
    """Decode a single-channel label/id map (e.g. Cityscapes ``*_instanceIds.png``) unchanged.

    Returns an ``H x W`` int32 array of the stored values (16-bit values kept, never scaled;
    no EXIF rotation, label maps carry none). Raises DataError for missing, corrupt or
    multi-channel files.
    """
    path = Path(path)
    with _open(path) as im:
        try:
            im.load()
            if im.mode not in ("1", "L", "P", "I") and not im.mode.startswith("I;16"):
                raise DataError(path, f"expected a single-channel label image, got mode {im.mode}",
                                "point to the *_instanceIds.png / id map, not a colour image")
            return np.asarray(im).astype(np.int32)
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError) as e:
            raise DataError(path, f"corrupt or truncated label image ({e})",
                            "re-extract the annotation archive") from e
