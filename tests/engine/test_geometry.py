"""Aspect-preserving inputs: prediction on the whole resized, padded image and back; random-scale
crops for training."""

import numpy as np
import torch
from PIL import Image

from sskd.config import EvaluationConfig
from sskd.data.records import Dataset, ImageRecord, Instance
from sskd.engine.data import InputGeometry, SampleCache, pad_batch
from sskd.engine.inference import iter_predictions
from sskd.engine.loader import StepBatches
from sskd.models.base import Prediction

H, W = 90, 210                      # a 7:3 image
YY, XX = np.mgrid[:H, :W]
# the drawn object: an ellipse at known coordinates, off the resize grid
OBJECT = ((YY - 43.3) / 27.1) ** 2 + ((XX - 151.7) / 38.4) ** 2 <= 1


class BrightSegmenter(torch.nn.Module):
    """A stand-in model: one instance = the bright pixels of its input. Records input sizes."""

    patch_size = 8

    def __init__(self):
        super().__init__()
        self.seen = []

    def predict(self, images, score_threshold=0.0, max_instances=100, mask_threshold=0.5,
                overlapping=False):
        self.seen.append(tuple(images.shape[-2:]))
        return [Prediction((im.mean(0) > 0.5)[None], torch.tensor([0]), torch.tensor([0.9]))
                for im in images]


def _fixture(tmp_path):
    img = np.zeros((H, W, 3), np.uint8)
    img[OBJECT] = 255
    mask = OBJECT.astype(np.uint8)
    path = tmp_path / "wide.png"
    Image.fromarray(img).save(path)
    return ImageRecord(str(path), H, W, 1, [Instance.from_mask(mask, 0)]), mask


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_geometry_sizes():
    g = InputGeometry(64, test_short_side=36, train_crop=(24, 48))
    assert g.aspect and g.base_size(H, W) == (36, 84) and g.crop == (24, 48)
    assert InputGeometry(64).base_size(H, W) == (64, 64) and InputGeometry(64).crop == (64, 64)
    assert InputGeometry(64).describe() == 64  # square runs keep their stage fingerprints
    batch = pad_batch([torch.ones(3, 36, 84), torch.ones(3, 30, 90)], multiple=8)
    assert batch.shape == (2, 3, 40, 96) and batch[0, :, 36:].abs().sum() == 0


def test_a_mask_comes_back_at_the_same_place(tmp_path):
    rec, mask = _fixture(tmp_path)
    model = BrightSegmenter()
    geo = InputGeometry(64, test_short_side=36)
    out = list(iter_predictions(model, Dataset([rec], ["object"]), EvaluationConfig(),
                                geometry=geo))
    # the model saw the whole image, aspect kept (36 x 84), padded to the patch multiple
    assert model.seen == [(40, 88)]
    back = out[0].instances[0].mask().astype(bool)
    assert back.shape == (H, W)
    iou = _iou(back, mask.astype(bool))
    print(f"round-trip IoU {iou:.4f}")
    assert iou >= 0.95
    # the old square squash would also come back, but through a 2.3:1 distortion
    square = list(iter_predictions(model, Dataset([rec], ["object"]), EvaluationConfig(),
                                   input_size=32))
    assert model.seen[-1] == (32, 32)
    assert _iou(square[0].instances[0].mask().astype(bool), mask.astype(bool)) < iou


def test_training_crops_keep_image_and_masks_aligned(tmp_path):
    rec, mask = _fixture(tmp_path)
    geo = InputGeometry(64, test_short_side=45, train_crop=(32, 48), scale_range=(0.8, 1.6))
    assert SampleCache(geo).sample(rec).image.shape == (3, 45, 105)
    data = StepBatches([rec], [], 2, 0, seed=0, steps=20, geometry=geo)
    seen_object = 0
    for step in range(20):
        b = data[step]
        assert b.weak.shape == (2, 3, 32, 48) and b.valid.shape == (2, 32, 48)
        for i, t in enumerate(b.targets):
            bright = b.weak[i].mean(0) > 0.5
            if t["masks"].shape[0]:
                seen_object += 1
                m = t["masks"][0].bool()
                if m.sum() >= 100:  # (slivers at a crop edge are all boundary)
                    assert _iou(m, bright) > 0.85  # the mask sits on the bright object
            else:
                assert not bright.any()
    assert seen_object > 5


def test_config_keys_build_the_geometry_and_are_checked():
    import pytest
    from sskd.config import ConfigError, load_config
    cfg = load_config("cityscapes_10pct")
    g = InputGeometry.from_config(cfg.data)
    assert g.base_size(1024, 2048) == (1024, 2048) and g.crop == (518, 1036)
    assert all(v % 14 == 0 for v in g.crop)  # the ViT-S/14 patch
    demo = InputGeometry.from_config(load_config("demo").data)
    assert not demo.aspect and demo.train_crop is None and demo.scale_range == (0.75, 1.25)
    for bad in ({"data.train_crop": [512]}, {"data.scale_range": [2.0, 1.0]},
                {"data.num_workers": -1}):
        with pytest.raises(ConfigError, match="data\\."):
            load_config("demo", bad)
