"""Streaming pseudo-labelling: one line per image, resumable after a kill, never half-written."""

import json

import torch

from sskd.config import PseudoLabelConfig
from sskd.engine.inference import iter_predictions, predict_to_jsonl
from sskd.models import build_model


def test_predictions_stream_resume_and_match_a_fresh_run(toy, tmp_path):
    torch.manual_seed(0)
    model = build_model("mask2former", 3, size="tiny")
    cfg = PseudoLabelConfig(score_threshold=0.0, max_instances=3)
    fresh = predict_to_jsonl(model, toy, tmp_path / "fresh.jsonl", cfg, input_size=32, batch_size=3)
    lines = fresh.read_text().splitlines()
    assert [json.loads(l)["image_id"] for l in lines] == [r.image_id for r in toy.records]

    # a killed writer left 3 complete lines and a torn fourth one
    out = tmp_path / "resumed.jsonl"
    partial = out.with_name(out.name + ".partial")
    partial.write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    predict_to_jsonl(model, toy, out, cfg, input_size=32, batch_size=3)
    assert not partial.exists()
    assert out.read_text().splitlines() == lines
    # a finished file is not recomputed
    mtime = out.stat().st_mtime_ns
    predict_to_jsonl(model, toy, out, cfg, input_size=32)
    assert out.stat().st_mtime_ns == mtime


def test_predicted_records_are_valid_instances_at_original_size(toy):
    torch.manual_seed(0)
    model = build_model("mask2former", 3, size="tiny")
    cfg = PseudoLabelConfig(score_threshold=0.0, max_instances=4)
    recs = list(iter_predictions(model, toy, cfg, input_size=16, batch_size=4))
    assert len(recs) == len(toy)
    for rec, src in zip(recs, toy.records):
        assert (rec.height, rec.width, rec.image_id) == (src.height, src.width, src.image_id)
        masks = rec.masks()
        assert masks.shape[1:] == (src.height, src.width)   # upsampled from the 16 px input
        assert (masks.sum(0) <= 1).all()                     # no pixel in two instances
        assert len(rec.instances) <= 4
        for inst in rec.instances:
            assert 0.0 <= inst.score <= 1.0 and 0 <= inst.class_id < 3
