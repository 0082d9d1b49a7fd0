"""The training engine: schedule, objective switches, logs, kill-and-resume equivalence."""

import os
from dataclasses import replace
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sskd.config import PixelContrastConfig, PseudoLabelConfig, TrainConfig
from sskd.data.records import Dataset, ImageRecord
from sskd.engine.data import hard_pseudo_labels
from sskd.engine.trainer import (Objective, TrainPaths, WeightAverage, poly_factor, read_log,
                                 train)
from sskd.models import build_model, load_model

from .conftest import make_dataset


ROOT = Path(__file__).resolve().parents[2]


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=4, lr=1e-3, checkpoint_every=2, log_every=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _as_pseudo_labels(records, classes, score: float) -> Dataset:
    """Ground truth turned into teacher-style pseudo-labels with a confidence."""
    return Dataset([ImageRecord(r.file_name, r.height, r.width, r.image_id,
                                [replace(i, score=score) for i in r.instances])
                    for r in records], classes)


def test_poly_schedule_and_warmup():
    assert poly_factor(0, 100, 0.9, 0) == 1.0
    assert poly_factor(50, 100, 1.0, 0) == pytest.approx(0.5)
    assert poly_factor(100, 100, 0.9, 0) == 0.0
    assert poly_factor(0, 100, 0.9, 4) == pytest.approx(0.25)


def test_hard_pseudo_labels_threshold_and_cap(toy):
    rec = toy.records[0]
    for inst, s in zip(rec.instances, (0.9, 0.2)):
        inst.score = s
    hard = hard_pseudo_labels(rec, PseudoLabelConfig(score_threshold=0.3, max_instances=5))
    assert [i.score for i in hard.instances] == [0.9]
    capped = hard_pseudo_labels(rec, PseudoLabelConfig(score_threshold=0.0, max_instances=1))
    assert [i.score for i in capped.instances] == [0.9]


def test_train_full_objective_logs_every_term(toy, tmp_path):
    model = build_model("mask2former", 3, size="tiny")
    unl = _as_pseudo_labels(toy.records[4:], toy.classes, 0.8)
    paths = TrainPaths.in_dir(tmp_path / "run", "stage")
    obj = Objective(l_semi=1.0, l_pxl=0.1,
                    pixel_contrast=PixelContrastConfig(num_anchors=16, num_negatives=8))
    out = train(model, Dataset(toy.records[:4], toy.classes), paths, _cfg(steps=3), obj,
                unlabeled=unl, input_size=32, progress=False)
    log = read_log(paths.log)
    assert [e["step"] for e in log] == [1, 2, 3]
    for key in ("loss", "loss_sup", "loss_semi", "loss_pxl", "margin", "fnr", "lr", "temperature"):
        assert key in log[-1], key
        assert torch.isfinite(torch.tensor(log[-1][key]))
    assert 0.0 <= log[-1]["fnr"] <= 1.0
    assert log[0]["lr"] > log[-1]["lr"]  # poly decay
    assert paths.model_dir.is_dir() and not paths.state.exists()
    assert out["steps"] == 3


def test_empty_pseudo_label_sets_train_without_nan(toy, tmp_path):
    model = build_model("mask2former", 3, size="tiny")
    empty = Dataset([r.without_instances() for r in toy.records[4:]], toy.classes)
    paths = TrainPaths.in_dir(tmp_path / "run", "stage")
    train(model, Dataset(toy.records[:4], toy.classes), paths, _cfg(steps=2, unlabeled_ratio=0.5),
          Objective(l_semi=1.0), unlabeled=empty, input_size=32, progress=False)
    log = read_log(paths.log)
    assert all(torch.isfinite(torch.tensor(e["loss_semi"])) for e in log)


def test_frozen_parameters_do_not_change(toy, tmp_path):
    model = build_model("mask2former", 3, size="tiny")
    for name, p in model.named_parameters():
        if model.is_encoder_parameter(name):
            p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()
              if model.is_encoder_parameter(n)}
    assert before, "the tiny model should have encoder parameters"
    train(model, toy, TrainPaths.in_dir(tmp_path, "s"), _cfg(steps=2), Objective(),
          input_size=32, progress=False)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_weight_average_follows_the_warmed_up_decay():
    net = torch.nn.BatchNorm1d(2)          # float parameters, float buffers and an int counter
    avg = WeightAverage(net, decay=0.9)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.fill_(3.0)
        net.num_batches_tracked.fill_(7)
    avg.update(net, step=0)                # d = min(0.9, 1/10) = 0.1
    assert torch.allclose(avg.state["weight"], 0.1 * w0 + 0.9 * 3.0)
    assert int(avg.state["num_batches_tracked"]) == 7
    before = avg.state["weight"].clone()
    with torch.no_grad():
        net.weight.fill_(-1.0)
    avg.update(net, step=1000)             # d = min(0.9, 1001/1010) = 0.9
    assert torch.allclose(avg.state["weight"], 0.9 * before + 0.1 * -1.0)
    avg.copy_to(net)
    assert torch.equal(net.weight.detach(), avg.state["weight"])
    with pytest.raises(ValueError, match="train.ema_decay = 1.0"):
        WeightAverage(net, 1.0)


