"""Import guard for the detectron2 integration: one clear error when detectron2 is absent.

detectron2 is optional in sskd (it has no wheels on PyPI and must be built against the local
torch), so nothing in ``sskd`` imports it except ``sskd.integrations.detectron2*`` modules,
each of which calls :func:`require_detectron2` before its own ``import detectron2``.
"""

from __future__ import annotations

import importlib.util

INSTALL_HINT = (
    "detectron2 is not installed. It is optional in sskd and needed only by "
    "sskd.integrations.detectron2 (dataset registration, format conversion, detectron2 "
    "evaluators, the 'detectron2' model). Install it for your torch/CUDA following "
    "https://detectron2.readthedocs.io/en/latest/tutorials/install.html, e.g. "
    "`pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'` "
    "in the environment that has sskd's torch (about 3 min on 2 CPU cores).")


def detectron2_available() -> bool:
    """True when ``import detectron2`` would succeed (checked without importing it)."""
    return importlib.util.find_spec("detectron2") is not None


def compiled_ops_available() -> bool:
    """True when detectron2 was built with its C++/CUDA ops (``detectron2._C``).

    Without them ROIAlign falls back to torchvision (fine), while deformable convolution,
    rotated boxes and the fast COCO evaluator are unavailable.
    """
    return detectron2_available() and importlib.util.find_spec("detectron2._C") is not None


def require_detectron2() -> None:
    """Raise :class:`ImportError` with install instructions when detectron2 is missing."""
    if not detectron2_available():
        raise ImportError(INSTALL_HINT)
