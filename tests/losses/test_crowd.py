"""Crowd regions (iscrowd=1): no target, not background in the mask losses, never in L_pxl."""

import numpy as np
import torch
from PIL import Image

from sskd.config import PixelContrastConfig
from sskd.data.records import ImageRecord, Instance
from sskd.engine.data import InputGeometry, SampleCache
from sskd.engine.loader import StepBatches
from sskd.engine.objective import Objective
from sskd.models import build_model
from sskd.models.base import SegmenterOutput
from sskd.models.grounded_sam_loss import set_prediction_loss

S = 32


def _record(tmp_path) -> ImageRecord:
    """A 32 x 32 image: one person (class 0) on the right, a crowd (class 0) on the left half."""
    Image.fromarray(np.full((S, S, 3), 128, np.uint8)).save(tmp_path / "c.png")
    person = np.zeros((S, S), np.uint8)
    person[8:24, 20:28] = 1
    crowd = np.zeros((S, S), np.uint8)
    crowd[:, :16] = 1
    return ImageRecord(str(tmp_path / "c.png"), S, S, 1,
                       [Instance.from_mask(person, 0), Instance.from_mask(crowd, 0, iscrowd=1)])


def test_crowd_is_no_target_but_an_ignore_map(tmp_path):
    rec = _record(tmp_path)
    s = SampleCache(InputGeometry(S)).sample(rec)
    assert s.masks.shape == (1, S, S) and s.labels.tolist() == [0]  # only the person
    assert s.ignore is not None and s.ignore[:, :16].all() and not s.ignore[:, 16:].any()
    b = StepBatches([rec], [], 2, 0, seed=0, steps=4, geometry=InputGeometry(S))[0]
    for t, v in zip(b.targets, b.valid):
        assert "ignore" in t and t["ignore"].shape == (S, S)
        assert not (t["ignore"] & t["masks"].bool().any(0)).any()


def _grad_on_crowd(model, targets, B=1, Q=4, C=3, h=8):
    """Gradient of the model's loss w.r.t. its mask logits, on the crowd's logit columns 0..2
    (inside the crowd's 16 of 32 input columns, clear of the bilinear boundary) and elsewhere."""
    torch.manual_seed(0)
    mask_logits = torch.randn(B, Q, h, h, requires_grad=True)
    out = SegmenterOutput(class_logits=torch.randn(B, Q, C + 1), mask_logits=mask_logits,
                          extras={"pred_boxes": torch.rand(B, Q, 4) * 0.5 + 0.25,
                                  "iou_scores": torch.rand(B, Q)})
    losses = model.compute_losses(out, targets) if model is not None else \
        set_prediction_loss(out.class_logits, out.extras["pred_boxes"], mask_logits,
                            out.extras["iou_scores"], targets, num_points=256)
    (losses["loss_mask"] + losses["loss_dice"]).backward()
    g = mask_logits.grad.abs()
    return float(g[..., :3].sum()), float(g[..., 5:].sum())


def test_mask_losses_ignore_crowd_pixels_for_both_model_families(tmp_path):
    s = SampleCache(InputGeometry(S)).sample(_record(tmp_path))
    with_crowd = [{"masks": s.masks.float(), "labels": s.labels, "ignore": s.ignore}]
    without = [{"masks": s.masks.float(), "labels": s.labels}]
    m2f = build_model("mask2former", 3, size="tiny")
    m2f.criterion.num_points = 256
    for model in (m2f, None):  # None: the grounded_sam teacher's set-prediction loss
        crowd_g, rest_g = _grad_on_crowd(model, with_crowd)
        assert crowd_g == 0.0 and rest_g > 0
        plain_crowd_g, _ = _grad_on_crowd(model, without)
        assert plain_crowd_g > 0  # without the map the crowd is background and gets gradient


def test_crowd_pixels_are_never_anchors_or_negatives(tmp_path, monkeypatch):
    import sskd.losses.pixel_contrastive as pc_mod
    seen = {}
    real = pc_mod.pixel_contrastive_loss

    def spy(*args, **kw):
        seen["valid"] = kw["valid"].clone()
        return real(*args, **kw)

    monkeypatch.setattr(pc_mod, "pixel_contrastive_loss", spy)
    rec = _record(tmp_path)
    batch = StepBatches([rec], [], 2, 0, seed=0, steps=1, geometry=InputGeometry(S))[0]
    model = build_model("mask2former", 3, size="tiny")
    obj = Objective(l_pxl=0.1, pixel_contrast=PixelContrastConfig(num_anchors=8, num_negatives=4))
    obj(model, batch)
    crowd = torch.stack([t["ignore"] for t in batch.targets])
    assert crowd.any() and not seen["valid"][crowd].any()
    assert torch.equal(seen["valid"], batch.valid & ~crowd)
