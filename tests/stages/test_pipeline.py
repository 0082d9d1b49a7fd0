"""The stages on the smoke preset: artifacts in the run dir, metrics, skip-when-done, ablations."""

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from sskd.data.records import iter_records_jsonl
from sskd.metrics import read_metrics
from sskd.rundir import MODEL_TAGS
from sskd.stages import (adapt_teacher, load_datasets, open_run, prepare_data, refine,
                         run_ablations, transfer, zero_shot)


def _open(tmp_path, name="r", **extra):
    ov = {"cache_dir": str(tmp_path / "cache"), "data.root": str(tmp_path / "data"), **extra}
    return open_run(name, preset="smoke", runs_root=str(tmp_path / "runs"), overrides=ov)


@pytest.mark.slow
def test_all_stages_write_their_artifacts_and_skip_finished_work(tmp_path):
    run = _open(tmp_path)
    summary = prepare_data(run)
    assert summary["labeled"] + summary["unlabeled"] == 16 and summary["val"] == 6
    ds = load_datasets(run)
    assert {r.image_id for r in ds["labeled"]}.isdisjoint(r.image_id for r in ds["unlabeled"])
    zero_shot(run, progress=False)
    adapt_teacher(run, progress=False)
    transfer(run, progress=False)
    refine(run, progress=False)
    m = read_metrics(run.dir.metrics)
    assert set(m["models"]) == set(MODEL_TAGS)
    for tag, res in m["models"].items():
        assert 0.0 <= res["AP"] <= 100.0 and res["params"] > 0, tag
    assert m["stages"]["teacher_pretrain"]["cached"] is False
    assert m["stages"]["student_pretrain"]["cached"] is False
    for tag in ("teacher_zero_shot", "teacher_1a", "teacher_adapted"):
        lines = run.dir.pseudo_labels(tag).read_text().splitlines()
        assert [json.loads(l)["image_id"] for l in lines] == [r.image_id for r in ds["unlabeled"]]
        assert tag in m["pseudo_labels"]  # quality against the hidden ground truth
        match = m["pseudo_labels"][tag]["matching"]  # masks vs classes, counted over all of D_u
        assert match["n_gt"] == sum(len(r.instances) for r in ds["unlabeled"])
        assert match["n_pred"] == sum(len(json.loads(l)["instances"]) for l in lines)
        assert sum(map(sum, match["confusion"])) == match["n_matched"] <= min(match["n_gt"], match["n_pred"])
    # teacher parameters are >= the student's (smoke uses tiny for both: equal)
    assert m["models"]["teacher_adapted"]["params"] >= m["models"]["student_refined"]["params"]

    # re-running a finished stage loads its weights instead of training again
    model_file = run.dir.model_dir("student_transfer") / "model.pt"
    before = model_file.stat().st_mtime_ns
    transfer(run, progress=False)
    assert model_file.stat().st_mtime_ns == before

    # a second run on the same machine reuses the cached stand-in teacher
    other = _open(tmp_path, "r2")
    prepare_data(other)
    zero_shot(other, progress=False)
    assert read_metrics(other.dir.metrics)["stages"]["teacher_pretrain"]["cached"] is True

    res = run_ablations(run, progress=False)
    assert set(res) == {"uniform_negatives"}
    child = run.dir.root / "ablations" / "uniform_negatives"
    assert (child / "config.yaml").read_text().count("sampler: uniform") == 1
    assert "student_transfer" in read_metrics(run.dir.metrics)["ablations"]["uniform_negatives"]["models"]


def test_disabled_stages_and_missing_inputs(tmp_path):
    run = _open(tmp_path, **{"stages.transfer.enabled": False})
    prepare_data(run)
    with pytest.raises(FileNotFoundError, match="stage 3 starts from the stage-2 student"):
        refine(run, progress=False)


def test_open_run_keeps_and_updates_the_saved_config(tmp_path):
    run = _open(tmp_path)
    assert run.dir.config.is_file()
    again = open_run("r", runs_root=str(tmp_path / "runs"),
                     overrides={"stages.refine.train.steps": 7})
    assert again.cfg.stages.refine.train.steps == 7
    assert again.cfg.data.root == str(tmp_path / "data")  # kept from the first open
    assert "steps: 7" in run.dir.config.read_text()