def test_train_with_ema_saves_the_average_of_every_steps_weights(toy, tmp_path):
    torch.manual_seed(0)
    model = build_model("mask2former", 3, size="tiny")
    seen = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    paths = TrainPaths.in_dir(tmp_path, "s")
    train(model, toy, paths, _cfg(steps=5, ema_decay=0.5), Objective(), input_size=32,
          progress=False, on_log=lambda e: seen.append(
              {k: v.detach().clone() for k, v in model.state_dict().items()}))
    expect = seen[0]
    for t, w in enumerate(seen[1:]):
        d = min(0.5, (1 + t) / (10 + t))
        expect = {k: d * expect[k] + (1 - d) * w[k] if w[k].is_floating_point() else w[k]
                  for k in w}
    saved = load_model(paths.model_dir).state_dict()
    name = next(k for k in saved if saved[k].is_floating_point() and saved[k].numel() > 1
                and not torch.equal(seen[-1][k], seen[0][k]))
    assert not torch.allclose(saved[name], seen[-1][name])   # not the last step's weights
    for k in saved:
        assert torch.allclose(saved[k].float(), expect[k].float(), atol=1e-6), k


_SCRIPT = r"""
import os, signal, sys, torch
torch.set_num_threads(1)
from pathlib import Path
from sskd.config import SyntheticDomainConfig
from sskd.data.coco import read_coco
from sskd.data.synthetic import generate_domain
from sskd.config import TrainConfig, PixelContrastConfig
from sskd.engine.trainer import Objective, TrainPaths, train
from sskd.models import build_model
torch.manual_seed(0)
js = generate_domain(SyntheticDomainConfig(max_objects=3), 8, 32, ["circle", "rectangle", "triangle"],
                     0, Path({data!r}))
ds = read_coco(js, Path(js).parent)
model = build_model("mask2former", 3, size="tiny")
kill_at = int(sys.argv[2])
def on_log(entry):
    if entry["step"] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)   # a real kill, between two checkpoints
cfg = TrainConfig(steps=8, batch_size=4, lr=1e-3, checkpoint_every=3, log_every=1, seed=5,
                  ema_decay=float(sys.argv[3]))
obj = Objective(l_pxl=0.1, pixel_contrast=PixelContrastConfig(num_anchors=16, num_negatives=8))
train(model, ds, TrainPaths.in_dir(Path(sys.argv[1]), "s"), cfg, obj, input_size=32,
      progress=False, on_log=on_log)
"""


def _run_script(tmp_path: Path, run_dir: Path, kill_at: int, ema: float) -> int:
    script = tmp_path / "train_script.py"
    script.write_text(_SCRIPT.format(data=str(tmp_path / "data")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), str(run_dir), str(kill_at), str(ema)],
                          env=env, capture_output=True, text=True, timeout=300).returncode


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.9], ids=["last-weights", "weight-average"])
def test_killed_run_resumes_to_identical_weights(tmp_path, ema):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    rc = _run_script(tmp_path, killed, kill_at=5, ema=ema)
    assert rc == -signal.SIGKILL
    paths = TrainPaths.in_dir(killed, "s")
    assert paths.state.is_file() and not paths.model_dir.exists()
    state = torch.load(paths.state, weights_only=True)
    assert state["step"] == 3 and ("ema" in state) == (ema > 0)
    assert _run_script(tmp_path, killed, kill_at=-1, ema=ema) == 0     # resume from step 3
    assert _run_script(tmp_path, clean, kill_at=-1, ema=ema) == 0      # uninterrupted reference
    a = load_model(paths.model_dir).state_dict()
    b = load_model(TrainPaths.in_dir(clean, "s").model_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    # the log holds each step once, as the uninterrupted run's does
    steps = [e["step"] for e in read_log(paths.log)]
    assert steps == list(range(1, 9))


def test_engine_trains_the_grounded_sam_teacher_with_every_term(tmp_path):
    toy = make_dataset(tmp_path / "toy64", n=4, size=64)
    torch.manual_seed(0)
    model = build_model("grounded_sam", 3, size="tiny", classes=toy.classes, mask_model="sam")
    unl = _as_pseudo_labels(toy.records[2:], toy.classes, 0.9)
    paths = TrainPaths.in_dir(tmp_path / "run", "adapt")
    obj = Objective(l_semi=1.0, l_pxl=0.1,
                    pixel_contrast=PixelContrastConfig(num_anchors=8, num_negatives=4))
    train(model, Dataset(toy.records[:2], toy.classes), paths, _cfg(steps=2, batch_size=2), obj,
          unlabeled=unl, input_size=64, progress=False)
    log = read_log(paths.log)
    assert {"loss_sup", "loss_semi", "loss_pxl"} <= set(log[-1])
    assert load_model(paths.model_dir).registry_name == "grounded_sam"
