"""Mask2Former-family specifics: shapes per input size, losses, EMA head, freezing, sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sskd.models import build_model
from sskd.models.dpt_neck import reassemble_factors
from sskd.models.heads import ema_update
from sskd.models.mask2former import Mask2FormerSegmenter
from sskd.models.sizes import DEFAULTS, SIZES

K = 3


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def tiny(**kw) -> Mask2FormerSegmenter:
    torch.manual_seed(0)
    return build_model("mask2former", K, size="tiny", **kw)


def _square_targets(S: int) -> list[dict]:
    m = torch.zeros(2, S, S)
    m[0, : S // 2, : S // 2] = 1
    m[1, S // 2:, S // 3:] = 1
    return [{"masks": m, "labels": torch.tensor([0, 2])}] * 2


@pytest.mark.parametrize("hw", [(64, 64), (96, 64), (128, 128), (32, 40)])
def test_output_shapes_patch8(hw):
    model = tiny()
    H, W = hw
    out = model(torch.rand(2, 3, H, W), embeddings="both")
    Q, D = model.cfg["num_queries"], model.cfg["embed_dim"]
    assert out.class_logits.shape == (2, Q, K + 1)
    assert out.mask_logits.shape == (2, Q, H // 4, W // 4)
    assert len(out.aux) == model.cfg["dec_layers"]  # query-only prediction + all but the last layer
    for c, m in out.aux:
        assert c.shape == out.class_logits.shape and m.shape == out.mask_logits.shape
    assert out.embed_weak.shape == out.embed_strong.shape == (2, D, H // 4, W // 4)
    # L2-normalised pixel embeddings; the strong branch is stop-gradient
    assert torch.allclose(out.embed_weak.norm(dim=1), torch.ones(2, H // 4, W // 4), atol=1e-5)
    assert out.embed_weak.requires_grad and not out.embed_strong.requires_grad


def test_patch14_gives_exact_stride4_masks():
    assert reassemble_factors(8) == [2, 1, 0.5, 0.25]
    assert reassemble_factors(14) == [4, 2, 1, 0.5]
    model = tiny(patch_size=14, encoder_image_size=56)
    out = model(torch.rand(1, 3, 56, 84))
    assert out.mask_logits.shape[-2:] == (14, 21)


@pytest.mark.parametrize("readout", ["add", "project"])
def test_cls_readout_variants(readout):
    model = tiny(readout=readout)
    out = model(torch.rand(1, 3, 32, 32))
    assert out.mask_logits.shape == (1, model.cfg["num_queries"], 8, 8)
    assert (readout == "project") == any("readout_projects" in n for n, _ in model.named_parameters())


def test_embedding_modes_and_bad_inputs():
    model = tiny()
    x = torch.rand(1, 3, 32, 32)
    assert model(x).embed_weak is None and model(x).embed_strong is None
    assert model(x, "weak").embed_strong is None and model(x, "strong").embed_weak is None
    with pytest.raises(ValueError, match="embeddings must be one of"):
        model(x, embeddings="all")
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        model(torch.rand(1, 3, 36, 32))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        model(torch.rand(3, 32, 32))


def test_loss_is_weighted_sum_with_deep_supervision():
    model = tiny()
    out = model(torch.rand(2, 3, 32, 32))
    targets = _square_targets(32)
    torch.manual_seed(0)
    full = model.compute_losses(out, targets)
    out.aux = []
    torch.manual_seed(0)
    last = model.compute_losses(out, targets)
    expected = 2.0 * last["loss_ce"] + 5.0 * last["loss_mask"] + 5.0 * last["loss_dice"]
    assert torch.allclose(last["loss"], expected)
    # every auxiliary prediction adds its own (positive) set-prediction loss
    assert full["loss"] > 1.5 * last["loss"]


def test_empty_batch_loss_only_pushes_queries_to_no_object():
    model = tiny()
    out = model(torch.rand(2, 3, 32, 32))
    empty = {"masks": torch.zeros(0, 32, 32), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model.compute_losses(out, [empty, empty])
    assert losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    # CE of every query against no-object, weighted by no_object_weight (weighted mean = plain mean)
    ce = nn.functional.cross_entropy(out.class_logits.flatten(0, 1),
                                     torch.full((2 * model.cfg["num_queries"],), K))
    assert torch.allclose(losses["loss_ce"], ce, atol=1e-6)


def test_target_validation_errors():
    model = tiny()
    out = model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="class ids in"):
        model.compute_losses(out, [{"masks": torch.ones(1, 32, 32), "labels": torch.tensor([K])}])
    with pytest.raises(ValueError, match="N x H x W"):
        model.compute_losses(out, [{"masks": torch.ones(2, 32, 32), "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="targets for a batch"):
        model.compute_losses(out, [])


def _two_image_problem(S: int = 32):
    x = torch.full((2, 3, S, S), 0.2)
    m0 = torch.zeros(2, S, S)
    m0[0, 2:14, 3:15] = 1
    m0[1, 18:30, 16:30] = 1
    m1 = torch.zeros(1, S, S)
    m1[0, 8:26, 6:24] = 1
    red, blue = torch.tensor([0.9, 0.1, 0.1])[:, None, None], torch.tensor([0.1, 0.1, 0.9])[:, None, None]
    x[0, :, 2:14, 3:15] = red
    x[0, :, 18:30, 16:30] = blue
    x[1, :, 8:26, 6:24] = red
    return x, [{"masks": m0, "labels": torch.tensor([0, 1])}, {"masks": m1, "labels": torch.tensor([0])}]


def test_overfits_two_images():
    model = tiny()
    x, targets = _two_image_problem()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    torch.manual_seed(0)
    history = []
    for _ in range(30):
        loss = model.compute_losses(model(x), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history


def test_ema_strong_head_follows_weak_head():
    model = tiny(ema_momentum=0.9)
    weak, strong = model.embed_weak, model.embed_strong
    assert all(torch.equal(a, b) for a, b in zip(weak.parameters(), strong.parameters()))
    assert not any(p.requires_grad for p in strong.parameters())
    with torch.no_grad():
        for p in weak.parameters():
            p.add_(1.0)
    before = [s.clone() for s in strong.parameters()]
    dist = lambda: sum((w - s).norm() for w, s in zip(weak.parameters(), strong.parameters()))
    d0 = dist()
    model.after_optimizer_step()
    assert dist() < d0
    for b, s, w in zip(before, strong.parameters(), weak.parameters()):
        assert torch.allclose(s, 0.9 * b + 0.1 * w)
    # converges to the weak head when the latter stops moving
    for _ in range(200):
        ema_update(strong, weak, 0.9)
    assert dist() < 1e-4


NO_ENCODER = ["neck", "pixel_decoder", "decoder", "class_head", "projection_head"]


def test_parts_cover_every_parameter_but_the_ema_head():
    model = tiny()
    parts = model.parts()
    assert list(parts) == ["encoder", "neck", "pixel_decoder", "decoder", "class_head",
                           "projection_head"]
    named = [n for n, _ in model.named_parameters()]
    in_parts = [n for names in parts.values() for n in names]
    assert sorted(in_parts) == sorted(n for n in named if not n.startswith("embed_strong."))
    assert parts["decoder"][0].startswith("transformer.")
    assert model.trainable == tuple(parts)                     # default: the whole network
    assert model.trainable_parameter_names() == in_parts
    assert model.resolve_trainable(["default"]) == model.resolve_trainable("all") == tuple(parts)
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['backbone'\]"):
        model.set_trainable(["backbone"])


def test_frozen_encoder_and_param_groups():
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    enc = [n for n in names if model.is_encoder_parameter(n)]
    assert enc and all(n.startswith("encoder.") for n in enc)
    assert any(n.startswith("pixel_decoder.encoder.") for n in names)  # not the backbone
    assert not any(model.is_encoder_parameter(n) for n in names if n.startswith("pixel_decoder."))
    groups = {g["name"]: g for g in model.param_groups(1e-3, 0.1)}
    assert groups["encoder"]["lr"] == pytest.approx(1e-4)
    assert len(groups["encoder"]["params"]) == len(enc)

    frozen = tiny(trainable=NO_ENCODER)
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    assert [g["name"] for g in frozen.param_groups(1e-3, 0.1)] == ["heads"]
    frozen.train()
    assert not frozen.encoder.training and frozen.pixel_decoder.training
    x, targets = _two_image_problem()
    frozen.compute_losses(frozen(x), targets)["loss"].backward()
    assert all(p.grad is None for p in frozen.encoder.parameters())
    assert all(p.grad is not None for p in frozen.transformer.parameters())
    with pytest.warns(DeprecationWarning, match="trainable"):
        legacy = tiny(freeze_encoder=True)                       # old model.json files
    assert legacy.trainable == tuple(NO_ENCODER)


def test_trainable_after_loading_survives_save_load(tmp_path):
    from sskd.models import load_model

    model = tiny()
    model.save(tmp_path / "pretrained")
    teacher = load_model(tmp_path / "pretrained")
    assert all(p.requires_grad for p in teacher.encoder.parameters())
    teacher.set_trainable(NO_ENCODER)
    assert not any(p.requires_grad for p in teacher.encoder.parameters())
    teacher.save(tmp_path / "adapted")
    again = load_model(tmp_path / "adapted")
    assert again.trainable == tuple(NO_ENCODER)
    assert not any(p.requires_grad for p in again.encoder.parameters())
    again.set_trainable(["all"])
    assert all(p.requires_grad for p in again.encoder.parameters())
    assert not any(p.requires_grad for p in again.embed_strong.parameters())


def test_loss_runs_in_float32_under_autocast():
    model = tiny()
    x, targets = _two_image_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        losses = model.compute_losses(out, targets)
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])


def test_initialisation_is_sane():
    model = tiny()
    for name, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)):
            assert torch.all(m.weight == 1), f"{name}: norm gamma must start at 1"
    level = model.pixel_decoder.level_embed
    assert torch.isfinite(level).all() and 0.3 < level.std() < 3
    attn = model.pixel_decoder.encoder.layers[0].self_attn
    assert torch.all(attn.sampling_offsets.weight == 0) and attn.sampling_offsets.bias.abs().max() > 0


def test_unknown_size_and_option_errors():
    with pytest.raises(KeyError, match="unknown mask2former size"):
        build_model("mask2former", K, size="huge")
    with pytest.raises(TypeError, match="unknown mask2former option"):
        build_model("mask2former", K, size="tiny", hiden_dim=3)
    with pytest.raises(ValueError, match="dec_layers must be >= 3"):
        build_model("mask2former", K, size="tiny", dec_layers=2)
    with pytest.raises(ValueError, match="last encoder block"):
        build_model("mask2former", K, size="tiny", out_layers=[0, 0, 0, 0])


def _count(size: str) -> tuple[int, int]:
    with torch.device("meta"):  # count without allocating (teacher_paper has ~350M params)
        model = build_model("mask2former", 8, size=size)
    enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
    return model.num_parameters(), enc


def test_sizes_param_counts():
    assert set(SIZES) >= {"tiny", "student_demo", "teacher_demo", "student_paper", "teacher_paper"}
    assert all(set(v) <= set(DEFAULTS) for v in SIZES.values())
    student, _ = _count("student_demo")
    teacher, teacher_enc = _count("teacher_demo")
    assert teacher >= 10 * student
    assert teacher_enc > 0.6 * teacher  # adapting with a frozen encoder is cheap
    paper_student, paper_enc = _count("student_paper")
    assert 22.0e6 < paper_enc < 22.1e6  # ViT-S/14
    assert 48e6 < paper_student < 56e6  # the paper: about 52M (docs/method.md)
    paper_teacher, paper_teacher_enc = _count("teacher_paper")
    assert 304.0e6 < paper_teacher_enc < 304.5e6  # ViT-L/14
    assert paper_teacher > 6 * paper_student


def test_pixel_embeddings_fast_path_equals_full_forward():
    import torch
    from sskd.models import build_model
    torch.manual_seed(0)
    m = build_model("mask2former", 3, size="tiny").eval()
    x = torch.rand(2, 3, 32, 32)
    full = m(x, embeddings="both")
    assert torch.allclose(m.pixel_embeddings(x, "weak"), full.embed_weak, atol=1e-6)
    assert torch.allclose(m.pixel_embeddings(x, "strong"), full.embed_strong, atol=1e-6)
    assert not m.pixel_embeddings(x, "strong").requires_grad


def _disc(cx: int, cy: int, r: int, n: int = 16) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).float()


def _square(x0: int, y0: int, s: int, n: int = 16) -> torch.Tensor:
    m = torch.zeros(n, n)
    m[y0:y0 + s, x0:x0 + s] = 1
    return m


def test_silhouette_head_factorises_classes_and_no_object_queries_leave_it_alone():
    plain, with_head = tiny(), tiny(silhouette_channels=4)
    assert "silhouette_head" not in dict(plain.named_children())
    missing, unexpected = with_head.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("silhouette_head.") for k in missing)
    assert with_head.parts()["class_head"][-1].startswith("silhouette_head.")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        with_head.silhouette_head.classify.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    a, b = plain(x), with_head(x)
    pairs = list(zip(a.aux, b.aux)) + [((a.class_logits, None), (b.class_logits, None))]
    for i, ((cp, _), (cw, _)) in enumerate(pairs):
        # log-probabilities: p(no obj) from the linear head's last logit, p(c | obj) from its
        # other logits plus, in the final layer only, the silhouette head's (here 1, 2, 3)
        assert torch.allclose(cw.logsumexp(-1), torch.zeros(()), atol=1e-5)
        assert torch.allclose(cw[..., -1], nn.functional.logsigmoid(cp[..., -1]), atol=1e-5)
        bias = torch.tensor([1.0, 2.0, 3.0]) if i == len(pairs) - 1 else torch.zeros(3)
        fg = (cp[..., :-1] + bias).softmax(-1)
        assert torch.allclose(cw[..., :-1].softmax(-1), fg, atol=1e-5)
    # every query labelled "no object": the loss trains p(obj) only, not the silhouette head
    with_head.silhouette_head.classify.weight.data.normal_()
    empty = [{"masks": torch.zeros(0, 32, 32), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    with_head.compute_losses(with_head(x), empty)["loss"].backward()
    grads = [p.grad for p in with_head.silhouette_head.parameters() if p.grad is not None]
    assert all(g.abs().max() < 1e-6 for g in grads)   # zero up to float rounding
    assert with_head.class_head.weight.grad[-1].abs().max() > 1e-3


def test_silhouette_head_is_detached_translation_invariant_and_learns_outlines():
    from sskd.models.heads import SilhouetteClassHead
    torch.manual_seed(0)
    head = SilhouetteClassHead(num_logits=3, channels=8)
    logits = torch.randn(1, 2, 16, 16, requires_grad=True)
    head.classify.weight.data.normal_()
    head(logits).sum().backward()
    assert logits.grad is None  # the class loss never reaches the masks
    # mask logits of circles (class 0) and squares (class 1) of a few sizes and positions
    shapes, labels = [], []
    for r in (3, 4, 5):
        for c in (5, 8, 10):
            shapes += [_disc(c, c, r), _square(c - r, c - r, 2 * r)]
            labels += [0, 1]
    x = torch.stack(shapes)[None] * 40 - 20                 # 1 x N x 16 x 16 logits
    y = torch.tensor(labels)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(head(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (head(x)[0].argmax(-1) == y).all()
    # the same outline moved by an even number of pixels (the 2x2 pool's stride), away from the
    # border by more than the receptive field (7 px), gives the same logits
    here = torch.stack([_disc(12, 12, 4, n=32), _square(9, 9, 7, n=32)])[None] * 40 - 20
    moved = torch.stack([_disc(16, 14, 4, n=32), _square(13, 11, 7, n=32)])[None] * 40 - 20
    assert torch.allclose(head(here), head(moved), atol=1e-5)
    assert not torch.allclose(head(here)[0, 0], head(here)[0, 1], atol=1e-2)


def test_silhouette_loss_trains_the_head_on_the_target_masks():
    model = tiny(silhouette_channels=4)
    x = torch.rand(2, 3, 32, 32)
    targets = _square_targets(32)
    losses = model.compute_losses(model(x), targets)
    # the head starts at zero: uniform over the K classes on every target mask
    assert torch.allclose(losses["loss_silhouette"], torch.log(torch.tensor(float(K))), atol=1e-5)
    with torch.no_grad():
        model.silhouette_head.classify.weight.normal_()
    out = model(x)
    torch.manual_seed(1)  # the mask losses sample points at random
    losses = model.compute_losses(out, targets)
    torch.manual_seed(1)
    model._silhouette_loss = lambda *a: torch.zeros(())
    without = model.compute_losses(out, targets)
    del model._silhouette_loss
    # weighted like the class loss (class_weight 2.0), on top of the set-prediction losses
    assert losses["loss_silhouette"] > 0
    assert torch.allclose(losses["loss"] - without["loss"], 2.0 * losses["loss_silhouette"], atol=1e-4)
    losses["loss"].backward()
    for name, p in model.silhouette_head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    empty = [{"masks": torch.zeros(0, 32, 32), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert model.compute_losses(model(x), empty)["loss_silhouette"].item() == 0.0


def test_silhouette_only_reads_classes_from_the_outline_alone():
    with pytest.raises(ValueError, match="silhouette_channels > 0"):
        tiny(silhouette_only=True)
    model = tiny(silhouette_channels=4, silhouette_only=True)
    assert model.class_head.out_features == 1  # object vs no object only
    with torch.no_grad():
        model.silhouette_head.classify.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.rand(2, 3, 32, 32)
    out = model(x)
    final_fg = torch.tensor([1.0, 2.0, 3.0]).softmax(-1)
    for i, (c, _) in enumerate(out.aux + [(out.class_logits, None)]):
        assert c.shape[-1] == K + 1
        assert torch.allclose(c.logsumexp(-1), torch.zeros(()), atol=1e-5)
        fg = c[..., :-1].softmax(-1)
        want = final_fg if i == len(out.aux) else torch.full((K,), 1.0 / K)
        assert torch.allclose(fg, want.expand_as(fg), atol=1e-5)
    with torch.no_grad():
        model.silhouette_head.classify.weight.normal_()
    out = model(x, embeddings="weak")
    loss = model.compute_losses(out, _square_targets(32))["loss"] + out.embed_weak.mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    for name, p in [*model.class_head.named_parameters(), *model.silhouette_head.named_parameters()]:
        assert p.grad.abs().sum() > 0, name
