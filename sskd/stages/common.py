"""Pieces every stage shares: building/loading models, training a stage once, predicting, evaluating."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from sskd.config import (ModelConfig, PseudoLabelConfig, StageConfig, TrainConfig, config_hash,
                         fingerprint_dict, to_dict)
from sskd.data.records import Dataset, iter_records_jsonl, write_json_atomic
from sskd.engine.data import InputGeometry
from sskd.engine.inference import masks_overlap, predict_to_jsonl
from sskd.engine.trainer import Objective, TrainPaths, train
from sskd.metrics import read_metrics, update_metrics
from sskd.models.base import MIN_KEPT_FRACTION, Segmenter, build_model, load_model
from sskd.stages.checks import trainable_parts
from sskd.stages.run import Run, log

STANDIN_VERSION = 3  # bump when the stand-ins' recipe changes (invalidates their caches)


def build_from_config(mc: ModelConfig, classes: list[str], seed: int = 0) -> Segmenter:
    """Build a model; its random initialisation is seeded, so a stage is reproducible."""
    kwargs = dict(mc.options)
    if mc.name == "grounded_sam":
        kwargs.setdefault("classes", list(classes))
    elif mc.weights:
        kwargs["encoder_weights"] = mc.weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(mc.name, num_classes=len(classes), size=mc.size, **kwargs)


def is_standin(run: Run) -> bool:
    """The offline default: the teacher is pretrained by the kit (no foundation weights given)."""
    t = run.cfg.teacher
    return t.name == "mask2former" and not t.weights and run.cfg.data.kind == "synthetic"


def student_is_standin(run: Run) -> bool:
    """The student starts from a kit-pretrained stand-in of its foundation backbone."""
    s = run.cfg.student
    return (s.name == "mask2former" and not s.weights and run.cfg.data.kind == "synthetic"
            and run.cfg.stages.student_pretrain.steps > 0)


def input_geometry(run: Run) -> InputGeometry:
    """How the run sizes images (``data.input_size`` / ``test_short_side`` / ``train_crop``)."""
    return InputGeometry.from_config(run.cfg.data)


def _loader_kwargs(run: Run) -> dict:
    """train() arguments of the input pipeline (they never change the numbers)."""
    return {"geometry": input_geometry(run), "num_workers": run.cfg.data.num_workers,
            "cache_mb": run.cfg.data.cache_mb}


def run_train_config(run: Run, tc: TrainConfig) -> TrainConfig:
    """``tc`` with its sampling seed tied to the run's global ``seed``.

    ``seed: 1`` must change every random choice of a run (init, batches, augmentation, loss
    points), or a "second seed" would re-train on the same batches and understate seed noise.
    Seed 0 keeps ``tc.seed`` as is.
    """
    if not run.cfg.seed:
        return tc
    return dataclasses.replace(
        tc, seed=int(np.random.SeedSequence([run.cfg.seed, tc.seed]).generate_state(1)[0]))


def _corpus_key(run: Run) -> dict:
    """What the stand-ins' pretraining corpus is made of (not the target's splits or sizes)."""
    from sskd.data.synthetic import GENERATOR_VERSION, corpus_domains
    syn = run.cfg.data.synthetic
    return {"generator": GENERATOR_VERSION, "domains": [to_dict(d) for d in corpus_domains(syn)],
            "n": syn.n_source, "image_size": syn.image_size, "classes": list(syn.classes),
            "seed": syn.seed}


def _standin_dir(run: Run, role: str, mc: ModelConfig, pretrain) -> Path:
    # Not keyed by the run's ``seed``: like downloaded foundation weights, a second seed of an
    # experiment re-runs the stages, not the foundation model's pretraining.
    key = config_hash({"v": STANDIN_VERSION, role: fingerprint_dict(mc), "corpus": _corpus_key(run),
                       "input_size": run.cfg.data.input_size,
                       "pretrain": fingerprint_dict(pretrain)})
    return run.cache_dir / f"standin_{role}" / key


def standin_dir(run: Run) -> Path:
    return _standin_dir(run, "teacher", run.cfg.teacher, run.cfg.stages.teacher_pretrain)


def student_standin_dir(run: Run) -> Path:
    return _standin_dir(run, "student", run.cfg.student, run.cfg.stages.student_pretrain)


@contextlib.contextmanager
def _cache_entry_lock(root: Path) -> Iterator[None]:
    """Hold ``root/.lock`` (flock) while a stand-in is pretrained into ``root``.

    A second run that needs the same stand-in waits, saying which PID holds it, then loads
    the finished weights instead of training them again beside the first.
    """
    import fcntl
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            log.info("stand-in %s is being pretrained by PID %s: waiting for it", root,
                     fh.read().strip() or "?")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(str(os.getpid()))
            fh.flush()
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pretrained_standin(run: Run, role: str, mc: ModelConfig, pretrain, root: Path,
                        datasets: dict[str, Dataset], progress: bool) -> Segmenter:
    """Pretrain ``mc`` on the synthetic pretraining corpus once per machine (cached, resumable).

    Seeded by ``pretrain.seed`` only (model init and sampling), never by the run's ``seed``.
    """
    stage = f"{role}_pretrain"
    paths = TrainPaths.in_dir(root, "pretrain")
    with _cache_entry_lock(root):
        if not paths.model_dir.is_dir():
            if "source" not in datasets:
                raise ValueError(f"stand-in {role} pretraining needs the pretraining corpus: "
                                 "call load_datasets(run, with_source=True)")
            log.info("pretraining the stand-in %s on the corpus (%d images) -> %s", role,
                     len(datasets["source"]), root)
            model = build_from_config(mc, datasets["labeled"].classes, pretrain.seed)
            t0 = time.perf_counter()
            train(model, datasets["source"], paths, pretrain, Objective(),
                  device=run.device, progress=progress, desc=f"{role} pretrain (corpus)",
                  **_loader_kwargs(run))
            update_metrics(run.dir.metrics, "stages", stage,
                           {"seconds": round(time.perf_counter() - t0, 1), "done": True,
                            "cached": False})
        elif stage not in read_metrics(run.dir.metrics)["stages"]:
            update_metrics(run.dir.metrics, "stages", stage,
                           {"seconds": 0.0, "done": True, "cached": True, "cache": str(root)})
    return load_model(paths.model_dir)


def pretrained_teacher(run: Run, datasets: dict[str, Dataset], progress: bool = True) -> Segmenter:
    """theta_T0: the foundation teacher before adaptation.

    Offline default: the stand-in, pretrained by the kit on the synthetic foundation corpus
    (``data.synthetic.corpus_*``; the target's appearance held out) and cached by config hash,
    independently of the run's seed (built once per machine; a killed pretraining resumes).
    """
    if not is_standin(run):
        return build_from_config(run.cfg.teacher, datasets["labeled"].classes, run.cfg.seed)
    return _pretrained_standin(run, "teacher", run.cfg.teacher, run.cfg.stages.teacher_pretrain,
                               standin_dir(run), datasets, progress)


def initial_student(run: Run, datasets: dict[str, Dataset], progress: bool = True) -> Segmenter:
    """The student every student stage starts from (the same init for baseline and stage 2).

    As the paper's student starts from DINOv2-S features (``student.weights``), only the
    encoder carries pretrained knowledge: offline, with ``stages.student_pretrain.steps > 0``,
    the encoder of a stand-in student pretrained on the foundation corpus (cached like the
    stand-in teacher, seed-independent). Neck, decoder and projection heads are initialised
    from the run's ``seed``, as the paper trains them from scratch.
    """
    student = build_from_config(run.cfg.student, datasets["labeled"].classes, run.cfg.seed)
    if not student_is_standin(run):
        return student
    standin = _pretrained_standin(run, "student", run.cfg.student, run.cfg.stages.student_pretrain,
                                  student_standin_dir(run), datasets, progress)
    encoder = {k: v for k, v in standin.state_dict().items() if student.is_encoder_parameter(k)}
    if not encoder:
        raise RuntimeError(f"the stand-in student in {student_standin_dir(run)} has no encoder "
                           "parameters: delete that cache dir to pretrain it again")
    missing, unexpected = student.load_state_dict(encoder, strict=False)
    assert not unexpected and not any(student.is_encoder_parameter(k) for k in missing)
    return student


def fingerprint(*parts: object) -> str:
    """Stable hash of configs, datasets (their records) and model weights."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Segmenter):
            for k, t in part.state_dict().items():
                h.update(k.encode())
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(part, Dataset):
            for r in part.records:
                h.update(json.dumps(r.to_dict(), sort_keys=True).encode())
        else:
            h.update(json.dumps(fingerprint_dict(part) if dataclasses.is_dataclass(part) else part,
                                sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _invalidate(run: Run, stage: str) -> None:
    """Remove a stage's weights, state, log and the outputs of its model (they are stale), and
    the metrics.json entries of it and of every model derived from it (:mod:`sskd.graph`)."""
    from sskd.graph import MODEL_TAGS, downstream
    from sskd.metrics import remove_metrics
    shutil.rmtree(run.dir.checkpoint_dir(stage), ignore_errors=True)
    for p in (run.dir.log(stage), run.dir.predictions(stage), run.dir.pseudo_labels(stage)):
        for q in (p, p.with_name(p.name + ".partial"), p.with_name(p.name + ".fingerprint")):
            q.unlink(missing_ok=True)
    stale = [stage, *(downstream(stage) if stage in MODEL_TAGS else ())]
    remove_metrics(run.dir.metrics, {"models": stale, "pseudo_labels": stale, "stages": [stage]})


def _read_fingerprint(fp_file: Path, stage: str) -> dict:
    """A stage's ``fingerprint.json`` (``{}`` when absent); a corrupt one names the fix."""
    if not fp_file.is_file():
        return {}
    from sskd.safe_load import load_json
    return load_json(fp_file, f"delete {fp_file.parent} to train stage {stage} again")


def train_stage(run: Run, stage: str, model: Segmenter, labeled: Dataset,
                unlabeled: Dataset | None, sc: StageConfig,
                trainable: Sequence[str] = ("default",), progress: bool = True) -> Segmenter:
    """Train ``model`` for one stage, or load its weights when it already ran with the same inputs.

    The stage's fingerprint covers its config, the initial weights and the exact labeled and
    pseudo-labeled records; when any of them changed (new loss weights, a re-adapted teacher),
    the old weights and the predictions made with them are removed and the stage trains again.
    ``trainable``: the role's ``trainable`` setting (which parts of ``model`` train).
    """
    paths = TrainPaths.in_dir(run.dir.root, stage)
    fp_file = run.dir.checkpoint_dir(stage) / "fingerprint.json"
    trainable = trainable_parts(model, trainable)
    # how pseudo-label masks are refined shows in the pseudo-labelled records themselves: a
    # stage is not retrained for the setting, only for the records it changes
    off = PseudoLabelConfig()
    pl_cfg = dataclasses.replace(run.cfg.pseudo_label, mask_refine=off.mask_refine,
                                 refine_radius=off.refine_radius, refine_eps=off.refine_eps)
    if unlabeled is not None and sc.l_semi > 0:
        unlabeled = aligned_pseudo_labels(run, unlabeled, labeled, stage)
    else:  # the class prior renames L_semi's targets: a stage without them is not retrained for it
        pl_cfg = dataclasses.replace(pl_cfg, class_prior="none")
    if unlabeled is not None:
        unlabeled = soft_class_targets(unlabeled, stage, sc)
    parts = {"stage_config": sc, "seed": run.cfg.seed, "trainable": list(trainable),
             "pixel_contrast": run.cfg.pixel_contrast, "pseudo_label": pl_cfg,
             "input_size": input_geometry(run).describe(), "initial_weights": model,
             "labeled": labeled, "pseudo_labeled": unlabeled or []}
    part_fps = {k: fingerprint(v) for k, v in parts.items()}
    fp = fingerprint(part_fps)
    saved = _read_fingerprint(fp_file, stage)
    old = saved.get("fingerprint")
    if old == fp and paths.model_dir.is_dir():
        log.info("%s: already trained with these inputs, loading %s", stage, paths.model_dir)
        return load_model(paths.model_dir)
    if old != fp:
        if old is not None or paths.model_dir.is_dir():
            changed = [k for k, v in part_fps.items() if saved.get("parts", {}).get(k) != v]
            log.info("%s: inputs changed since the last run (%s): training again", stage,
                     ", ".join(changed) or "unknown")
        _invalidate(run, stage)
        write_json_atomic({"fingerprint": fp, "parts": part_fps}, fp_file)
    model.set_trainable(trainable)
    obj = Objective(l_semi=sc.l_semi, l_pxl=sc.l_pxl, pixel_contrast=run.cfg.pixel_contrast,
                    pseudo_label=run.cfg.pseudo_label)
    train(model, labeled, paths, run_train_config(run, sc.train), obj,
          unlabeled=unlabeled if sc.l_semi > 0 or (unlabeled is not None and sc.l_pxl > 0) else None,
          device=run.device, progress=progress, desc=stage, **_loader_kwargs(run))
    return load_model(paths.model_dir)


def wants_class_probs(cfg, stages: Sequence[str] = ("adapt_1b", "transfer")) -> bool:
    """Whether pseudo-labels keep the teacher's class distributions: one of ``stages`` trains on
    them with ``soft_classes`` or with ``pseudo_label.class_prior`` set (otherwise the files stay
    as they were, without them)."""
    aligned = cfg.pseudo_label.class_prior != "none"
    return any((sc.soft_classes or aligned) and sc.l_semi > 0
               for sc in (getattr(cfg.stages, k) for k in stages))


def aligned_pseudo_labels(run: Run, unlabeled: Dataset, labeled: Dataset,
                          stage: str = "") -> Dataset:
    """The pseudo-labels renamed by ``pseudo_label.class_prior``
    (:mod:`sskd.engine.class_alignment`); unchanged with ``none``."""
    from sskd.engine.class_alignment import align_classes, class_prior
    kind = run.cfg.pseudo_label.class_prior
    if kind == "none":
        return unlabeled
    aligned, summary = align_classes(unlabeled, class_prior(labeled, kind))
    if summary and stage:
        log.info("%s: pseudo_label.class_prior %s renamed %d of %d pseudo-labels of %s "
                 "(class counts %s -> %s)", stage, kind, summary["renamed"],
                 summary["instances"], unlabeled.name, summary["counts_before"],
                 summary["counts_after"])
    return aligned


def _config_key(stage: str) -> str:
    """``stages.<this>`` of a model stage (its tag for stages outside the graph)."""
    from sskd import graph
    try:
        return graph.model(stage).config_key or stage
    except KeyError:
        return stage


def soft_class_targets(unlabeled: Dataset, stage: str, sc: StageConfig) -> Dataset:
    """The pseudo-labels a stage trains on: with ``soft_classes`` every instance must carry the
    teacher's class distribution (else a clear error); without, the distributions are dropped
    (so they neither reach the loss nor change the stage's fingerprint)."""
    if not sc.soft_classes or sc.l_semi <= 0:
        if not any(i.class_probs is not None for r in unlabeled.records for i in r.instances):
            return unlabeled
        records = [dataclasses.replace(r, instances=[dataclasses.replace(i, class_probs=None)
                                                     for i in r.instances])
                   for r in unlabeled.records]
        return dataclasses.replace(unlabeled, records=records)
    from sskd.engine.class_alignment import check_class_probs
    check_class_probs(unlabeled, f"stages.{_config_key(stage)}.soft_classes: true",
                      "soft_classes: false")
    return unlabeled


def _predict(run: Run, model: Segmenter, dataset: Dataset, out: Path, desc: str,
             thresholds, class_probs: bool = False) -> Path:
    """predict_to_jsonl, recomputed when the model, the images or the thresholds changed."""
    # only what changes the predictions (not e.g. the report's evaluation.seed_noise_ap),
    # including how disjoint masks are made (a file made by an older rule is recomputed)
    overlap = ["overlapping"] if masks_overlap(thresholds) else ["disjoint", MIN_KEPT_FRACTION]
    refine = [] if getattr(thresholds, "mask_refine", "none") == "none" else \
        [[thresholds.mask_refine, thresholds.refine_radius, thresholds.refine_eps]]
    fp = fingerprint(model, dataset, [thresholds.score_threshold, thresholds.max_instances,
                                      thresholds.mask_threshold, overlap]
                     + (["class_probs"] if class_probs else []) + refine,
                     input_geometry(run).describe())
    side = out.with_name(out.name + ".fingerprint")
    if not side.is_file() or side.read_text() != fp:
        for q in (out, out.with_name(out.name + ".partial")):
            q.unlink(missing_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        side.write_text(fp)
    return predict_to_jsonl(model, dataset, out, thresholds, geometry=input_geometry(run),
                            device=run.device, desc=desc, class_probs=class_probs)


def evaluate_model(run: Run, model: Segmenter, tag: str, val: Dataset) -> dict:
    """Predict val -> ``predictions/<tag>.jsonl``, mask AP -> ``metrics.json`` models[tag]."""
    from sskd.evaluation.coco_eval import evaluate_masks
    path = _predict(run, model, val, run.dir.predictions(tag), f"eval {tag}", run.cfg.evaluation)
    preds = list(iter_records_jsonl(path))
    res = evaluate_masks(val, preds)
    res["params"] = model.num_parameters()
    if run.cfg.data.kind == "cityscapes":
        res.update(_cityscapes_ap(val, preds, tag))
    update_metrics(run.dir.metrics, "models", tag, res)
    log.info("%s: AP %.1f AP50 %.1f", tag, res["AP"], res["AP50"])
    return res


def _cityscapes_ap(val: Dataset, preds: list, tag: str) -> dict:
    """The official Cityscapes AP beside COCO's (``cityscapes_AP``, ``cityscapes_AP50``); without
    the optional extra, one log line says how to install it and nothing is recorded."""
    from sskd.evaluation.cityscapes_eval import (INSTALL_HINT, cityscapes_available,
                                                 evaluate_cityscapes)
    if not cityscapes_available():
        log.warning("%s: official Cityscapes AP skipped: %s", tag, INSTALL_HINT)
        return {}
    cs = evaluate_cityscapes(val, preds)
    log.info("%s: Cityscapes AP %.1f AP50 %.1f", tag, cs["AP"], cs["AP50"])
    return {"cityscapes_AP": cs["AP"], "cityscapes_AP50": cs["AP50"]}


def pseudo_label(run: Run, model: Segmenter, tag: str, unlabeled: Dataset) -> Dataset:
    """Teacher pseudo-labels of D_u -> ``pseudo_labels/<tag>.jsonl`` (streamed, resumable).

    When D_u carries hidden ground truth (synthetic data), the pseudo-labels' own mask AP, and
    how many of their masks match an object and carry its class
    (:mod:`sskd.evaluation.instance_matching`), are recorded under
    ``metrics["pseudo_labels"][tag]`` (never used for training).
    """
    path = _predict(run, model, unlabeled, run.dir.pseudo_labels(tag), f"pseudo-label {tag}",
                    run.cfg.pseudo_label, class_probs=wants_class_probs(run.cfg))
    records = list(iter_records_jsonl(path))
    if any(r.instances for r in unlabeled.records):
        from sskd.report import fmt
        entry = pseudo_label_quality(unlabeled, records)
        match = entry["matching"]
        if run.cfg.pseudo_label.class_prior != "none" and wants_class_probs(run.cfg):
            # what the stages train on: the same masks, renamed by the class prior
            from sskd.evaluation.instance_matching import match_instances
            from sskd.stages.data import load_datasets
            aligned = aligned_pseudo_labels(run, Dataset(records, list(unlabeled.classes), tag),
                                            load_datasets(run)["labeled"])
            entry["matching_aligned"] = match_instances(unlabeled, aligned.records)
            log.info("pseudo-labels %s renamed by pseudo_label.class_prior %s: %s%% of matched "
                     "masks with the right class", tag, run.cfg.pseudo_label.class_prior,
                     fmt(entry["matching_aligned"]["class_accuracy"], 0))
        update_metrics(run.dir.metrics, "pseudo_labels", tag, entry)
        log.info("pseudo-labels %s: AP %.1f; masks matched %s%% of objects, %s%% of them with "
                 "the right class", tag, entry["AP"], fmt(match["mask_recall"], 0),
                 fmt(match["class_accuracy"], 0))
    return Dataset(records, list(unlabeled.classes), f"pseudo_{tag}")


def pseudo_label_quality(unlabeled: Dataset, records: Sequence) -> dict:
    """Pseudo-labels ``records`` against D_u's hidden ground truth: their mask AP (``AP``,
    ``AP50``, ``AP75``, ``per_class``) and class-agnostic ``matching``
    (:func:`sskd.evaluation.instance_matching.match_instances`): what ``metrics.json`` keeps
    under ``pseudo_labels[tag]``."""
    from sskd.evaluation.coco_eval import evaluate_masks
    from sskd.evaluation.instance_matching import match_instances
    res = evaluate_masks(unlabeled, list(records))
    return {**{k: res[k] for k in ("AP", "AP50", "AP75", "per_class")},
            "matching": match_instances(unlabeled, records)}


def load_pseudo_labels(run: Run, tag: str, classes: list[str]) -> Dataset:
    path = run.dir.pseudo_labels(tag)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes pseudo-labels "
                                f"'{tag}' first (see notebooks/ or `sskd run`)")
    return Dataset(list(iter_records_jsonl(path)), list(classes), f"pseudo_{tag}")


class StageTimer:
    """Records a stage's wall time in ``metrics.json`` under ``stages``."""

    def __init__(self, run: Run, stage: str) -> None:
        self.run, self.stage = run, stage

    def __enter__(self) -> "StageTimer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            prev = read_metrics(self.run.dir.metrics)["stages"].get(self.stage, {})
            secs = round(time.perf_counter() - self.t0, 1)
            update_metrics(self.run.dir.metrics, "stages", self.stage,
                           {"seconds": secs, "done": True,
                            "first_seconds": prev.get("first_seconds", secs)})
