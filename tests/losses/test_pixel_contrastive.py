"""L_pxl: value against a naive reference, stop-gradient, diagnostics, degenerate inputs."""

import math

import pytest
import torch

from sskd.losses.pixel_contrastive import (FusedNegativeSampler, fused_pseudo_probabilities,
                                           instance_ids_from_masks,
                                           instance_ids_from_probabilities,
                                           pixel_contrastive_loss, temperature_at)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _probs(B=2, Q=4, C=3, h=5, w=6, seed=0):
    g = _gen(seed)
    pm = torch.randn(B, Q, h, w, generator=g).mul(3).softmax(1)
    pc = torch.randn(B, Q, C + 1, generator=g).mul(3).softmax(-1)
    return pm, pc


# --------------------------------------------------------------------------- pseudo-probabilities


def test_fused_pseudo_probabilities_matches_definition():
    pm, pc = _probs()
    B, Q, h, w = pm.shape
    C1 = pc.shape[-1]
    y = fused_pseudo_probabilities(pm, pc, "fused")
    assert y.shape == (B, Q + C1, h, w)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                fc = [sum(float(pm[b, k, i, j] * pc[b, k, c]) for k in range(Q)) for c in range(C1)]
                raw = torch.tensor([float(v) for v in pm[b, :, i, j]] + fc)
                assert torch.allclose(y[b, :, i, j], raw / raw.norm(), atol=1e-6)
    flat = y.permute(0, 2, 3, 1).reshape(-1, Q + C1)
    sims = flat @ flat.T
    assert float(sims.min()) >= 0 and float(sims.max()) <= 1 + 1e-6
    assert torch.allclose(flat.norm(dim=1), torch.ones(len(flat)))


def test_mask_only_and_class_only_parts():
    pm, pc = _probs()
    ym = fused_pseudo_probabilities(pm, pc, "mask_only")
    yc = fused_pseudo_probabilities(pm, pc, "class_only")
    assert ym.shape[1] == pm.shape[1] and yc.shape[1] == pc.shape[-1]
    assert torch.allclose(ym, pm / pm.norm(dim=1, keepdim=True))
    fc = torch.einsum("bkhw,bkc->bchw", pm, pc)
    assert torch.allclose(yc, fc / fc.norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="uniform"):
        fused_pseudo_probabilities(pm, pc, "uniform")


# --------------------------------------------------------------------------- loss value


