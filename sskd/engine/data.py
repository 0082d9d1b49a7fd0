"""Records -> model-ready tensors: decoded, resized images and instance targets, cached in memory.

Two input geometries (:class:`InputGeometry`, from the ``data.*`` config keys):

* square (``data.test_short_side: 0``, the synthetic default): every image is resized to
  ``input_size x input_size`` for training and prediction;
* aspect-preserving (``data.test_short_side > 0``, e.g. Cityscapes): the image's short side is
  scaled to ``test_short_side`` (aspect ratio kept); training takes random-scale crops of
  ``data.train_crop``, prediction runs on the whole resized image padded to the model's patch
  multiple, and predictions are mapped back to the original resolution.

Masks follow with nearest-neighbour resizing. Crowd instances (``iscrowd=1``) are not targets:
their union is the ``ignore`` map (neither object nor background for the losses). Pseudo-labels
are made hard here (score threshold, max instances).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sskd.config import PseudoLabelConfig
from sskd.data.records import ImageRecord


def _load_rgb(path: str) -> np.ndarray:
    try:  # the data layer's loader gives clear errors and handles gray/RGBA/16-bit
        from sskd.data.images import load_image
    except ImportError:  # pragma: no cover - during bootstrap only
        return np.asarray(Image.open(path).convert("RGB"))
    return load_image(path)


@dataclass(frozen=True)
class InputGeometry:
    """How images are sized for the models (built from ``data.*`` by :meth:`from_config`)."""

    input_size: int = 64                        # square side (square mode)
    test_short_side: int = 0                    # > 0: aspect-preserving mode, short side in px
    train_crop: tuple[int, int] | None = None   # (h, w) training crop; None: square input_size
    scale_range: tuple[float, float] = (0.75, 1.25)  # random training scale around the base size

    @classmethod
    def from_config(cls, data) -> "InputGeometry":
        """From a :class:`sskd.config.DataConfig` (validated there)."""
        crop = tuple(int(v) for v in data.train_crop) if data.train_crop else None
        return cls(int(data.input_size), int(data.test_short_side), crop,
                   (float(data.scale_range[0]), float(data.scale_range[1])))

    @property
    def aspect(self) -> bool:
        return self.test_short_side > 0

    def base_size(self, height: int, width: int) -> tuple[int, int]:
        """Size of the resized image the models see at scale 1 (prediction input before padding)."""
        if not self.aspect:
            return self.input_size, self.input_size
        s = self.test_short_side / min(height, width)
        return max(1, round(height * s)), max(1, round(width * s))

    @property
    def crop(self) -> tuple[int, int]:
        """``(h, w)`` of the training views."""
        return self.train_crop or (self.input_size, self.input_size)

    def describe(self) -> int | dict:
        """What changes the models' inputs (for stage fingerprints): the default square geometry
        is just its side (as fingerprints always held it), any other a dict of its settings."""
        if not self.aspect and self.train_crop is None and self.scale_range == (0.75, 1.25):
            return self.input_size
        return {"input_size": self.input_size, "test_short_side": self.test_short_side,
                "train_crop": list(self.crop), "scale_range": list(self.scale_range)}


@dataclass
class Sample:
    image: torch.Tensor   # 3 x h0 x w0 float in [0, 1] (h0 x w0 = InputGeometry.base_size)
    masks: torch.Tensor   # N x h0 x w0 bool, crowd instances excluded
    labels: torch.Tensor  # N long
    ignore: torch.Tensor | None = None  # h0 x w0 bool union of crowd regions, None when none
    class_probs: torch.Tensor | None = None  # N x K soft class targets, None unless every
    # instance carries one (pseudo-labels of a stage with ``soft_classes``)


def hard_pseudo_labels(record: ImageRecord, cfg: PseudoLabelConfig) -> ImageRecord:
    """Keep instances with ``score >= score_threshold``, at most ``max_instances`` (best first)."""
    kept = [i for i in record.instances if (i.score if i.score is not None else 1.0) >= cfg.score_threshold]
    kept.sort(key=lambda i: -(i.score if i.score is not None else 1.0))
    return ImageRecord(record.file_name, record.height, record.width, record.image_id,
                       kept[: cfg.max_instances])


def _nbytes(value) -> int:
    return sum(t.numel() * t.element_size() for t in value if isinstance(t, torch.Tensor))


class SampleCache:
    """Decodes each record once and keeps the resized uint8 image and masks in memory.

    An LRU cache bounded in MB (``max_mb``; 0 keeps nothing): the least recently used entries
    are dropped first. Entries are pure functions of the record, so eviction never changes a
    result, only the time to recompute it. ``input_size`` alone gives the square geometry.
    """

    def __init__(self, input_size: int | InputGeometry, max_mb: float = 2048.0) -> None:
        self.geometry = input_size if isinstance(input_size, InputGeometry) \
            else InputGeometry(int(input_size))
        self.input_size = self.geometry.input_size
        self.max_bytes = int(max_mb * 2 ** 20)
        self.bytes = 0
        self._cache: OrderedDict[tuple[str, int], tuple] = OrderedDict()

    def _size(self, record: ImageRecord) -> tuple[int, int]:
        return self.geometry.base_size(record.height, record.width)

    def image(self, record: ImageRecord) -> torch.Tensor:
        """``3 x h0 x w0`` float image in [0, 1] (``S x S`` in square mode)."""
        key = (record.file_name, -1)
        value = self._get(key)
        if value is None:
            arr = _load_rgb(record.file_name)
            img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
            size = self.geometry.base_size(*img.shape[-2:])
            if img.shape[-2:] != size:
                img = F.interpolate(img[None].float(), size=size, mode="bilinear",
                                    antialias=True, align_corners=False)[0].round().clamp(0, 255)
            value = (img.to(torch.uint8),)
            self._put(key, value)
        return value[0].float() / 255.0

    def sample(self, record: ImageRecord, tag: int = 0) -> Sample:
        """Image plus resized targets of ``record`` (``tag`` separates GT from pseudo-label sets)."""
        image = self.image(record)
        key = (record.file_name, record.image_id * 8 + tag)
        value = self._get(key)
        if value is None:
            size = tuple(image.shape[-2:])
            things = [i for i in record.instances if not i.iscrowd]
            crowd = [i for i in record.instances if i.iscrowd]
            masks = self._resize_masks(things, record, size)
            labels = torch.tensor([i.class_id for i in things], dtype=torch.long)
            keep = masks.flatten(1).any(1)  # an instance may vanish when downsized
            ignore = self._resize_masks(crowd, record, size).any(0) if crowd else None
            probs = None
            if things and all(i.class_probs is not None for i in things):
                probs = torch.tensor([i.class_probs for i in things], dtype=torch.float32)[keep]
            value = (masks[keep], labels[keep], ignore, probs)
            self._put(key, value)
        masks, labels, ignore, probs = value
        return Sample(image, masks, labels, ignore, probs)

    @staticmethod
    def _resize_masks(instances, record: ImageRecord, size: tuple[int, int]) -> torch.Tensor:
        """``N x h0 x w0`` bool masks of ``instances`` (nearest-neighbour resize)."""
        masks = torch.from_numpy(np.stack([i.mask() for i in instances])) if instances else \
            torch.zeros((0, record.height, record.width), dtype=torch.uint8)
        if masks.shape[0] and tuple(masks.shape[-2:]) != size:
            masks = F.interpolate(masks[None].float(), size=size, mode="nearest")[0]
        return masks.reshape(-1, *size).bool()

    def _get(self, key):
        value = self._cache.get(key)
        if value is not None:
            self._cache.move_to_end(key)
        return value

    def _put(self, key, value) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return  # larger than the whole budget: recompute each time rather than thrash
        self._cache[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._cache.popitem(last=False)
            self.bytes -= _nbytes(old)

    def __len__(self) -> int:
        return len(self._cache)


def pad_batch(images: list[torch.Tensor], multiple: int = 1) -> torch.Tensor:
    """``3 x h_i x w_i`` images -> ``B x 3 x H x W`` zero-padded bottom/right, ``H, W`` the
    largest sides rounded up to ``multiple`` (the model's patch size)."""
    H = max(i.shape[-2] for i in images)
    W = max(i.shape[-1] for i in images)
    H, W = math.ceil(H / multiple) * multiple, math.ceil(W / multiple) * multiple
    if all(tuple(i.shape[-2:]) == (H, W) for i in images):
        return torch.stack(images)
    return torch.stack([F.pad(i, (0, W - i.shape[-1], 0, H - i.shape[-2])) for i in images])


def instance_id_map(masks_list: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Per-image instance ids on a grid: ``B x h x w`` long, -1 where no instance.

    Ids are made unique across the batch (image b's instances get ids ``offset_b + k``), so
    "same instance" is never true across images.
    """
    out = torch.full((len(masks_list), *size), -1, dtype=torch.long)
    offset = 0
    for b, masks in enumerate(masks_list):
        if masks.shape[0] == 0:
            continue
        small = F.interpolate(masks[None].float(), size=size, mode="nearest")[0].bool()
        for k in range(small.shape[0]):
            out[b][small[k]] = offset + k
        offset += small.shape[0]
    return out
