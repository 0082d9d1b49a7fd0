"""Records -> model-ready tensors: decoded, resized images and instance targets, cached in memory.

Images are resized to a square ``input_size`` (the models' input side); masks follow with
nearest-neighbour resizing. Pseudo-labels are made hard here (score threshold, max instances).
"""

from __future__ import annotations

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


@dataclass
class Sample:
    image: torch.Tensor   # 3 x S x S float in [0, 1]
    masks: torch.Tensor   # N x S x S bool
    labels: torch.Tensor  # N long


def hard_pseudo_labels(record: ImageRecord, cfg: PseudoLabelConfig) -> ImageRecord:
    """Keep instances with ``score >= score_threshold``, at most ``max_instances`` (best first)."""
    kept = [i for i in record.instances if (i.score if i.score is not None else 1.0) >= cfg.score_threshold]
    kept.sort(key=lambda i: -(i.score if i.score is not None else 1.0))
    return ImageRecord(record.file_name, record.height, record.width, record.image_id,
                       kept[: cfg.max_instances])


class SampleCache:
    """Decodes each record once and keeps the resized uint8 image and masks in memory.

    ``max_items`` bounds memory for large datasets (the oldest entries are dropped).
    """

    def __init__(self, input_size: int, max_items: int = 20000) -> None:
        self.input_size = int(input_size)
        self.max_items = max_items
        self._cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def image(self, record: ImageRecord) -> torch.Tensor:
        """``3 x S x S`` float image in [0, 1]."""
        key = (record.file_name, -1)
        if key not in self._cache:
            arr = _load_rgb(record.file_name)
            img = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
            if img.shape[-2:] != (self.input_size, self.input_size):
                img = F.interpolate(img[None].float(), size=(self.input_size,) * 2, mode="bilinear",
                                    antialias=True, align_corners=False)[0].round().clamp(0, 255)
            self._put(key, (img.to(torch.uint8), torch.empty(0), torch.empty(0)))
        return self._cache[key][0].float() / 255.0

    def sample(self, record: ImageRecord, tag: int = 0) -> Sample:
        """Image plus resized targets of ``record`` (``tag`` separates GT from pseudo-label sets)."""
        image = self.image(record)
        key = (record.file_name, record.image_id * 8 + tag)
        if key not in self._cache:
            masks = torch.from_numpy(record.masks()) if record.instances else \
                torch.zeros((0, record.height, record.width), dtype=torch.uint8)
            if masks.shape[0] and masks.shape[-2:] != (self.input_size, self.input_size):
                masks = F.interpolate(masks[None].float(), size=(self.input_size,) * 2,
                                      mode="nearest")[0]
            masks = masks.reshape(-1, self.input_size, self.input_size).bool()
            labels = torch.tensor([i.class_id for i in record.instances], dtype=torch.long)
            keep = masks.flatten(1).any(1)  # an instance may vanish when downsized
            self._put(key, (torch.empty(0), masks[keep], labels[keep]))
        _, masks, labels = self._cache[key]
        return Sample(image, masks, labels)

    def _put(self, key, value) -> None:
        if len(self._cache) >= self.max_items:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = value


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
