"""The objective J as a module: J = L_sup + l_semi L_semi + l_pxl L_pxl on one tiny batch."""

from dataclasses import replace

import pytest
import torch

from sskd.config import PixelContrastConfig
from sskd.engine.data import InputGeometry, hard_pseudo_labels
from sskd.engine.loader import StepBatches
from sskd.engine.objective import Objective, step_seed
from sskd.models import build_model


def _batch(toy):
    unl = [hard_pseudo_labels(r.__class__(r.file_name, r.height, r.width, r.image_id,
                                          [replace(i, score=0.9) for i in r.instances]),
                              Objective().pseudo_label) for r in toy.records[4:]]
    return StepBatches(toy.records[:4], unl, 2, 2, seed=1, steps=1, geometry=InputGeometry(32))[0]


def _j(model, batch, obj):
    torch.manual_seed(step_seed(1, 0, 10_000))  # as the trainer seeds the loss's point sampling
    return obj(model, batch, step=0, total_steps=10, seed=1)


def test_j_is_the_weighted_sum_of_its_terms(toy):
    torch.manual_seed(0)
    model = build_model("mask2former", 3, size="tiny")
    batch = _batch(toy)
    pc = PixelContrastConfig(num_anchors=16, num_negatives=8)
    total, logs = _j(model, batch, Objective(l_semi=2.0, l_pxl=0.5, pixel_contrast=pc))
    assert batch.kinds == ["l", "l", "u", "u"]
    assert total.item() == pytest.approx(logs["loss_sup"] + 2.0 * logs["loss_semi"]
                                         + 0.5 * logs["loss_pxl"], rel=1e-6)
    assert total.requires_grad
    # each term is the model's own loss on its half of the batch, whatever the weights
    sup_only, sup_logs = _j(model, batch, Objective())
    assert set(sup_logs) == {"loss_sup"}
    assert sup_only.item() == pytest.approx(logs["loss_sup"], rel=1e-6)
    _, semi_logs = _j(model, batch, Objective(l_semi=1.0))
    assert semi_logs["loss_semi"] == pytest.approx(logs["loss_semi"], rel=1e-6)
    torch.manual_seed(step_seed(1, 0, 10_000))
    out = model(batch.weak)
    direct = model.compute_losses(out.select(slice(0, 2)), batch.targets[:2])["loss"]
    assert direct.item() == pytest.approx(logs["loss_sup"], rel=1e-6)
    # L_pxl alone, on pseudo-labeled images only
    only_u = replace(batch, weak=batch.weak[2:], strong=batch.strong[2:], valid=batch.valid[2:],
                     targets=batch.targets[2:], kinds=["u", "u"])
    pxl, pxl_logs = _j(model, only_u, Objective(l_pxl=1.0, pixel_contrast=pc))
    assert set(pxl_logs) >= {"loss_pxl", "temperature"} and "loss_sup" not in pxl_logs
    assert pxl.item() == pytest.approx(pxl_logs["loss_pxl"], rel=1e-6)
