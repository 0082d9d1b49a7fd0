"""sskd: semi-supervised knowledge distillation of vision foundation models into compact
instance-segmentation experts (see README.md and docs/method.md)."""

__version__ = "0.1.0"
