"""Grounding DINO + SAM/SAM2 teacher: tiny offline builds, outputs, losses, trainable parts,
weights."""

from __future__ import annotations

import math

import pytest
import torch

from sskd.models import build_model, load_model
from sskd.models import grounded_sam_configs as gc
from sskd.models.base import SegmenterOutput
from sskd.models.grounded_sam import DEFAULT_TRAINABLE, FILL_LOGIT, TRAINABLE_GROUPS
from sskd.models.grounded_sam_loss import masks_to_boxes_cxcywh

CLASSES = ["circle", "rectangle", "triangle"]
ALL_GROUPS = tuple(TRAINABLE_GROUPS)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(old)


def tiny(tmp_path, mask_model="sam", **kw):
    return build_model("grounded_sam", num_classes=len(kw.get("classes", CLASSES)), size="tiny",
                       classes=kw.pop("classes", CLASSES), mask_model=mask_model,
                       vocab_dir=str(tmp_path / "vocab"), **kw)


def scene(batch=2, size=64):
    """Images with a red and a green rectangle in image 0; image 1 has no instances."""
    x = torch.full((batch, 3, size, size), 0.2)
    masks = torch.zeros(2, size, size)
    masks[0, 6:26, 8:34] = 1
    masks[1, 34:60, 30:56] = 1
    x[0, :, 6:26, 8:34] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    x[0, :, 34:60, 30:56] = torch.tensor([0.1, 0.9, 0.1])[:, None, None]
    targets = [{"masks": masks, "labels": torch.tensor([1, 0])}]
    targets += [{"masks": torch.zeros(0, size, size), "labels": torch.zeros(0, dtype=torch.long)}
                for _ in range(batch - 1)]
    return x, targets


# --------------------------------------------------------------------------- text prompt


def test_tiny_vocab_and_prompt_tokens(tmp_path):
    classes = ["circle", "Traffic Light", "triangle"]
    vocab = gc.write_tiny_vocab(classes, tmp_path)
    lines = vocab.read_text().split()
    assert lines[:7] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"]
    assert sorted(lines[7:]) == ["circle", "light", "traffic", "triangle"]
    tok = gc.load_vocab_tokenizer(vocab)
    (chunk,) = gc.build_prompts(tok, classes, max_text_len=32)
    # identical to tokenising the prompt string Grounding DINO is normally given
    assert chunk.input_ids.tolist() == tok("circle . traffic light . triangle .")["input_ids"]
    words = tok.convert_ids_to_tokens(chunk.input_ids.tolist())
    for k, name in enumerate(classes):
        assert [words[i] for i in chunk.token_map[k].nonzero()[:, 0]] == name.lower().split()
    assert chunk.class_ids == [0, 1, 2]
    assert gc.delimiter_token_ids(tok).tolist() == [2, 3, 5, 6]