def _naive_loss(zw, zs, anchors, neg, T):
    """Python-loop NT-Xent for given flat anchor / negative indices."""
    B, D, h, w = zw.shape
    zw = torch.nn.functional.normalize(zw, dim=1)
    zs = torch.nn.functional.normalize(zs, dim=1)

    def vec(z, flat):
        b, p = divmod(int(flat), h * w)
        return z[b, :, p // w, p % w]

    total = 0.0
    for a, row in zip(anchors.tolist(), neg.tolist()):
        s_pos = float(vec(zw, a) @ vec(zs, a)) / T
        s_negs = [float(vec(zw, a) @ vec(zs, r)) / T for r in row if r >= 0]
        denom = math.exp(s_pos) + sum(math.exp(s) for s in s_negs)
        total += -math.log(math.exp(s_pos) / denom)
    return total / len(anchors)


@pytest.mark.parametrize("method", ["gumbel", "rejection"])
@pytest.mark.parametrize("sampler", ["fused", "uniform", "class_only"])
def test_loss_equals_naive_reference_for_the_same_negatives(sampler, method):
    B, D, h, w = 3, 5, 8, 8
    g = _gen(1)
    zw = torch.randn(B, D, h, w, generator=g)
    zs = torch.randn(B, D, h, w, generator=g)
    pm, pc = _probs(B, 4, 3, h, w)
    y = None if sampler == "uniform" else fused_pseudo_probabilities(pm, pc, sampler)
    T = 0.2
    loss, d = pixel_contrastive_loss(zw, zs, y, num_anchors=5, num_negatives=7, temperature=T,
                                     sampler=sampler, generator=_gen(2), method=method)
    assert d["anchor_index"].shape == (15,) and d["negative_index"].shape == (15, 7)
    assert (d["negative_index"] >= 0).all()
    ref = _naive_loss(zw, zs, d["anchor_index"], d["negative_index"], T)
    assert float(loss) == pytest.approx(ref, rel=1e-5)


def test_unfilled_slots_are_left_out_of_the_denominator():
    """B=2 images of 2x2 pixels: only 4 candidates in the other image for R=6."""
    zw, zs = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    loss, d = pixel_contrastive_loss(zw, zs, None, num_anchors=4, num_negatives=6,
                                     temperature=0.5, sampler="uniform", generator=_gen())
    neg = d["negative_index"]
    assert ((neg >= 0).sum(1) == 4).all() and (neg[:, 4:] == -1).all()
    assert float(loss) == pytest.approx(_naive_loss(zw, zs, d["anchor_index"], neg, 0.5), rel=1e-5)


def test_strong_branch_gets_no_gradient_weak_branch_does():
    zw = torch.randn(2, 4, 4, 4, requires_grad=True)
    zs = torch.randn(2, 4, 4, 4, requires_grad=True)
    pm, pc = _probs(2, 3, 2, 4, 4)
    loss, _ = pixel_contrastive_loss(zw, zs, fused_pseudo_probabilities(pm, pc), num_anchors=8,
                                     num_negatives=5, temperature=0.07, generator=_gen())
    loss.backward()
    assert zs.grad is None
    assert zw.grad is not None and float(zw.grad.abs().sum()) > 0


def test_deterministic_in_the_generator():
    zw, zs = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    pm, pc = _probs(2, 3, 2, 6, 6)
    y = fused_pseudo_probabilities(pm, pc)
    runs = [pixel_contrastive_loss(zw, zs, y, num_anchors=10, num_negatives=8, temperature=0.1,
                                   generator=_gen(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0][1]["negative_index"], runs[1][1]["negative_index"])
    assert float(runs[0][0]) == float(runs[1][0])
    assert not torch.equal(runs[0][1]["negative_index"], runs[2][1]["negative_index"])


def test_y_is_resized_to_the_embedding_grid():
    """y given at 2x the embedding resolution is area-averaged onto the grid."""
    zw, zs = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    pm, pc = _probs(2, 3, 2, 8, 8)
    y_hi = fused_pseudo_probabilities(pm, pc)
    y_lo = torch.nn.functional.avg_pool2d(y_hi, 2)
    a = pixel_contrastive_loss(zw, zs, y_hi, num_anchors=6, num_negatives=5, temperature=0.1,
                               generator=_gen(3))
    b = pixel_contrastive_loss(zw, zs, y_lo, num_anchors=6, num_negatives=5, temperature=0.1,
                               generator=_gen(3))
    assert torch.equal(a[1]["negative_index"], b[1]["negative_index"])
    assert float(a[0]) == pytest.approx(float(b[0]))


# --------------------------------------------------------------------------- diagnostics


def test_margin_and_similarity_diagnostics_match_their_definitions():
    zw, zs = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    T = 0.5
    _, d = pixel_contrastive_loss(zw, zs, None, num_anchors=4, num_negatives=3, temperature=T,
                                  sampler="uniform", generator=_gen())
    nw = torch.nn.functional.normalize(zw, dim=1).permute(0, 2, 3, 1).reshape(-1, 4)
    ns = torch.nn.functional.normalize(zs, dim=1).permute(0, 2, 3, 1).reshape(-1, 4)
    a, n = d["anchor_index"], d["negative_index"]
    cos_pos = (nw[a] * ns[a]).sum(-1)
    cos_neg = (nw[a][:, None] * ns[n]).sum(-1)
    assert d["pos_distance"] == pytest.approx(float((1 - cos_pos).mean()), abs=1e-6)
    assert d["neg_distance"] == pytest.approx(float((1 - cos_neg).mean()), abs=1e-6)
    assert d["margin"] == pytest.approx(d["neg_distance"] - d["pos_distance"], abs=1e-6)
    assert d["s_pos"] == pytest.approx(float(cos_pos.mean()) / T, abs=1e-5)
    assert d["s_neg"] == pytest.approx(float(cos_neg.mean()) / T, abs=1e-5)
    assert d["num_anchors"] == 8 and d["num_negatives"] == 3


def _two_instance_batch(B=4, h=8, w=8, Q=3, C=2):
    """Left half = instance 0 (class 0), right half = instance 1 (class 1), confident P_m/P_c."""
    ids = torch.zeros(B, h, w, dtype=torch.long)
    ids[..., w // 2:] = 1
    logits = torch.full((B, Q, h, w), -6.0)
    logits[:, 0][ids == 0] = 6.0
    logits[:, 1][ids == 1] = 6.0
    pm = logits.softmax(1)
    pc = torch.full((B, Q, C + 1), 0.02)
    pc[:, 0, 0] = pc[:, 1, 1] = pc[:, 2, C] = 1.0
    pc = pc / pc.sum(-1, keepdim=True)
    return ids, pm, pc


def test_fused_sampling_rarely_draws_the_anchors_own_instance():
    ids, pm, pc = _two_instance_batch()
    zw, zs = torch.randn(4, 8, 8, 8), torch.randn(4, 8, 8, 8)
    fnr = {}
    for s in ("fused", "uniform", "mask_only"):
        y = None if s == "uniform" else fused_pseudo_probabilities(pm, pc, s)
        _, d = pixel_contrastive_loss(zw, zs, y, num_anchors=32, num_negatives=20, temperature=0.1,
                                      sampler=s, generator=_gen(), instance_ids=ids,
                                      candidates="batch")
        fnr[s] = d["fnr"]
    assert fnr["uniform"] > 0.05          # own-instance pixels are 31 of 255 same-image candidates
    assert fnr["fused"] < 0.3 * fnr["uniform"]
    assert fnr["mask_only"] < 0.3 * fnr["uniform"]


def test_fnr_from_pm_when_no_instance_ids_and_same_class_rate():
    ids, pm, pc = _two_instance_batch()
    zw, zs = torch.randn(4, 8, 8, 8), torch.randn(4, 8, 8, 8)
    y = fused_pseudo_probabilities(pm, pc)
    kw = dict(num_anchors=16, num_negatives=10, temperature=0.1, candidates="batch")
    _, a = pixel_contrastive_loss(zw, zs, y, generator=_gen(), instance_ids=ids, class_ids=ids, **kw)
    _, b = pixel_contrastive_loss(zw, zs, y, generator=_gen(), pm=pm, pc=pc, **kw)
    assert a["fnr"] == b["fnr"]            # arg-max query reproduces the layout
    _, u = pixel_contrastive_loss(zw, zs, None, sampler="uniform", generator=_gen(),
                                  class_ids=ids, **kw)
    assert a["same_class_rate"] < 0.3 * u["same_class_rate"]
    _, c = pixel_contrastive_loss(zw, zs, y, generator=_gen(), **kw)
    assert math.isnan(c["fnr"]) and math.isnan(c["same_class_rate"])
    # Other-images sampling (the default) can never hit the anchor's own instance.
    _, o = pixel_contrastive_loss(zw, zs, y, num_anchors=16, num_negatives=10, temperature=0.1,
                                  generator=_gen(), instance_ids=ids)
    assert o["fnr"] == 0.0


def test_background_pixels_never_count_as_false_negatives():
    ids, pm, pc = _two_instance_batch()
    zw, zs = torch.randn(4, 8, 8, 8), torch.randn(4, 8, 8, 8)
    bg = torch.full_like(ids, -1)
    _, d = pixel_contrastive_loss(zw, zs, None, num_anchors=16, num_negatives=10, temperature=0.1,
                                  sampler="uniform", generator=_gen(), instance_ids=bg,
                                  candidates="batch")
    assert d["fnr"] == 0.0


def test_instance_id_helpers():
    ids, pm, pc = _two_instance_batch(B=2)
    assert torch.equal(instance_ids_from_probabilities(pm), ids)
    pc2 = pc.clone()
    pc2[:, 1] = torch.tensor([0.0, 0.0, 1.0])     # query 1 now predicts no-object
    got = instance_ids_from_probabilities(pm, pc2)
    assert torch.equal(got, torch.where(ids == 1, -1, ids))
    m0 = torch.zeros(2, 16, 16, dtype=torch.bool)
    m0[0, :, :8] = True
    m0[1, :4, 8:] = True
    out = instance_ids_from_masks([m0, torch.zeros(0, 16, 16, dtype=torch.bool)], (8, 8))
    assert out.shape == (2, 8, 8)
    assert (out[0, :, :4] == 0).all() and (out[0, :2, 4:] == 1).all() and (out[0, 2:, 4:] == -1).all()
    assert (out[1] == -1).all()


# --------------------------------------------------------------------------- degenerate inputs


def test_single_instance_all_zero_weights_fall_back_to_uniform_without_nan():
    """One query owns every pixel: all y are equal, every s_deb is 0."""
    B, Q, h, w = 3, 4, 4, 4
    pm = torch.zeros(B, Q, h, w)
    pm[:, 0] = 1.0
    pc = torch.full((B, Q, 3), 1 / 3)
    zw = torch.randn(B, 6, h, w, requires_grad=True)
    zs = torch.randn(B, 6, h, w)
    loss, d = pixel_contrastive_loss(zw, zs, fused_pseudo_probabilities(pm, pc), num_anchors=5,
                                     num_negatives=10, temperature=0.07, generator=_gen())
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(zw.grad).all()
    assert d["fallback_uniform"] == d["num_anchors"] == 15
    assert d["num_negatives"] == 10


def test_no_valid_pixels_gives_zero_loss_with_graph():
    zw = torch.randn(2, 4, 3, 3, requires_grad=True)
    loss, d = pixel_contrastive_loss(zw, torch.randn(2, 4, 3, 3), None, num_anchors=4,
                                     num_negatives=3, temperature=0.1, sampler="uniform",
                                     valid=torch.zeros(2, 3, 3, dtype=torch.bool))
    assert float(loss.detach()) == 0.0 and d["num_anchors"] == 0
    loss.backward()
    assert zw.grad is not None


def test_invalid_pixels_are_neither_anchors_nor_negatives():
    valid = torch.zeros(3, 6, 6, dtype=torch.bool)
    valid[:, :3] = True
    _, d = pixel_contrastive_loss(torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6), None,
                                  num_anchors=30, num_negatives=20, temperature=0.1,
                                  sampler="uniform", generator=_gen(), valid=valid)
    flat = valid.flatten()
    assert flat[d["anchor_index"]].all()
    neg = d["negative_index"]
    assert flat[neg[neg >= 0]].all()
    assert d["num_anchors"] == 3 * 18


def test_clear_errors():
    z = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="needs y"):
        pixel_contrastive_loss(z, z, None, num_anchors=2, num_negatives=2, temperature=0.1)
    with pytest.raises(ValueError, match="pixel_contrast.sampler"):
        pixel_contrastive_loss(z, z, None, num_anchors=2, num_negatives=2, temperature=0.1,
                               sampler="nope")
    with pytest.raises(ValueError, match="temperature"):
        pixel_contrastive_loss(z, z, None, num_anchors=2, num_negatives=2, temperature=0.0,
                               sampler="uniform")
    with pytest.raises(ValueError, match="equal shapes"):
        pixel_contrastive_loss(z, z[:, :2], None, num_anchors=2, num_negatives=2, temperature=0.1)


def test_sampler_instance_is_used_as_given():
    s = FusedNegativeSampler("uniform", 3, _gen(), candidates="batch")
    _, d = pixel_contrastive_loss(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), None,
                                  num_anchors=4, num_negatives=99, temperature=0.1, sampler=s)
    assert d["negative_index"].shape == (4, 3)      # R from the sampler, B=1 works with "batch"
    assert (d["negative_index"] != d["anchor_index"][:, None]).all()


