"""Segmenters behind one interface (:class:`Segmenter`) and a registry that builds them by name."""

from sskd.models.base import (Prediction, Segmenter, SegmenterOutput, build_model, list_models,
                              load_model, register_model)

__all__ = ["Prediction", "Segmenter", "SegmenterOutput", "build_model", "list_models",
           "load_model", "register_model"]
