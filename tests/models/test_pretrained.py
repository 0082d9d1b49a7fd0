"""Loading DINOv2 checkpoints into the encoder: round trip, missing files, mismatches, offline hub."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from sskd.models import build_model, load_model
from sskd.models.pretrained import PretrainedWeightsError, load_dinov2_weights

K = 3


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # an empty HF cache
    torch.set_num_threads(1)


def _tiny_model(**kw):
    return build_model("mask2former", K, size="tiny", **kw)


def _checkpoint(tmp_path, name="dino", **cfg_changes):
    """A tiny HF Dinov2 checkpoint written by save_pretrained, with the tiny size's architecture."""
    torch.manual_seed(123)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
              image_size=64, use_mask_token=True)  # mask token on, as in the hub checkpoints
    cfg = Dinov2Config(**{**kw, **cfg_changes})
    enc = Dinov2Model(cfg)
    enc.save_pretrained(tmp_path / name)
    return enc, tmp_path / name


def _same_encoder_outputs(a: Dinov2Model, b: Dinov2Model) -> bool:
    x = torch.randn(2, 3, 64, 64)
    a.eval(), b.eval()
    with torch.no_grad():
        return torch.equal(a(pixel_values=x).last_hidden_state, b(pixel_values=x).last_hidden_state)


def test_round_trip_via_builder_option(tmp_path):
    source, ckpt = _checkpoint(tmp_path)
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    model = _tiny_model(encoder_weights=str(ckpt))
    assert _same_encoder_outputs(source, model.encoder)
    assert not _same_encoder_outputs(source, _tiny_model().encoder)  # random init differs
    # the saved model does not depend on the checkpoint dir any more
    model.save(tmp_path / "saved")
    assert "encoder_weights" not in json.loads((tmp_path / "saved" / "model.json").read_text())["config"]
    shutil.rmtree(ckpt)
    assert _same_encoder_outputs(source, load_model(tmp_path / "saved").encoder)


def test_pytorch_bin_and_prefixed_keys(tmp_path):
    source, ckpt = _checkpoint(tmp_path)
    (ckpt / "model.safetensors").unlink()
    state = {f"dinov2.{k}": v for k, v in source.state_dict().items()}  # classifier-style keys
    torch.save(state, ckpt / "pytorch_model.bin")
    model = _tiny_model()
    assert load_dinov2_weights(model.encoder, str(ckpt)) == ckpt
    assert _same_encoder_outputs(source, model.encoder)


def test_missing_directory(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="does not exist.*huggingface-cli download"):
        _tiny_model(encoder_weights=str(tmp_path / "nope"))


def test_directory_without_weights(tmp_path):
    _, ckpt = _checkpoint(tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(PretrainedWeightsError, match="no weight file.*model.safetensors.*pytorch_model.bin"):
        _tiny_model(encoder_weights=str(ckpt))
    (ckpt / "config.json").unlink()
    with pytest.raises(PretrainedWeightsError, match="lacks config.json"):
        _tiny_model(encoder_weights=str(ckpt))


def test_architecture_mismatch(tmp_path):
    _, ckpt = _checkpoint(tmp_path, hidden_size=64)
    with pytest.raises(PretrainedWeightsError, match="hidden_size: checkpoint 64 vs model 32"):
        _tiny_model(encoder_weights=str(ckpt))


def test_tensor_shape_mismatch(tmp_path):
    _, ckpt = _checkpoint(tmp_path, image_size=128)  # 16x16 position embeddings instead of 8x8
    with pytest.raises(PretrainedWeightsError, match="position_embeddings: checkpoint"):
        _tiny_model(encoder_weights=str(ckpt))


def test_hub_id_offline_without_cache():
    with pytest.raises(PretrainedWeightsError, match="HF_HUB_OFFLINE is set.*huggingface-cli download "
                                                     "facebook/dinov2-small --local-dir weights/dinov2-small"):
        _tiny_model(encoder_weights="facebook/dinov2-small")
