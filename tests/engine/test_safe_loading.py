"""Run files load safely (weights_only) and a damaged one names the file and the fix.

Every file a stage reads back (state.pt, model.pt/model.json, fingerprint.json, metrics.json,
pseudo-label/prediction jsonl) is truncated, replaced by garbage or emptied here; each must
raise :class:`CorruptFileError` naming that file and how to recover.
"""

import json
import random
from pathlib import Path

import pytest
import torch

from sskd.config import TrainConfig
from sskd.data.records import iter_records_jsonl, write_records_jsonl
from sskd.engine.trainer import Objective, TrainPaths, _load_state, _save_state, train
from sskd.metrics import read_metrics, update_metrics
from sskd.models import build_model, load_model
from sskd.safe_load import CorruptFileError, load_torch
from sskd.stages.common import _read_fingerprint


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garbage(_: bytes) -> bytes:
    return random.Random(0).randbytes(300)


def _empty(_: bytes) -> bytes:
    return b""


DAMAGE = {"truncated": _truncate, "garbage": _garbage, "empty": _empty}


def _damage(path: Path, how: str) -> None:
    path.write_bytes(DAMAGE[how](path.read_bytes()))


def _model_and_optimizer():
    torch.manual_seed(0)
    model = build_model("mask2former", 3, size="tiny")
    groups = model.param_groups(1e-3, 0.1)
    for g in groups:
        g["base_lr"] = g["lr"]
    return model, torch.optim.AdamW(groups, lr=1e-3)


class _RunsCode:
    """Unpickling this would create ``marker``: proof that a file could run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_training_state_round_trips_through_weights_only_loading(tmp_path):
    model, opt = _model_and_optimizer()
    out = model(torch.rand(1, 3, 32, 32))
    (out.class_logits.sum() + out.mask_logits.sum()).backward()
    opt.step()   # the optimizer now holds moment tensors and step counts
    path = tmp_path / "state.pt"
    _save_state(path, model, opt, 7)
    assert sorted(torch.load(path, weights_only=True)) == ["model", "optimizer", "step"]
    fresh, fresh_opt = _model_and_optimizer()
    assert _load_state(path, fresh, fresh_opt, torch.device("cpu")) == 7
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_corrupt_state_pt_stops_training_naming_file_and_fix(toy, tmp_path, how):
    paths = TrainPaths.in_dir(tmp_path, "stage")
    model, opt = _model_and_optimizer()
    _save_state(paths.state, model, opt, 2)
    _damage(paths.state, how)
    with pytest.raises(CorruptFileError) as e:
        train(model, toy, paths, TrainConfig(steps=4, batch_size=2), Objective(),
              input_size=32, progress=False)
    assert e.value.path == paths.state
    assert str(paths.state) in str(e.value) and "delete" in str(e.value)
    assert "restart this training from step 0" in str(e.value)


def test_state_pt_with_a_pickled_object_is_refused_not_run(toy, tmp_path):
    paths = TrainPaths.in_dir(tmp_path, "stage")
    marker = tmp_path / "code-ran"
    model, _ = _model_and_optimizer()
    paths.state.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": {}, "step": 1,
                "payload": _RunsCode(marker)}, paths.state)
    with pytest.raises(CorruptFileError, match="refused by weights_only loading.*Unsupported global"):
        train(model, toy, paths, TrainConfig(steps=4, batch_size=2), Objective(),
              input_size=32, progress=False)
    assert not marker.exists()


def test_state_pt_of_another_model_names_the_file(toy, tmp_path):
    paths = TrainPaths.in_dir(tmp_path, "stage")
    other = build_model("mask2former", 5, size="student_demo")
    paths.state.parent.mkdir(parents=True)
    torch.save({"model": other.state_dict(), "optimizer": {}, "step": 1}, paths.state)
    model, _ = _model_and_optimizer()
    with pytest.raises(CorruptFileError, match="does not fit this model"):
        train(model, toy, paths, TrainConfig(steps=4, batch_size=2), Objective(),
              input_size=32, progress=False)


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("file", ["model.pt", "model.json"])
def test_corrupt_model_dir_names_file_and_fix(tmp_path, file, how):
    model, _ = _model_and_optimizer()
    directory = model.save(tmp_path / "checkpoints" / "refine" / "model")
    _damage(directory / file, how)
    with pytest.raises(CorruptFileError) as e:
        load_model(directory)
    assert e.value.path == directory / file
    assert f"delete {directory} and re-run the stage that trains it" in str(e.value)


def test_model_json_without_the_builder_config_is_named(tmp_path):
    model, _ = _model_and_optimizer()
    directory = model.save(tmp_path / "m")
    (directory / "model.json").write_text(json.dumps({"name": "mask2former"}))
    with pytest.raises(CorruptFileError, match=r"model\.json .*needs 'name' and 'config'"):
        load_model(directory)


def test_model_save_leaves_no_temp_files(tmp_path):
    model, _ = _model_and_optimizer()
    directory = model.save(tmp_path / "m")
    assert sorted(p.name for p in directory.iterdir()) == ["model.json", "model.pt"]


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_corrupt_fingerprint_names_file_and_fix(tmp_path, how):
    fp = tmp_path / "checkpoints" / "transfer" / "fingerprint.json"
    fp.parent.mkdir(parents=True)
    fp.write_text(json.dumps({"fingerprint": "abc", "parts": {"seed": "x" * 40}}))
    assert _read_fingerprint(fp, "transfer")["fingerprint"] == "abc"
    _damage(fp, how)
    with pytest.raises(CorruptFileError) as e:
        _read_fingerprint(fp, "transfer")
    assert e.value.path == fp and f"delete {fp.parent} to train stage transfer again" in str(e.value)
    assert _read_fingerprint(tmp_path / "absent.json", "transfer") == {}


@pytest.mark.parametrize("how", sorted(DAMAGE) + ["a list"])
def test_corrupt_metrics_json_names_file_and_fix(tmp_path, how):
    path = tmp_path / "metrics.json"
    update_metrics(path, "models", "teacher_1a", {"AP": 1.0})
    if how == "a list":
        path.write_text("[1, 2]")
    else:
        _damage(path, how)
    with pytest.raises(CorruptFileError) as e:
        read_metrics(path)
    assert e.value.path == path and "delete it and re-run the stages" in str(e.value)
    with pytest.raises(CorruptFileError):   # a stage adding its result hits the same error
        update_metrics(path, "models", "student_refined", {"AP": 2.0})


@pytest.mark.parametrize("how", sorted(DAMAGE) + ["wrong shape", "binary line"])
def test_corrupt_jsonl_names_file_and_fix(toy, tmp_path, how):
    path = write_records_jsonl(toy.records[:3], tmp_path / "pseudo_labels" / "teacher_1a.jsonl")
    assert len(list(iter_records_jsonl(path))) == 3
    if how == "wrong shape":
        path.write_text(path.read_text() + json.dumps({"image": 1}) + "\n")
    elif how == "binary line":
        path.write_bytes(path.read_bytes() + b"\xff\xfe\x00garbage\n")
    elif how == "empty":
        path.write_bytes(b"")
        assert list(iter_records_jsonl(path)) == []   # no images: valid (e.g. no detections)
        return
    else:
        _damage(path, how)
    with pytest.raises(CorruptFileError) as e:
        list(iter_records_jsonl(path))
    assert e.value.path == path and "re-run the stage that writes it" in str(e.value)


def test_load_torch_checks_required_keys(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CorruptFileError, match=r"missing entries \['step'\]"):
        load_torch(path, "fix it", keys=("model", "step"))
