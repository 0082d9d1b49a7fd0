"""Soft class targets in the set-prediction loss (``stages.<stage>.soft_classes``)."""

import pytest
import torch
import torch.nn.functional as F

from sskd.losses.soft_classes import soft_class_cross_entropy
from sskd.models import build_model

K = 3


def test_one_hot_targets_give_torchs_weighted_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(7, K + 1)
    labels = torch.tensor([0, 3, 3, 1, 2, 3, 0])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    soft = soft_class_cross_entropy(logits, F.one_hot(labels, K + 1).float(), weight)
    assert torch.allclose(soft, F.cross_entropy(logits, labels, weight=weight), atol=1e-6)
    assert torch.allclose(soft_class_cross_entropy(logits, F.one_hot(labels, K + 1).float()),
                          F.cross_entropy(logits, labels), atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        soft_class_cross_entropy(logits, torch.ones(7, K))


def test_soft_targets_pull_toward_the_teachers_distribution():
    """The gradient of the soft loss is softmax(logits) - q: at q itself it vanishes."""
    q = torch.tensor([[0.6, 0.3, 0.1]])
    at_q = q.log().clone().requires_grad_(True)
    soft_class_cross_entropy(at_q, q).backward()
    assert at_q.grad.abs().max() < 1e-6
    peaked = torch.tensor([[5.0, 0.0, 0.0]], requires_grad=True)  # what a hard label teaches
    soft_class_cross_entropy(peaked, q).backward()
    assert peaked.grad[0, 0] > 0 and (peaked.grad[0, 1:] < 0).all()  # less of class 0


def _targets(probs=None):
    g = torch.Generator().manual_seed(3)
    masks = [torch.rand(2, 64, 64, generator=g) > 0.5, torch.rand(1, 64, 64, generator=g) > 0.5]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    out = [{"masks": m.float(), "labels": lab} for m, lab in zip(masks, labels)]
    for t, p in zip(out, probs or []):
        if p is not None:
            t["class_probs"] = p
    return out


@pytest.mark.parametrize("options", [{}, {"silhouette_channels": 4, "silhouette_only": True},
                                     {"silhouette_channels": 4}])
def test_mask2former_loss_with_one_hot_class_probs_equals_the_hard_loss(options):
    torch.manual_seed(0)
    model = build_model("mask2former", K, size="tiny", **options)
    with torch.no_grad():  # a silhouette head that is not uniform (its last layer starts at 0)
        if model.silhouette_head is not None:
            model.silhouette_head.classify.weight.normal_()
    out = model(torch.rand(2, 3, 64, 64))
    one_hot = [F.one_hot(torch.tensor([0, 2]), K).float(), F.one_hot(torch.tensor([1]), K).float()]
    soft = [torch.tensor([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8]]), None]  # image 1 keeps its label
    res = {}
    for name, probs in (("hard", None), ("one_hot", one_hot), ("soft", soft)):
        torch.manual_seed(1)  # the same sampled points for the mask losses
        res[name] = {k: float(v.detach()) for k, v in model.compute_losses(out, _targets(probs)).items()}
    for key in res["hard"]:
        assert res["one_hot"][key] == pytest.approx(res["hard"][key], rel=1e-5), key
    assert res["soft"]["loss_mask"] == pytest.approx(res["hard"]["loss_mask"], rel=1e-6)
    assert res["soft"]["loss_ce"] != pytest.approx(res["hard"]["loss_ce"], rel=1e-3)
    if model.silhouette_head is not None:
        assert res["soft"]["loss_silhouette"] != pytest.approx(res["hard"]["loss_silhouette"], rel=1e-3)


def test_class_probs_of_the_wrong_shape_name_the_target():
    model = build_model("mask2former", K, size="tiny")
    out = model(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"target 0: class_probs must be N x K = 2 x 3"):
        model.compute_losses(out, _targets([torch.full((2, 4), 0.25), None]))


def test_batches_carry_class_probs_row_for_row_with_the_labels(tmp_path):
    """Pseudo-labels with class distributions reach the loss aligned with their labels, also
    when an augmented view drops an instance; labeled images never carry any."""
    import numpy as np
    from PIL import Image

    from sskd.data.records import ImageRecord, Instance
    from sskd.engine.data import InputGeometry
    from sskd.engine.loader import StepBatches
    S = 32
    Image.fromarray(np.full((S, S, 3), 90, np.uint8)).save(tmp_path / "u.png")
    a, b = np.zeros((S, S), np.uint8), np.zeros((S, S), np.uint8)
    a[0:2, 0:2] = 1      # tiny, in a corner: some views lose it
    b[12:28, 12:28] = 1
    probs = {0: [0.7, 0.2, 0.1], 2: [0.1, 0.3, 0.6]}
    unl = ImageRecord(str(tmp_path / "u.png"), S, S, 1,
                      [Instance.from_mask(a, 0, 0.9, class_probs=probs[0]),
                       Instance.from_mask(b, 2, 0.8, class_probs=probs[2])])
    lab = ImageRecord(str(tmp_path / "u.png"), S, S, 2, [Instance.from_mask(b, 1)])
    batches = StepBatches([lab], [unl], 1, 3, seed=0, steps=40, geometry=InputGeometry(S))
    seen = set()
    for step in range(40):
        batch = batches[step]
        for kind, t in zip(batch.kinds, batch.targets):
            if kind == "l":
                assert "class_probs" not in t
                continue
            assert t["class_probs"].shape == (len(t["labels"]), K)
            for label, row in zip(t["labels"].tolist(), t["class_probs"]):
                assert torch.allclose(row, torch.tensor(probs[label]))
            seen.add(len(t["labels"]))
    assert seen == {1, 2}  # some views dropped the small instance, and rows stayed aligned