def test_changed_stage_config_retrains_and_recomputes_predictions(tmp_path, caplog):
    run = _open(tmp_path, **{"stages.transfer.enabled": False})
    prepare_data(run)
    transfer(run, progress=False)                     # only the supervised student baseline
    model_file = run.dir.model_dir("student_supervised") / "model.pt"
    preds = run.dir.predictions("student_supervised")
    first = (model_file.stat().st_mtime_ns, preds.stat().st_mtime_ns)
    transfer(run, progress=False)                     # same inputs: nothing recomputed
    assert (model_file.stat().st_mtime_ns, preds.stat().st_mtime_ns) == first
    assert "student_supervised" in read_metrics(run.dir.metrics)["models"]
    open_run("r", runs_root=str(tmp_path / "runs"), overrides={"workers": 1})
    assert "student_supervised" in read_metrics(run.dir.metrics)["models"]  # not a result input
    changed = open_run("r", runs_root=str(tmp_path / "runs"),
                       overrides={"stages.student_supervised.train.lr": 0.01})
    # the saved config no longer describes the old AP: it is gone before anything re-runs
    assert "student_supervised" not in read_metrics(run.dir.metrics)["models"]
    with caplog.at_level(logging.INFO, logger="sskd"):
        transfer(changed, progress=False)             # new lr: trained and evaluated again
    assert "student_supervised" in read_metrics(run.dir.metrics)["models"]
    assert "student_supervised: inputs changed since the last run (stage_config)" in caplog.text
    assert model_file.stat().st_mtime_ns != first[0]
    assert preds.stat().st_mtime_ns != first[1]
    # how masks are scored is part of what the predictions file describes: toggling overlaps
    # re-predicts (one instance per pixel now) without retraining
    trained = (model_file.stat().st_mtime_ns, preds.stat().st_mtime_ns)
    disjoint = open_run("r", runs_root=str(tmp_path / "runs"),
                        overrides={"stages.student_supervised.train.lr": 0.01,
                                   "evaluation.overlapping_masks": False})
    transfer(disjoint, progress=False)
    assert model_file.stat().st_mtime_ns == trained[0]
    assert preds.stat().st_mtime_ns != trained[1]
    for rec in iter_records_jsonl(preds):
        if rec.instances:
            assert rec.masks().sum(0).max() <= 1


def test_student_stages_start_from_the_encoder_of_the_cached_standin_student(tmp_path):
    """Paper-like student start: only the encoder is pretrained; neck, decoder and heads are
    initialised from the run's seed; baseline and stage 2 share that init."""
    from sskd.models.base import load_model
    from sskd.stages.common import build_from_config, initial_student, student_standin_dir
    run = _open(tmp_path, **{"stages.transfer.enabled": False,
                             "stages.student_supervised.train.steps": 1})
    prepare_data(run)
    ds = load_datasets(run, with_source=True)
    transfer(run, progress=False)
    m = read_metrics(run.dir.metrics)
    assert m["stages"]["student_pretrain"]["cached"] is False
    standin = load_model(student_standin_dir(run) / "checkpoints" / "pretrain" / "model")
    again = initial_student(run, ds, progress=False)        # from the cache, not retrained
    enc = [k for k in standin.state_dict() if again.is_encoder_parameter(k)]
    rest = [k for k in standin.state_dict() if not again.is_encoder_parameter(k)
            and standin.state_dict()[k].is_floating_point() and standin.state_dict()[k].numel() > 1]
    assert enc and rest
    for k in enc:
        assert torch.equal(standin.state_dict()[k], again.state_dict()[k]), k
    fresh = build_from_config(run.cfg.student, ds["labeled"].classes, run.cfg.seed)
    for k in rest:                                          # from the run's seed, not the stand-in
        assert torch.equal(fresh.state_dict()[k], again.state_dict()[k]), k
    assert not all(torch.equal(standin.state_dict()[k], again.state_dict()[k]) for k in rest)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                initial_student(run, ds, False).state_dict().values()))
    # the baseline started from that init: one AdamW step moves a weight by at most ~lr
    trained = load_model(run.dir.model_dir("student_supervised"))
    w = "class_head.weight"
    diff = (trained.state_dict()[w] - again.state_dict()[w]).abs().max().item()
    assert 0 < diff < 0.01

    # another seed: same (seed-independent) stand-in encoder, other neck/decoder/heads
    s1 = _open(tmp_path, "s1", seed=1)
    assert student_standin_dir(s1) == student_standin_dir(run)
    prepare_data(s1)
    other = initial_student(s1, load_datasets(s1, with_source=True), progress=False)
    assert torch.equal(other.state_dict()[enc[0]], again.state_dict()[enc[0]])
    assert not torch.equal(other.state_dict()[w], again.state_dict()[w])

    off = _open(tmp_path, "off", **{"stages.student_pretrain.steps": 0})
    prepare_data(off)
    fresh = initial_student(off, load_datasets(off), progress=False)
    assert not torch.equal(fresh.state_dict()[enc[0]], standin.state_dict()[enc[0]])
    assert "student_pretrain" not in read_metrics(off.dir.metrics)["stages"]


