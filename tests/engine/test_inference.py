"""Streaming pseudo-labelling: one line per image, resumable after a kill, never half-written."""

import json

import pytest
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


def test_overlapping_keeps_every_class_hypothesis_of_a_query_and_resolving_keeps_one():
    """One query, two plausible classes: COCO evaluation ranks both (same whole mask), a hard
    pseudo-label keeps the best one only; a lower-scored overlapping query keeps its whole mask
    only when overlapping."""
    from sskd.models.base import postprocess_instances
    cls = torch.full((1, 2, 4), -9.0)             # B=1, Q=2, C=3 + no-object
    cls[0, 0, :2] = torch.tensor([2.0, 1.5])     # query 0: circle 0.6 / rectangle 0.37
    cls[0, 1, 2:] = torch.tensor([0.0, 1.0])     # query 1: triangle 0.27 (no-object 0.73)
    mask = torch.full((1, 2, 8, 8), -9.0)
    mask[0, 0, :4, :4] = 9.0                     # query 0: top-left square
    mask[0, 1, 2:8, 2:6] = 9.0                   # query 1: 6 x 4, overlaps it by a 2 x 2 corner
    kw = dict(score_threshold=0.05, max_instances=10)
    (ovl,) = postprocess_instances(cls, mask, (8, 8), overlapping=True, **kw)
    (hard,) = postprocess_instances(cls, mask, (8, 8), overlapping=False, **kw)
    assert sorted(ovl.class_ids.tolist()) == [0, 1, 2]
    assert sorted(int(m.sum()) for m in ovl.masks) == [16, 16, 24]    # all whole
    assert ovl.scores.tolist() == sorted(ovl.scores.tolist(), reverse=True)
    assert sorted(hard.class_ids.tolist()) == [0, 2]                      # rectangle hypothesis gone
    assert int(hard.masks.sum(0).max()) == 1                            # one instance per pixel
    tri = hard.masks[hard.class_ids.tolist().index(2)]
    assert int(tri.sum()) == 20                                         # corner given to the circle


def test_resolving_drops_a_sliver_and_frees_its_pixels_for_later_instances():
    """Mask2Former's overlap rule: an instance that keeps < 80% of its mask is dropped, not kept
    as the rim a better-scored duplicate left over; its pixels stay free for the next one."""
    from sskd.models.base import MIN_KEPT_FRACTION, resolve_overlaps
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True                      # best: a 4 x 4 square
    masks[1, :5, :5] = True                      # duplicate: keeps its 9-pixel rim of 25 (36%)
    masks[2, 4:, :] = True                       # 32 px, 5 shared (row 4) with the duplicate
    out = resolve_overlaps(masks)
    assert MIN_KEPT_FRACTION == 0.8
    assert [int(m.sum()) for m in out] == [16, 0, 32]
    assert torch.equal(out[0], masks[0]) and torch.equal(out[2], masks[2])
    # the old rule (keep any leftover) is min_kept_fraction=0: the rim survives and the third loses 5 px
    old = resolve_overlaps(masks, min_kept_fraction=0.0)
    assert [int(m.sum()) for m in old] == [16, 9, 27]
    assert int(old.sum(0).max()) == 1


def test_evaluation_config_ranks_overlapping_masks_pseudo_labels_do_not(toy):
    from sskd.config import EvaluationConfig
    torch.manual_seed(0)
    model = build_model("mask2former", 3, size="tiny")
    ev = list(iter_predictions(model, toy, EvaluationConfig(), input_size=16))
    pl = list(iter_predictions(model, toy, PseudoLabelConfig(score_threshold=0.0), input_size=16))
    def coverage(rec):
        return int(sum(i.mask().astype(int) for i in rec.instances).max()) if rec.instances else 0
    assert max(coverage(r) for r in ev) > 1      # some pixel ranked under several hypotheses
    assert max(coverage(r) for r in pl) <= 1
    assert sum(len(r.instances) for r in ev) > sum(len(r.instances) for r in pl)


def test_each_instance_carries_its_querys_class_distribution():
    """Soft pseudo-label targets: an instance's ``class_probs`` is p(c | object) of the query
    that drew it (both hypotheses of query 0 carry the same row), written only when asked."""
    from sskd.models.base import postprocess_instances
    cls = torch.full((1, 2, 4), -9.0)
    cls[0, 0, :2] = torch.tensor([2.0, 1.5])
    cls[0, 1, 2:] = torch.tensor([0.0, 1.0])
    mask = torch.full((1, 2, 8, 8), -9.0)
    mask[0, 0, :4, :4] = 9.0
    mask[0, 1, 2:8, 2:6] = 9.0
    (ovl,) = postprocess_instances(cls, mask, (8, 8), score_threshold=0.05, overlapping=True)
    fg = cls[0, :, :3].softmax(-1)  # p(c | object) of each query
    for c, probs in zip(ovl.class_ids.tolist(), ovl.class_probs):
        q = 1 if c == 2 else 0
        assert torch.allclose(probs, fg[q], atol=1e-5) and probs.sum() == pytest.approx(1.0)


def test_pseudo_label_files_keep_class_distributions_only_when_asked(toy, tmp_path):
    torch.manual_seed(0)
    model = build_model("mask2former", 3, size="tiny")
    cfg = PseudoLabelConfig(score_threshold=0.0, max_instances=3)
    hard = predict_to_jsonl(model, toy, tmp_path / "hard.jsonl", cfg, input_size=32)
    soft = predict_to_jsonl(model, toy, tmp_path / "soft.jsonl", cfg, input_size=32,
                            class_probs=True)
    assert "class_probs" not in hard.read_text()
    from sskd.data.records import iter_records_jsonl
    n = 0
    for h, s in zip(iter_records_jsonl(hard), iter_records_jsonl(soft)):
        assert [i.class_id for i in h.instances] == [i.class_id for i in s.instances]
        for inst in s.instances:
            assert len(inst.class_probs) == 3 and sum(inst.class_probs) == pytest.approx(1, abs=1e-4)
            n += 1
        # the JSON round trip keeps them
        assert type(s).from_dict(json.loads(json.dumps(s.to_dict()))).to_dict() == s.to_dict()
    assert n > 0
