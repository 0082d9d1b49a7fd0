"""The step-batch dataset: bit-identical to the old square path, the same with worker
processes, an LRU cache bounded in MB."""

from dataclasses import replace

import pytest
import torch

from sskd.config import EvaluationConfig, PixelContrastConfig, PseudoLabelConfig, TrainConfig
from sskd.data.records import Dataset, ImageRecord
from sskd.engine.data import InputGeometry, SampleCache, hard_pseudo_labels
from sskd.engine.inference import iter_predictions
from sskd.engine.loader import StepBatches, batch_loader
from sskd.engine.objective import step_seed
from sskd.engine.trainer import Objective, TrainPaths, train
from sskd.models import build_model

from . import legacy_square
from .conftest import make_dataset


def _pseudo(records):
    return [hard_pseudo_labels(ImageRecord(r.file_name, r.height, r.width, r.image_id,
                                           [replace(i, score=0.8) for i in r.instances]),
                               PseudoLabelConfig()) for r in records]


@pytest.fixture
def toy40(tmp_path):
    return make_dataset(tmp_path / "toy40", n=8, size=40)


@pytest.mark.parametrize("S", [32, 40])  # 32: resized from 40 px; 40: no resize
def test_square_batches_are_bit_identical_to_the_old_path(toy40, S):
    lab, unl = toy40.records[:4], _pseudo(toy40.records[4:])
    data = StepBatches(lab, unl, 2, 2, seed=3, steps=6, geometry=InputGeometry(S))
    for step in (0, 1, 5):
        new = data[step]
        weak, strong, valid, targets = legacy_square.step_batch(lab, unl, 2, 2, 3, step, S,
                                                                step_seed)
        assert torch.equal(new.weak, weak) and torch.equal(new.strong, strong)
        assert torch.equal(new.valid, valid) and new.kinds == ["l", "l", "u", "u"]
        for a, b in zip(new.targets, targets):
            assert a.keys() == {"masks", "labels"}  # no crowd: no ignore map
            assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("S,overlapping", [(32, True), (40, True), (32, False)])
def test_square_predictions_are_bit_identical_to_the_old_path(toy40, S, overlapping):
    torch.manual_seed(1)
    model = build_model("mask2former", 3, size="tiny").eval()
    cfg = EvaluationConfig(mask_threshold=0.3, overlapping_masks=overlapping)
    new = list(iter_predictions(model, toy40, cfg, input_size=S, batch_size=8))
    old = legacy_square.predictions(model, toy40.records, S, cfg)
    assert sum(len(r.instances) for r in new) > 0
    assert [r.to_dict() for r in new] == [r.to_dict() for r in old]


def test_items_do_not_depend_on_order_or_process(toy40):
    lab = toy40.records
    data = StepBatches(lab, [], 3, 0, seed=1, steps=5, geometry=InputGeometry(32))
    fwd = [data[t].weak for t in range(5)]
    fresh = StepBatches(lab, [], 3, 0, seed=1, steps=5, geometry=InputGeometry(32))
    assert all(torch.equal(fresh[t].weak, fwd[t]) for t in (4, 2, 0))
    got = [b.weak for b in batch_loader(fresh, start=2, num_workers=2)]
    assert len(got) == 3 and all(torch.equal(g, fwd[2 + i]) for i, g in enumerate(got))


@pytest.mark.slow
def test_training_gives_the_same_weights_with_and_without_workers(toy40, tmp_path):
    states = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = build_model("mask2former", 3, size="tiny")
        unl = Dataset([ImageRecord(r.file_name, r.height, r.width, r.image_id,
                                   [replace(i, score=0.8) for i in r.instances])
                       for r in toy40.records[4:]], toy40.classes)
        obj = Objective(l_semi=1.0, l_pxl=0.1,
                        pixel_contrast=PixelContrastConfig(num_anchors=16, num_negatives=8))
        cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, checkpoint_every=100, log_every=1, seed=3)
        train(model, Dataset(toy40.records[:4], toy40.classes),
              TrainPaths.in_dir(tmp_path / f"w{workers}", "s"), cfg, obj, unlabeled=unl,
              input_size=32, progress=False, num_workers=workers)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_cache_is_an_lru_bounded_in_mb(toy40):
    one = 40 * 40 * 3  # bytes of one cached uint8 image
    cache = SampleCache(InputGeometry(40), max_mb=2.5 * one / 2 ** 20)
    a, b, c = toy40.records[:3]
    cache.image(a), cache.image(b), cache.image(a)  # a is now the most recently used
    cache.image(c)                                  # evicts b, the least recently used
    assert [k[0] for k in cache._cache] == [a.file_name, c.file_name]
    assert cache.bytes == 2 * one <= cache.max_bytes
    off = SampleCache(InputGeometry(40), max_mb=0)
    assert torch.equal(off.image(a), cache.image(a)) and len(off) == 0