def test_the_standin_teacher_does_not_depend_on_the_run_seed(tmp_path):
    from sskd.stages.common import standin_dir
    a, b = _open(tmp_path, "a"), _open(tmp_path, "b", seed=7)
    assert standin_dir(a) == standin_dir(b)
    # but on what it is pretrained on and how
    c = _open(tmp_path, "c", **{"stages.teacher_pretrain.steps": 5})
    d = _open(tmp_path, "d", **{"data.synthetic.corpus_palettes": ["primary", "dark"],
                                "data.synthetic.corpus_backgrounds": ["flat", "noise"]})
    assert len({standin_dir(a), standin_dir(c), standin_dir(d)}) == 3


def test_standin_cache_keys_survive_new_keys_at_their_omit_value(tmp_path):
    from sskd.config import load_config
    """A training key added to sskd later (``train.ema_decay``, declared with
    ``fingerprint_omit``) must not re-key the cached stand-ins: at its omit value the key is
    the one the demo preset had before (pretraining again costs every user ~10-17 minutes);
    set, it re-keys the stand-in it trains. The pinned hashes change on purpose only with the
    preset's model or pretraining (the student's since its 32-channel outline head, 2026-12-04)
    or with ``STANDIN_VERSION``."""
    from sskd.stages.common import standin_dir, student_standin_dir
    from sskd.stages.run import Run
    from sskd.rundir import RunDir
    run = Run(RunDir(tmp_path / "r"), load_config("demo"))
    assert standin_dir(run).name == "8185bc7a650b7e9a"
    assert student_standin_dir(run).name == "f1f504151233ac48"
    ema = Run(RunDir(tmp_path / "e"),
              load_config("demo", {"stages.teacher_pretrain.ema_decay": 0.99}))
    assert standin_dir(ema) != standin_dir(run)
    assert student_standin_dir(ema) == student_standin_dir(run)


def test_a_second_process_waits_for_a_standin_being_pretrained(tmp_path):
    import multiprocessing as mp
    import time
    from sskd.stages.common import _cache_entry_lock
    root = tmp_path / "entry"
    ctx = mp.get_context("spawn")
    with _cache_entry_lock(root):
        assert (root / ".lock").read_text() == str(__import__("os").getpid())
        child = ctx.Process(target=_hold_lock, args=(str(root), str(tmp_path / "got")))
        child.start()
        # wait until the child is at the lock (its torch import can take long on a busy
        # machine), so that "blocked" below is observed, not assumed
        deadline = time.monotonic() + 300
        while not (tmp_path / "trying").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "trying").exists(), "the child never reached the lock"
        time.sleep(1.0)
        assert not (tmp_path / "got").exists()      # blocked while we hold it
    # generous: join returns as soon as the child exits, and a spawned child that imports torch
    # took over 30 s on a 2-core machine busy with other training runs
    child.join(300)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0 and (tmp_path / "got").read_text() == str(child.pid)


def _hold_lock(root, out):
    import os
    from pathlib import Path
    from sskd.stages.common import _cache_entry_lock
    Path(out).with_name("trying").touch()
    with _cache_entry_lock(Path(root)):
        Path(out).write_text(str(os.getpid()))