# --------------------------------------------------------------------------- temperature


def test_temperature_schedules():
    assert temperature_at(0, 100, 0.3, 0.07) == pytest.approx(0.3)
    assert temperature_at(50, 100, 0.3, 0.07) == pytest.approx(0.185)
    assert temperature_at(100, 100, 0.3, 0.07) == pytest.approx(0.07)
    assert temperature_at(500, 100, 0.3, 0.07) == pytest.approx(0.07)
    assert temperature_at(25, 100, 0.3, 0.07, "cosine") == pytest.approx(
        0.07 + 0.23 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert temperature_at(10, 100, 0.0, 0.07) == 0.07     # temperature_start 0 = no annealing
    with pytest.raises(ValueError, match="schedule"):
        temperature_at(1, 10, 0.3, 0.07, "exp")


def test_chunked_negative_cosine_matches_autograd_einsum(monkeypatch):
    """The memory-saving negative-similarity op has the plain einsum's values and gradients."""
    import sskd.losses.pixel_contrastive as pc_mod
    orig = pc_mod._chunks
    monkeypatch.setattr(pc_mod, "_chunks", lambda idx, D: orig(idx, D, budget=2 * 3 * 4))  # 2 rows
    za = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    zs = torch.randn(9, 4, dtype=torch.float64)
    idx = torch.randint(9, (5, 3), generator=_gen())
    got = pc_mod._NegativeCosine.apply(za, zs, idx)
    ref = torch.einsum("nd,nrd->nr", za, zs[idx])
    assert torch.allclose(got, ref)
    gout = torch.randn(5, 3, dtype=torch.float64)
    (g1,) = torch.autograd.grad(got, za, gout)
    (g2,) = torch.autograd.grad(ref, za, gout)
    assert torch.allclose(g1, g2)
    assert torch.autograd.gradcheck(lambda a: pc_mod._NegativeCosine.apply(a, zs, idx), (za,))


def test_generator_on_another_device_gets_a_clear_error():
    class FakeGen:
        device = torch.device("cuda", 0)
    z = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="torch.Generator\\(device='cpu'\\)"):
        pixel_contrastive_loss(z, z, None, num_anchors=2, num_negatives=2, temperature=0.1,
                               sampler="uniform", generator=FakeGen())
