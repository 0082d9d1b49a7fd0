"""Segmenters behind one interface (:class:`Segmenter`) and a registry that builds them by name.

Importing this package registers every implementation: ``mask2former`` (student, trainable
teacher, stand-in foundation teacher) and, when its module is present, ``grounded_sam``.
"""

import importlib
import importlib.util

from sskd.models.base import (Prediction, Segmenter, SegmenterOutput, build_model, list_models,
                              load_model, register_model)
from sskd.models import mask2former  # noqa: F401  (registers "mask2former")

# grounded_sam is developed separately; import it only once its module exists so that a
# half-finished tree still imports (errors inside an existing module are not swallowed).
if importlib.util.find_spec("sskd.models.grounded_sam") is not None:
    importlib.import_module("sskd.models.grounded_sam")

__all__ = ["Prediction", "Segmenter", "SegmenterOutput", "build_model", "list_models",
           "load_model", "register_model"]