def test_the_run_seed_changes_every_stage_sampling_seed(tmp_path):
    from sskd.config import TrainConfig
    from sskd.stages.common import run_train_config
    tc = TrainConfig(seed=3)
    assert run_train_config(_open(tmp_path, "s0"), tc) is tc     # seed 0: unchanged
    s1 = run_train_config(_open(tmp_path, "s1", seed=1), tc).seed
    s2 = run_train_config(_open(tmp_path, "s2", seed=2), tc).seed
    assert len({3, s1, s2}) == 3
    assert run_train_config(_open(tmp_path, "s1b", seed=1), tc).seed == s1  # reproducible


@pytest.mark.slow
def test_invalidation_disabled_stages_and_ablations_follow_the_config(tmp_path):
    """Results never outlive what produced them: metrics entries go with their stage, a disabled
    teacher adaptation leaves nothing behind, and ablation children follow their parent."""
    from sskd.stages.pipeline import transfer_pseudo_tag
    run = _open(tmp_path, workers=1)
    prepare_data(run)
    zero_shot(run, progress=False)
    adapt_teacher(run, progress=False)
    transfer(run, progress=False)
    refine(run, progress=False)
    run_ablations(run, progress=False)
    m = read_metrics(run.dir.metrics)
    child = run.dir.root / "ablations" / "uniform_negatives"
    assert m["ablations"]["uniform_negatives"]["sampler"] == "uniform"  # from its config
    assert (child / "pseudo_labels" / "teacher_adapted.jsonl").read_bytes() == \
        run.dir.pseudo_labels("teacher_adapted").read_bytes()

    # a new stage-1a schedule: 1a retrains, and every model derived from it loses its entry
    # until its own stage runs again
    run = open_run("r", runs_root=str(tmp_path / "runs"), overrides={"stages.adapt_1a.train.steps": 3})
    adapt_teacher(run, progress=False)
    m = read_metrics(run.dir.metrics)
    assert {"teacher_1a", "teacher_adapted", "teacher_zero_shot"} <= set(m["models"])
    assert "student_transfer" not in m["models"] and "student_refined" not in m["models"]
    assert "student_supervised" in m["models"]  # not derived from the teacher
    # the ablation child takes the parent's new pseudo-labels (it had a copy already)
    run_ablations(run, progress=False)
    assert (child / "pseudo_labels" / "teacher_adapted.jsonl").read_bytes() == \
        run.dir.pseudo_labels("teacher_adapted").read_bytes()

    # teacher adaptation off: its old models go, stage 2 distils the zero-shot pseudo-labels
    run = open_run("r", runs_root=str(tmp_path / "runs"),
                   overrides={"stages.adapt_1a.enabled": False})
    assert transfer_pseudo_tag(run) == "teacher_zero_shot"
    adapt_teacher(run, progress=False)
    m = read_metrics(run.dir.metrics)
    for tag in ("teacher_1a", "teacher_adapted"):
        assert tag not in m["models"] and tag not in m["pseudo_labels"]
        assert not run.dir.pseudo_labels(tag).exists() and not run.dir.checkpoint_dir(tag).exists()
    transfer(run, progress=False)
    fp = json.loads((run.dir.checkpoint_dir("student_transfer") / "fingerprint.json").read_text())
    pl = load_datasets(run)  # noqa: F841 - the split is unchanged
    from sskd.stages.common import fingerprint, load_pseudo_labels
    zs = load_pseudo_labels(run, "teacher_zero_shot", ["circle", "rectangle", "triangle"])
    assert fp["parts"]["pseudo_labeled"] == fingerprint(zs)

    # an ablation removed from the config loses its child run and its metrics entry
    run = open_run("r", runs_root=str(tmp_path / "runs"), overrides={"ablations": {}})
    assert run_ablations(run, progress=False) == {}
    assert not child.exists() and read_metrics(run.dir.metrics)["ablations"] == {}


def _run_through_stage_2(tmp_path):
    """A smoke run through stage 2 (no refine, ablations or supervised teacher)."""
    # untrained smoke teachers: keep every mask (one per image once made disjoint)
    run = _open(tmp_path, **{"pseudo_label.score_threshold": 0.0, "pseudo_label.mask_threshold": 0.0,
                             "stages.refine.enabled": False, "ablations": {},
                             "stages.teacher_supervised.enabled": False})
    prepare_data(run)
    zero_shot(run, progress=False)
    adapt_teacher(run, progress=False)
    transfer(run, progress=False)
    return run


