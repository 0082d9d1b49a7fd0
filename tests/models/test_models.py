"""Interface tests run over every registered segmenter at size "tiny" (timm style)."""

from __future__ import annotations

import pytest
import torch

from sskd.models import Segmenter, build_model, list_models, load_model

NUM_CLASSES = 3
SIZE = 64  # a multiple of every tiny model's patch/stride


@pytest.fixture(autouse=True)
def _offline_and_small(monkeypatch):
    # building must never touch the network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(1)


def _images(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, SIZE, SIZE, generator=g)


def _targets(batch: int = 2) -> list[dict]:
    out = []
    for b in range(batch):
        masks = torch.zeros(2, SIZE, SIZE)
        masks[0, 4:30, 6:28] = 1
        masks[1, 36:60, 30 + b:58] = 1
        out.append({"masks": masks, "labels": torch.tensor([b % NUM_CLASSES, 2])})
    return out


#: registered models, plus options that add modules to a model (each must pass every test)
VARIANTS = {n: (n, {}) for n in list_models()} | {
    "mask2former+upsampler+silhouette": ("mask2former", {"mask_upsampler_channels": 4,
                                                         "silhouette_channels": 4})}


def _build(name: str) -> Segmenter:
    registered, options = VARIANTS[name]
    torch.manual_seed(0)
    model = build_model(registered, NUM_CLASSES, size="tiny", **options)
    if options:  # both heads' last layers start at zero and would pass no gradient back
        with torch.no_grad():
            model.mask_upsampler.weights.weight.normal_(0, 0.1)
            model.silhouette_head.classify.weight.normal_(0, 0.1)
    return model


@pytest.fixture(params=list(VARIANTS))
def name(request) -> str:
    return request.param


def test_registry_has_mask2former():
    assert "mask2former" in list_models()


def test_builds_offline(name):
    model = _build(name)
    assert isinstance(model, Segmenter)
    assert model.registry_name == VARIANTS[name][0]
    assert model.num_classes == NUM_CLASSES
    assert model.num_parameters(trainable_only=True) > 0


def test_forward_shapes_and_finite(name):
    model = _build(name)
    out = model(_images())
    B, Q, C1 = out.class_logits.shape
    assert (B, C1) == (2, NUM_CLASSES + 1)
    assert out.mask_logits.shape[:2] == (2, Q)
    assert torch.isfinite(out.class_logits).all() and torch.isfinite(out.mask_logits).all()


def test_backward_every_trainable_parameter_gets_a_gradient(name):
    model = _build(name)
    model.train()
    out = model(_images(), embeddings="both")
    losses = model.compute_losses(out, _targets())
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    total = losses["loss"]
    if out.embed_weak is not None:  # the weak head is trained by L_pxl, not by L_sup
        probe = torch.randn(out.embed_weak.shape, generator=torch.Generator().manual_seed(1))
        total = total + (out.embed_weak * probe).mean()
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"trainable parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


def test_empty_targets_give_finite_loss(name):
    model = _build(name)
    empty = {"masks": torch.zeros(0, SIZE, SIZE), "labels": torch.zeros(0, dtype=torch.long)}
    for targets in ([empty, _targets(1)[0]], [empty, empty]):
        losses = model.compute_losses(model(_images()), targets)
        assert all(torch.isfinite(v).all() for v in losses.values())
        losses["loss"].backward()  # and it back-propagates (pushes queries to no-object)


def test_predict_returns_valid_instances(name):
    model = _build(name)
    preds = model.predict(_images(), score_threshold=0.0, max_instances=10)
    assert len(preds) == 2
    assert sum(len(p) for p in preds) > 0, "threshold 0 should keep some instance"
    for p in preds:
        assert p.masks.dtype == torch.bool and p.masks.shape[1:] == (SIZE, SIZE)
        assert p.masks.shape[0] == len(p) == p.scores.shape[0]
        assert ((p.scores >= 0) & (p.scores <= 1)).all()
        assert ((p.class_ids >= 0) & (p.class_ids < NUM_CLASSES)).all()
        assert p.masks.flatten(1).any(1).all(), "empty masks must be dropped"
        assert p.masks.sum(0).max() <= 1, "a pixel belongs to at most one instance"


def test_save_load_round_trip(name, tmp_path):
    model = _build(name)
    with torch.no_grad():  # move weights away from init so a fresh build would differ
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.registry_name == VARIANTS[name][0]
    model.eval(), loaded.eval()
    x = _images()
    a, b = model(x, embeddings="both"), loaded(x, embeddings="both")
    assert torch.equal(a.class_logits, b.class_logits)
    assert torch.equal(a.mask_logits, b.mask_logits)
    if a.embed_strong is not None:
        assert torch.equal(a.embed_strong, b.embed_strong)
