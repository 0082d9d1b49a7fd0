"""Efficiency measurements: exact FLOPs on a known network, memory detection, tables, ratios."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from sskd.evaluation.efficiency import (compare, count_flops, format_table, measure,
                                        measure_train_step, peak_memory_mb, synthetic_targets)
from sskd.models import build_model
from sskd.models.base import Segmenter, SegmenterOutput


class ConvSegmenter(Segmenter):
    """A real (if minimal) segmenter: one 1x1 conv gives Q mask logits; known FLOPs."""

    def __init__(self, num_classes: int = 2, queries: int = 4, scratch_mb: int = 0) -> None:
        super().__init__(num_classes)
        self.conv = nn.Conv2d(3, queries, 1)
        self.cls = nn.Parameter(torch.zeros(queries, num_classes + 1))
        self.scratch_mb = scratch_mb

    def forward(self, images, embeddings="none"):
        if self.scratch_mb:  # a transient activation of known size, alive for ~50 ms
            scratch = torch.ones(self.scratch_mb * 2**20 // 4)
            time.sleep(0.05)
            del scratch
        masks = self.conv(images)
        return SegmenterOutput(self.cls.expand(images.shape[0], -1, -1), masks)

    def compute_losses(self, outputs, targets):
        loss = outputs.mask_logits.mean() + outputs.class_logits.mean()
        return {"loss": loss}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def test_flops_are_exact_and_per_image():
    model = ConvSegmenter(queries=4)
    # 1x1 conv: 2 FLOPs per multiply-add, 3 inputs x 4 outputs per pixel
    assert count_flops(model, 16) == 2 * 3 * 4 * 16 * 16
    assert count_flops(model, 32) == 4 * count_flops(model, 16)


def test_measure_fields_and_values():
    model = ConvSegmenter()
    row = measure(model, 16, batch_size=4, warmup=0, iters=2)
    assert row["params_M"] == pytest.approx(model.num_parameters() / 1e6)
    assert row["gflops"] == pytest.approx(2 * 3 * 4 * 16 * 16 / 1e9)
    assert row["latency_ms"] > 0 and row["throughput_img_s"] > 0
    assert row["mem_method"] == "cpu_weights_plus_rss_peak_delta"
    weights_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    assert row["peak_mem_MB"] >= weights_mb
    assert (row["image_size"], row["batch_size"], row["device"]) == (16, 4, "cpu")


def test_peak_memory_sees_transient_activations():
    small, _ = peak_memory_mb(ConvSegmenter(), 16)
    big, method = peak_memory_mb(ConvSegmenter(scratch_mb=200), 16)
    assert method == "cpu_weights_plus_rss_peak_delta"
    assert big > small + 150, (small, big)


def test_compare_adds_ratio_rows_and_table():
    teacher, student = ConvSegmenter(queries=8), ConvSegmenter(queries=2)
    rows = compare({"teacher": teacher, "student": student}, 16, batch_size=2, warmup=0, iters=1)
    assert [r["name"] for r in rows] == ["teacher", "student", "teacher / student"]
    ratio = rows[-1]
    assert ratio["params_M"] == pytest.approx(teacher.num_parameters() / student.num_parameters())
    assert ratio["gflops"] == pytest.approx(4.0)  # 8 vs 2 output channels
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| model | params (M) | GFLOPs/img |")
    assert len(lines) == 2 + 3
    assert lines[-1].startswith("| teacher / student | x")
    assert "train s/step" not in table
    with pytest.raises(KeyError, match="ratio"):
        compare({"a": student}, 16, batch_size=1, warmup=0, iters=1, ratios=[("a", "b")])


def test_train_step_on_a_copy_of_a_real_model():
    torch.manual_seed(0)
    model = build_model("mask2former", 3, size="tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = measure_train_step(model, 32, batch_size=2, warmup=1, iters=2)
    assert out["s_per_step"] > 0 and out["cpu_s_per_step"] > 0 and out["train_batch_size"] == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    rows = compare({"student": model}, 32, batch_size=2, warmup=0, iters=1, train_step=True,
                   train_batch_size=2)
    assert rows[0]["s_per_step"] > 0 and "train s/step" in format_table(rows)


def test_synthetic_targets():
    t = synthetic_targets(3, 32, num_classes=5, per_image=2)
    assert len(t) == 3
    for d in t:
        assert d["masks"].shape == (2, 32, 32) and d["masks"].flatten(1).sum(1).min() > 0
        assert ((d["labels"] >= 0) & (d["labels"] < 5)).all()