def test_soft_class_targets_relabel_d_u_and_retrain_only_stage_2(tmp_path, caplog):
    """Setting ``stages.transfer.soft_classes`` on a finished run: the adapted teacher labels D_u
    again with its class distributions (stage 1 is not retrained: the key at its default is
    not part of any fingerprint), and only stage 2 trains again, on those targets."""
    run = _run_through_stage_2(tmp_path)
    pl_file = run.dir.pseudo_labels("teacher_adapted")
    assert "class_probs" not in pl_file.read_text()
    teacher = run.dir.model_dir("teacher_adapted") / "model.pt"
    student = run.dir.model_dir("student_transfer") / "model.pt"
    before = (teacher.stat().st_mtime_ns, student.stat().st_mtime_ns)

    soft = open_run("r", runs_root=str(tmp_path / "runs"),
                    overrides={"stages.transfer.soft_classes": True})
    with caplog.at_level(logging.INFO, logger="sskd"):
        adapt_teacher(soft, progress=False)  # teachers load; their pseudo-labels gain the rows
        transfer(soft, progress=False)
    assert teacher.stat().st_mtime_ns == before[0]
    assert "teacher_adapted: already trained with these inputs" in caplog.text
    assert "student_transfer: inputs changed since the last run" in caplog.text
    assert student.stat().st_mtime_ns != before[1]
    recs = list(iter_records_jsonl(pl_file))
    insts = [i for r in recs for i in r.instances]
    assert insts and all(len(i.class_probs) == 3 and abs(sum(i.class_probs) - 1) < 1e-3
                         for i in insts)
    assert "student_transfer" in read_metrics(run.dir.metrics)["models"]

    # a file written before the setting (the teacher step skipped) is labelled again by stage 2
    caplog.clear()
    pl_file.write_text("".join(json.dumps({**r.to_dict(), "instances": [
        {k: v for k, v in i.to_dict().items() if k != "class_probs"} for i in r.instances]}) + "\n"
        for r in recs))
    with caplog.at_level(logging.INFO, logger="sskd"):
        transfer(soft, progress=False)
    assert "carry no class distributions; labelling D_u again" in caplog.text
    assert all(i.class_probs for r in iter_records_jsonl(pl_file) for i in r.instances)


def _retrained(run, tmp_path, overrides, stages):
    """Apply ``overrides`` to the finished run ``run``, re-run ``stages``; returns the reopened
    run and, per model with pseudo-labels on either side of it, whether it trained again."""
    tags = ("teacher_1a", "teacher_adapted", "student_supervised", "student_transfer")
    weights = {t: run.dir.model_dir(t) / "model.pt" for t in tags}
    before = {t: p.stat().st_mtime_ns for t, p in weights.items()}
    new = open_run("r", runs_root=str(tmp_path / "runs"), overrides=overrides)
    for stage in stages:
        stage(new, progress=False)
    return new, {t: p.stat().st_mtime_ns != before[t] for t, p in weights.items()}


#: what a pseudo-label setting retrains: the models trained on pseudo-labels, nothing else
PSEUDO_LABEL_USERS = {"teacher_1a": False, "teacher_adapted": True, "student_supervised": False,
                      "student_transfer": True}


