"""Hand-built masks with known overlaps, shared by the evaluation tests."""

import numpy as np

H = W = 40
CLASSES = ["circle", "rectangle", "triangle"]


def box(y0, x0, h, w):
    """``H x W`` boolean mask of the rectangle at ``(y0, x0)`` of size ``h x w``."""
    m = np.zeros((H, W), dtype=bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return m