def test_long_class_lists_are_split_into_prompts(tmp_path):
    classes = [f"thing{i}" for i in range(9)]
    tok = gc.load_vocab_tokenizer(gc.write_tiny_vocab(classes, tmp_path))
    chunks = gc.build_prompts(tok, classes, max_text_len=8)   # [CLS] a . b . c . [SEP]
    assert [c.class_ids for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert all(len(c.input_ids) <= 8 for c in chunks)
    with pytest.raises(ValueError, match="no tokens"):
        gc.build_prompts(tok, ["circle", "  "], max_text_len=8)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("mask_model", ["sam", "sam2"])
def test_tiny_builds_offline_and_output_shapes(tmp_path, mask_model):
    model = tiny(tmp_path, mask_model)
    assert (tmp_path / "vocab" / "vocab.txt").is_file()
    x, _ = scene()
    out = model(x, embeddings="both")
    Q = model.detector.config.num_queries
    assert out.class_logits.shape == (2, Q, 4)
    assert torch.all(out.class_logits[..., -1] == 0)            # no-object column
    assert out.mask_logits.shape == (2, Q, 32, 32)              # SAM low-res masks, stride 2
    assert out.extras["pred_boxes"].shape == (2, Q, 4)
    assert out.extras["pred_boxes"].min() >= 0 and out.extras["pred_boxes"].max() <= 1
    assert out.extras["iou_scores"].shape == (2, Q)
    assert out.embed_weak.shape == out.embed_strong.shape == (2, 128, 8, 8)
    assert torch.allclose(out.embed_weak.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    assert out.embed_weak.requires_grad and not out.embed_strong.requires_grad
    assert model(x).embed_weak is None


def test_class_logits_are_max_over_each_class_tokens(tmp_path):
    model = tiny(tmp_path, classes=["circle", "traffic light", "triangle"]).eval()
    seen = {}

    def grab(module, inputs, output):
        seen["logits"] = output.logits

    model.detector.register_forward_hook(grab)
    out = model(scene()[0])
    tok = seen["logits"]                                         # B x Q x max_text_len
    raw = torch.stack([tok[..., 1], tok[..., 3:5].amax(-1), tok[..., 6]], -1)  # token spans
    cal = model.class_calibration
    assert torch.allclose(out.class_logits[..., :3], raw * cal.scale + cal.bias, atol=1e-5)


def test_classes_in_other_prompts_get_fill_logit(tmp_path):
    classes = [f"red shape s{i}" for i in range(9)]            # 3 tokens + "." each: 7 per prompt
    model = tiny(tmp_path, classes=classes).eval()
    assert [c.class_ids for c in model.prompts] == [list(range(7)), [7, 8]]
    out = model(scene(batch=1)[0])
    Q = model.detector.config.num_queries
    assert out.class_logits.shape == (1, 2 * Q, 10)
    assert torch.all(out.class_logits[0, :Q, 7:9] == FILL_LOGIT)
    assert torch.all(out.class_logits[0, Q:, :7] == FILL_LOGIT)
    assert torch.all(out.class_logits[0, :Q, :7] != FILL_LOGIT)
    assert out.mask_logits.shape[1] == 2 * Q


def test_num_mask_queries_keeps_top_scoring_queries(tmp_path):
    model = tiny(tmp_path).eval()
    x = scene()[0]
    full = model(x)
    model.num_mask_queries = 3
    top = model(x)
    assert top.class_logits.shape[1] == top.mask_logits.shape[1] == 3
    best = full.class_logits[..., :-1].amax(-1).topk(3, dim=1).values
    assert torch.allclose(top.class_logits[..., :-1].amax(-1), best)


# --------------------------------------------------------------------------- losses / training


@pytest.mark.parametrize("mask_model", ["sam", "sam2"])
def test_forward_backward_every_trainable_param_gets_gradient(tmp_path, mask_model):
    model = tiny(tmp_path, mask_model, trainable=ALL_GROUPS).train()
    x, targets = scene()
    out = model(x, embeddings="weak")
    losses = model.compute_losses(out, targets)
    assert set(losses) == {"loss", "loss_class", "loss_bbox", "loss_giou", "loss_mask",
                           "loss_dice", "loss_iou"}
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["loss"] + out.embed_weak.mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen_with_grad = [n for n, p in model.named_parameters()
                        if not p.requires_grad and p.grad is not None]
    assert frozen_with_grad == []


def test_zero_targets_give_finite_loss(tmp_path):
    model = tiny(tmp_path)
    x, targets = scene(batch=2)
    empty = [targets[1], targets[1]]
    losses = model.compute_losses(model(x), empty)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0   # class term pushes all down
    assert losses["loss_bbox"] == 0 and losses["loss_mask"] == 0
    losses["loss"].backward()


def test_select_keeps_extras_and_missing_extras_is_a_clear_error(tmp_path):
    model = tiny(tmp_path)
    x, targets = scene()
    out = model(x)
    part = out.select(slice(0, 1))
    assert part.extras["pred_boxes"].shape[0] == 1
    assert torch.isfinite(model.compute_losses(part, targets[:1])["loss"])
    bare = SegmenterOutput(out.class_logits, out.mask_logits)
    with pytest.raises(KeyError, match="pred_boxes"):
        model.compute_losses(bare, targets)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        model.compute_losses(out, [{"masks": targets[0]["masks"], "labels": torch.tensor([0, 7])},
                                   targets[1]])


def test_masks_to_boxes():
    m = torch.zeros(2, 10, 20)
    m[0, 2:4, 5:15] = 1
    boxes = masks_to_boxes_cxcywh(m)
    assert torch.allclose(boxes[0], torch.tensor([10 / 20, 3 / 10, 10 / 20, 2 / 10]))
    assert torch.all(boxes[1] == 0)


def test_adaptation_reduces_the_loss(tmp_path):
    model = tiny(tmp_path, trainable=ALL_GROUPS).train()
    x, targets = scene(batch=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for _ in range(25):
        losses = model.losses(x, targets)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        model.after_optimizer_step()
        history.append(losses["loss"].item())
    assert min(history[-5:]) < 0.75 * history[0]


# --------------------------------------------------------------------------- trainable parts


def _trainable_names(model):
    return {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}


def test_trainable_option_controls_requires_grad(tmp_path):
    default = _trainable_names(tiny(tmp_path))
    assert any(n.startswith("class_calibration.") for n in default)
    assert any(n.startswith("detector.bbox_embed.") for n in default)
    assert any(n.startswith("detector.model.decoder.layers.") for n in default)
    assert any(n.startswith("sam.mask_decoder.transformer.") for n in default)
    assert any(n.startswith("embed_weak.") for n in default)
    frozen = ("detector.model.encoder.", "detector.model.backbone.", "sam.vision_encoder.",
              "detector.model.text_backbone.", "sam.prompt_encoder.", "embed_strong.")
    assert not any(n.startswith(frozen) for n in default)
    only_heads = _trainable_names(tiny(tmp_path, trainable=("projection_head",)))
    assert only_heads and all(n.startswith("embed_weak.") for n in only_heads)
    decoder = _trainable_names(tiny(tmp_path, trainable=("decoder",)))
    assert any(n.startswith("detector.model.decoder.layers.") for n in decoder)
    assert not any("bbox_embed" in n or n.startswith(("sam.", "embed_weak.")) for n in decoder)
    everything = _trainable_names(tiny(tmp_path, "sam2", trainable=("all",)))
    assert any(n.startswith("sam.vision_encoder.") for n in everything)
    assert any(n.startswith("detector.model.text_backbone.") for n in everything)
    never = ("embed_strong.", "sam.mask_decoder.output_hypernetworks_mlps.1.",
             "sam.mask_decoder.pred_obj_score_head.", "detector.model.enc_output",
             "sam.prompt_encoder.mask_embed.", "sam.prompt_encoder.not_a_point_embed.")
    assert not any(n.startswith(never) for n in everything)
    with pytest.raises(ValueError, match="unknown part"):
        tiny(tmp_path, trainable=("vision_tower",))


@pytest.mark.parametrize("mask_model,counts", [
    ("sam2", {"class_head": 4, "box_head": 2244, "decoder": 36704, "mask_decoder": 34304,
              "projection_head": 5280}),
    ("sam", {"class_head": 4, "box_head": 2244, "decoder": 36704, "mask_decoder": 33876,
             "projection_head": 5280})])
def test_default_parts_and_their_parameter_counts(tmp_path, mask_model, counts):
    """The documented default: detector decoder + heads, SAM's mask decoder, projection head."""
    model = tiny(tmp_path, mask_model)
    params = dict(model.named_parameters())
    trained = {}
    for n in model.trainable_parameter_names():
        trained[model.part_of(n)] = trained.get(model.part_of(n), 0) + params[n].numel()
    assert trained == counts
    assert model.trainable == DEFAULT_TRAINABLE == tuple(counts)
    assert model.config["trainable"] == list(counts)       # saved with the model


def test_frozen_parts_stay_in_eval_mode(tmp_path):
    model = tiny(tmp_path).train()
    assert model.training and model.sam.mask_decoder.training
    assert model.detector.model.decoder.training
    assert not model.detector.model.backbone.training
    assert not model.detector.model.text_backbone.training
    assert not model.sam.vision_encoder.training
    assert not model.detector.model.encoder.training             # not in the default parts
    assert model.is_encoder_parameter("sam.vision_encoder.neck.conv1.weight")
    model.set_trainable(["all"])
    assert model.sam.vision_encoder.training and model.detector.model.backbone.training


def test_mm_grounding_dino_checkpoint_loads(tmp_path):
    """The public Swin-L Grounding DINO (MM-Grounding-DINO-L) has its own model type."""
    from transformers import MMGroundingDinoConfig, MMGroundingDinoForObjectDetection
    tok = gc.load_vocab_tokenizer(gc.write_tiny_vocab(CLASSES, tmp_path / "mm"))
    base = gc.detector_config("tiny", len(tok))
    keep = {k: getattr(base, k) for k in (
        "num_queries", "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim",
        "decoder_ffn_dim", "encoder_attention_heads", "decoder_attention_heads",
        "encoder_n_points", "decoder_n_points", "max_text_len")}
    cfg = MMGroundingDinoConfig(backbone_config=base.backbone_config,
                                text_config=base.text_config, **keep)
    MMGroundingDinoForObjectDetection(cfg).save_pretrained(tmp_path / "mm")
    tok.save_pretrained(tmp_path / "mm")
    model = build_model("grounded_sam", 3, classes=CLASSES, detector_weights=str(tmp_path / "mm"),
                        mask_model="sam2", detector_size=0)
    out = model(scene()[0])
    assert out.class_logits.shape[-1] == 4 and torch.isfinite(out.class_logits[..., :3]).all()
    biases = [n for n in model.trainable_parameter_names() if ".class_embed." in n]
    assert biases and all(model.part_of(n) == "class_head" for n in biases)


def test_strong_head_follows_weak_head_by_ema(tmp_path):
    model = tiny(tmp_path, ema_momentum=0.5)
    w = next(model.embed_weak.parameters())
    s = next(model.embed_strong.parameters())
    assert torch.equal(w, s) and not s.requires_grad
    with torch.no_grad():
        w.add_(1.0)
    before = s.clone()
    model.after_optimizer_step()
    assert torch.allclose(s, before + 0.5)


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("mask_model", ["sam", "sam2"])
def test_predict_format(tmp_path, mask_model):
    model = tiny(tmp_path, mask_model, score_threshold=0.0, max_instances=4)
    x = torch.rand(3, 3, 64, 80)                                # non-square: SAM pads, SAM2 resizes
    preds = model.predict(x)
    assert len(preds) == 3
    for p in preds:
        assert p.masks.dtype == torch.bool and p.masks.shape[1:] == (64, 80)
        assert p.masks.shape[0] == len(p.scores) == len(p.class_ids) <= 4
        assert p.masks.flatten(1).any(1).all()                  # no empty instance
        assert p.masks.sum(0).max() <= 1                         # each pixel <= 1 instance
        assert torch.all((p.scores >= 0) & (p.scores <= 1))
        assert torch.all(p.scores[:-1] >= p.scores[1:])
        assert torch.all((p.class_ids >= 0) & (p.class_ids < 3))
    assert sum(len(p) for p in preds) > 0
    assert all(len(p) == 0 for p in model.predict(x, score_threshold=1.01))


def test_save_load_gives_identical_outputs(tmp_path):
    model = tiny(tmp_path, "sam2", classes=["circle", "traffic light"]).eval()
    with torch.no_grad():
        model.class_calibration.bias.add_(0.3)                 # not the init value
    model.save(tmp_path / "saved")
    loaded = load_model(tmp_path / "saved").eval()
    assert loaded.classes == ["circle", "traffic light"] and loaded.mask_model_name == "sam2"
    x = scene()[0]
    a, b = model(x, embeddings="both"), loaded(x, embeddings="both")
    for f in ("class_logits", "mask_logits", "embed_weak", "embed_strong"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


# --------------------------------------------------------------------------- weights


def test_missing_weights_name_the_files_and_the_fix(tmp_path, monkeypatch):
    with pytest.raises(gc.TeacherWeightsError) as e:
        build_model("grounded_sam", 3, classes=CLASSES, detector_weights=str(tmp_path / "gdino"))
    msg = str(e.value)
    for part in ("config.json", "model.safetensors", "vocab.txt", "preprocessor_config.json",
                 "huggingface-cli download openmmlab-community/mm_grounding_dino_large_all",
                 "IDEA-Research/grounding-dino-base", "detector_weights"):
        assert part in msg
    (tmp_path / "sam").mkdir()
    (tmp_path / "sam" / "config.json").write_text("{}")
    with pytest.raises(gc.TeacherWeightsError,
                       match="lacks model.safetensors or pytorch_model.bin"):
        build_model("grounded_sam", 3, sam_weights=str(tmp_path / "sam"), mask_model="sam2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(gc.TeacherWeightsError, match="HF_HUB_OFFLINE"):
        build_model("grounded_sam", 3, classes=CLASSES, sam_weights="facebook/sam2.1-not-cached",
                    mask_model="sam2")
    with pytest.raises(ValueError, match="classes"):
        build_model("grounded_sam", 3, detector_weights=str(tmp_path / "gdino"))


def test_local_checkpoints_load_and_are_type_checked(tmp_path):
    src = tiny(tmp_path, "sam").eval()
    tok = gc.load_vocab_tokenizer(gc.write_tiny_vocab(CLASSES, tmp_path / "det"))
    src.detector.save_pretrained(tmp_path / "det")
    tok.save_pretrained(tmp_path / "det")
    src.sam.save_pretrained(tmp_path / "sam")
    loaded = build_model("grounded_sam", 3, classes=CLASSES, detector_weights=str(tmp_path / "det"),
                         sam_weights=str(tmp_path / "sam"), mask_model="sam",
                         detector_size=0).eval()
    assert loaded.class_calibration.scale.item() == 1.0      # pretrained: identity calibration
    loaded.class_calibration.load_state_dict(src.class_calibration.state_dict())
    x = scene()[0]
    a, b = src(x), loaded(x)
    assert torch.allclose(a.class_logits, b.class_logits, atol=1e-5)
    assert torch.allclose(a.mask_logits, b.mask_logits, atol=1e-5)
    with pytest.raises(gc.TeacherWeightsError, match="holds a 'sam' checkpoint, expected 'sam2'"):
        build_model("grounded_sam", 3, sam_weights=str(tmp_path / "sam"), mask_model="sam2")


# --------------------------------------------------------------------------- paper size


@pytest.mark.parametrize("mask_model,low,high", [("sam2", 540e6, 580e6), ("sam", 950e6, 1010e6)])
def test_paper_size_param_counts(mask_model, low, high):
    """Built on the meta device (no memory, no init cost): architecture only."""
    with torch.device("meta"):
        model = build_model("grounded_sam", 8, size="paper", mask_model=mask_model)
    assert low < model.num_parameters() < high
    assert math.isclose(sum(p.numel() for p in model.detector.parameters()), 342e6, rel_tol=0.02)
    assert model.num_mask_queries == 100 and model.detector_size == 800


def test_default_mask_model_is_the_papers_sam2():
    model = build_model("grounded_sam", 2)
    assert model.mask_model_name == "sam2" and model.classes == ["class0", "class1"]