def test_class_prior_renames_pseudo_labels_and_retrains_only_the_stages_using_them(tmp_path,
                                                                                  caplog):
    """``pseudo_label.class_prior`` on a finished run: 1b and stage 2 train again on renamed
    pseudo-labels; 1a and the supervised baselines (no pseudo-labels) load; the pseudo-label
    files stay the teacher's own output and metrics gain the renamed labels' class matching."""
    run = _run_through_stage_2(tmp_path)
    with caplog.at_level(logging.INFO, logger="sskd"):
        aligned, retrained = _retrained(run, tmp_path, {"pseudo_label.class_prior": "uniform"},
                                        [adapt_teacher, transfer])
    assert retrained == PSEUDO_LABEL_USERS
    assert "teacher_adapted: pseudo_label.class_prior uniform renamed" in caplog.text
    assert "student_transfer: pseudo_label.class_prior uniform renamed" in caplog.text
    m = read_metrics(aligned.dir.metrics)["pseudo_labels"]["teacher_adapted"]
    assert m["matching_aligned"]["n_matched"] == m["matching"]["n_matched"]  # same masks
    # the file keeps the teacher's first choice; stage 2's fingerprint has the renamed classes
    from sskd.engine.class_alignment import align_classes
    from sskd.stages.common import fingerprint, load_pseudo_labels
    pl = load_pseudo_labels(aligned, "teacher_adapted", ["circle", "rectangle", "triangle"])
    assert all(i.class_id == int(np.argmax(i.class_probs)) for r in pl.records for i in r.instances)
    renamed, _ = align_classes(pl, np.full(3, 1 / 3))
    renamed = dataclasses.replace(renamed, records=[dataclasses.replace(r, instances=[
        dataclasses.replace(i, class_probs=None) for i in r.instances]) for r in renamed.records])
    fp = json.loads((aligned.dir.checkpoint_dir("student_transfer") / "fingerprint.json").read_text())
    assert fp["parts"]["pseudo_labeled"] == fingerprint(renamed)


def test_mask_refinement_relabels_and_retrains_only_what_trains_on_pseudo_labels(tmp_path):
    """``pseudo_label.mask_refine`` on a finished run: every pseudo-label file is made again
    with refined masks (same instances, other outlines), 1b and stage 2 train again on them;
    1a and the supervised baselines load; evaluation (predictions on val) is unchanged."""
    run = _run_through_stage_2(tmp_path)
    pl_file = run.dir.pseudo_labels("teacher_zero_shot")
    side = pl_file.with_name(pl_file.name + ".fingerprint")
    old_pl, old_side = list(iter_records_jsonl(pl_file)), side.read_text()
    old_val = run.dir.predictions("teacher_zero_shot").read_text()

    _, retrained = _retrained(run, tmp_path, {"pseudo_label.mask_refine": "guided",
                                              "pseudo_label.refine_radius": 2},
                              [zero_shot, adapt_teacher, transfer])
    assert retrained == PSEUDO_LABEL_USERS
    assert run.dir.predictions("teacher_zero_shot").read_text() == old_val
    # made again (the smoke preset's untrained teachers keep every pixel at mask_threshold 0,
    # so the outlines cannot move here: tests/engine/test_mask_refinement.py shows they do)
    assert side.read_text() != old_side
    assert [r.image_id for r in iter_records_jsonl(pl_file)] == [r.image_id for r in old_pl]


def test_soft_classes_need_pseudo_labels_with_class_distributions():
    from sskd.config import StageConfig
    from sskd.data.records import Dataset, ImageRecord, Instance
    from sskd.stages.common import fingerprint, soft_class_targets
    m = np.zeros((4, 4), np.uint8)
    m[1:3, 1:3] = 1
    ds = Dataset([ImageRecord("x.png", 4, 4, 1, [Instance.from_mask(m, 1, 0.9)]),
                  ImageRecord("y.png", 4, 4, 2, [Instance.from_mask(m, 0, 0.8, class_probs=[.6, .4])])],
                 ["a", "b"], "pseudo_teacher_adapted")
    with pytest.raises(ValueError, match=r"stages.transfer.soft_classes: true needs the teacher's "
                                         r"class distributions, but 1 of 2 .*"
                                         r"sskd run --from adapt_teacher"):
        soft_class_targets(ds, "student_transfer", StageConfig(l_semi=1.0, soft_classes=True))
    # off: the distributions are dropped, so they reach neither the loss nor the fingerprint
    hard = soft_class_targets(ds, "student_transfer", StageConfig(l_semi=1.0))
    assert all(i.class_probs is None for r in hard.records for i in r.instances)
    assert fingerprint(hard) != fingerprint(ds)
    # a key added later, at its default, leaves a stage's fingerprint as it was before the key
    sc = StageConfig(l_semi=1.0)
    old = {k: v for k, v in dataclasses.asdict(sc).items() if k != "soft_classes"}
    old["train"].pop("ema_decay")   # added later still
    assert fingerprint(sc) == fingerprint(old)
    assert fingerprint(dataclasses.replace(sc, soft_classes=True)) != fingerprint(sc)
