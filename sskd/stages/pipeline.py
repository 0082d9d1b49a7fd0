"""The three stages of the method, docs/method.md (plus zero-shot labelling and the supervised baselines).

Each stage is a function of the run (dir + config) that reads its inputs from the run dir,
writes its outputs there atomically, records metrics, and skips work already done, so any
stage can be re-run or resumed after a crash.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sskd import graph
from sskd.data.records import Dataset
from sskd.stages.common import (StageTimer, _invalidate, evaluate_model, initial_student,
                                is_standin, load_pseudo_labels, pretrained_teacher, pseudo_label,
                                student_is_standin, train_stage, wants_class_probs)
from sskd.stages.checks import check_teacher_weights
from sskd.stages.parallel import side_jobs
from sskd.stages.data import load_datasets
from sskd.stages.run import Run, as_run, locked, log, set_threads
from sskd.metrics import read_metrics


def _models_summary(run: Run, tags: list[str]) -> dict:
    models = read_metrics(run.dir.metrics)["models"]
    return {t: {k: models[t][k] for k in ("AP", "AP50")} for t in tags if t in models}


def _has_artifacts(run: Run, tag: str) -> bool:
    d = run.dir
    m = read_metrics(d.metrics)
    return (d.checkpoint_dir(tag).is_dir() or d.predictions(tag).is_file() or d.log(tag).is_file()
            or d.pseudo_labels(tag).is_file() or tag in m["models"]
            or tag in m.get("pseudo_labels", {}))


def drop_disabled(run: Run, step: str) -> None:
    """Remove what the step's models left in the run dir when the config no longer produces them
    (a disabled stage's old weights, predictions, pseudo-labels and metrics would otherwise feed
    the report, the App and later stages). ``teacher_adapted`` with ``adapt_1b`` off is the 1a
    teacher: only an old 1b checkpoint and log go."""
    for m in graph.models_of(step):
        if not graph.produces(run.cfg, m.tag):
            if _has_artifacts(run, m.tag):
                log.info("%s: disabled in the config, removing its old results", m.tag)
                _invalidate(run, m.tag)
        elif m.config_key and not graph.trains(run.cfg, m.tag) \
                and run.dir.checkpoint_dir(m.tag).is_dir():
            log.info("%s: stages.%s is off, removing its old checkpoint", m.tag, m.config_key)
            shutil.rmtree(run.dir.checkpoint_dir(m.tag), ignore_errors=True)
            run.dir.log(m.tag).unlink(missing_ok=True)


@locked
def zero_shot(run: Run | str | Path, progress: bool = True) -> dict:
    """Zero-shot teacher theta_T0: pseudo-label D_u and evaluate on val (row 1 of Table 1).

    Beside the stand-in teacher's pretraining, a side process (:mod:`sskd.stages.parallel`)
    pretrains the stand-in student and trains the supervised student baseline: neither needs
    the teacher, and on 2 cores both fit in the teacher's pretraining time.
    """
    run = as_run(run)
    check_teacher_weights(run.cfg)  # before anything trains (the stand-ins' pretraining too)
    set_threads()
    side = [j for j, on in (("student_pretrain", student_is_standin(run)),
                            ("student_supervised", run.cfg.stages.student_supervised.enabled)) if on]
    with StageTimer(run, "zero_shot"):
        ds = load_datasets(run, with_source=True)
        with side_jobs(run, side if is_standin(run) else []):
            teacher = pretrained_teacher(run, ds, progress=progress)
        pseudo_label(run, teacher, "teacher_zero_shot", ds["unlabeled"])
        evaluate_model(run, teacher, "teacher_zero_shot", ds["val"])
    return _models_summary(run, ["teacher_zero_shot"])


def _supervised_baseline(run: Run, role: str, progress: bool) -> dict:
    """``<role>_supervised``: the role's initial model trained on D_l with L_sup only."""
    tag = f"{role}_supervised"
    sc = getattr(run.cfg.stages, tag)
    if sc.enabled:
        teacher = role == "teacher"
        if teacher:
            check_teacher_weights(run.cfg)
        ds = load_datasets(run, with_source=is_standin(run) if teacher else student_is_standin(run))
        init = (pretrained_teacher if teacher else initial_student)(run, ds, progress)
        m = train_stage(run, tag, init, ds["labeled"], None, sc,
                        getattr(run.cfg, role).trainable, progress)
        evaluate_model(run, m, tag, ds["val"])
    return _models_summary(run, [tag])


@locked
def teacher_supervised(run: Run | str | Path, progress: bool = True) -> dict:
    """Baseline: theta_T0 fine-tuned on D_l with L_sup only ("teacher, supervised" row)."""
    return _supervised_baseline(as_run(run), "teacher", progress)


@locked
def adapt_teacher(run: Run | str | Path, progress: bool = True) -> dict:
    """Stage 1: 1a (D_l + L_pxl) -> pseudo-labels -> 1b (re-init, D_l + pseudo D_u + L_pxl).

    Also the supervised-only teacher baseline (theta_T0 fine-tuned on D_l with L_sup), in a
    side process beside 1a/1b when ``workers >= 2``.
    With ``stages.adapt_1b.enabled: false`` the 1a teacher is the adapted one; with both off,
    the zero-shot pseudo-labels are used downstream (the "no teacher adaptation" ablation).
    """
    run = as_run(run)
    check_teacher_weights(run.cfg)
    set_threads()
    st = run.cfg.stages
    parts = run.cfg.teacher.trainable
    with StageTimer(run, "adapt_teacher"):
        drop_disabled(run, "adapt_teacher")
        ds = load_datasets(run, with_source=True)
        lab, unl = ds["labeled"], ds["unlabeled"]
        adapted = None
        with side_jobs(run, ["teacher_supervised"] if st.teacher_supervised.enabled else []):
            if st.adapt_1a.enabled:
                t1a = train_stage(run, "teacher_1a", pretrained_teacher(run, ds, progress), lab,
                                  None, st.adapt_1a, parts, progress)
                evaluate_model(run, t1a, "teacher_1a", ds["val"])
                pl_1a = pseudo_label(run, t1a, "teacher_1a", unl)
                adapted = t1a
                if st.adapt_1b.enabled:
                    # 1b re-initialises from theta_T0, not from theta_T' (docs/method.md, stage 1b).
                    adapted = train_stage(run, "teacher_adapted",
                                          pretrained_teacher(run, ds, progress), lab, pl_1a,
                                          st.adapt_1b, parts, progress)
            if adapted is not None:
                evaluate_model(run, adapted, "teacher_adapted", ds["val"])
                pseudo_label(run, adapted, "teacher_adapted", unl)
            else:
                log.info("teacher adaptation disabled: stage 2 uses the zero-shot pseudo-labels")
        teacher_supervised(run, progress)  # done by the side process: loads and evaluates
    return _models_summary(run, ["teacher_supervised", "teacher_1a", "teacher_adapted"])


def transfer_pseudo_tag(run: Run) -> str:
    """Which teacher's pseudo-labels stage 2 distils: the adapted teacher's when the config runs
    stage 1, else the zero-shot teacher's (decided by the config, never by an old file)."""
    return graph.pseudo_label_source(run.cfg, "student_transfer")


@locked
def student_supervised(run: Run | str | Path, progress: bool = True) -> dict:
    """Baseline: the student trained on D_l with L_sup only ("student, supervised" row)."""
    return _supervised_baseline(as_run(run), "student", progress)


@locked
def transfer(run: Run | str | Path, progress: bool = True) -> dict:
    """Stage 2: the frozen teacher's pseudo-labels of D_u; student on L_sup + l_semi L_semi + l_pxl L_pxl.

    Also the supervised-only student baseline (usually already trained beside the teacher's
    pretraining, see :func:`zero_shot`). With ``workers >= 2`` the ablations (child runs that
    re-run stage 2 with other settings) train in a side process beside it.
    """
    from sskd.stages.ablations import transfer_only_ablations
    run = as_run(run)
    set_threads()
    st = run.cfg.stages
    with StageTimer(run, "transfer"):
        drop_disabled(run, "transfer")
        student_supervised(run, progress)
        if st.transfer.enabled:
            ds = load_datasets(run, with_source=student_is_standin(run))
            pl = load_pseudo_labels(run, transfer_pseudo_tag(run), ds["labeled"].classes)
            if wants_class_probs(run.cfg, ["transfer"]) and any(
                    i.class_probs is None for r in pl.records for i in r.instances):
                pl = _relabel_with_class_probs(run, transfer_pseudo_tag(run), progress)
            with side_jobs(run, ["ablations"] if transfer_only_ablations(run) else []):
                m = train_stage(run, "student_transfer", initial_student(run, ds, progress),
                                ds["labeled"], pl, st.transfer, run.cfg.student.trainable,
                                progress)
                evaluate_model(run, m, "student_transfer", ds["val"])
    return _models_summary(run, ["student_supervised", "student_transfer"])


def _relabel_with_class_probs(run: Run, tag: str, progress: bool) -> Dataset:
    """The teacher ``tag``'s pseudo-labels again, now with class distributions: the file was
    written before ``soft_classes`` was set (the teacher step had nothing stale to redo)."""
    from sskd.models.base import load_model
    log.info("stages.transfer.soft_classes or pseudo_label.class_prior: pseudo-labels %s carry "
             "no class distributions; labelling D_u again with that teacher", tag)
    if tag == "teacher_zero_shot":
        ds = load_datasets(run, with_source=True)
        teacher = pretrained_teacher(run, ds, progress)
    else:
        ds = load_datasets(run)
        teacher = load_model(run.dir.model_dir(tag))
    run.dir.pseudo_labels(tag).unlink()  # whatever its side fingerprint says, it lacks them
    return pseudo_label(run, teacher, tag, ds["unlabeled"])


@locked
def refine(run: Run | str | Path, progress: bool = True) -> dict:
    """Stage 3: fine-tune the stage-2 student on D_l only (removes residual pseudo-label bias)."""
    from sskd.models.base import load_model
    run = as_run(run)
    set_threads()
    st = run.cfg.stages
    with StageTimer(run, "refine"):
        drop_disabled(run, "refine")
        ds = load_datasets(run)
        if st.refine.enabled:
            src = run.dir.model_dir("student_transfer")
            if not src.is_dir():
                raise FileNotFoundError(f"{src} is missing: stage 3 starts from the stage-2 "
                                        "student; run transfer(run) (notebook 03) first")
            m = train_stage(run, "student_refined", load_model(src), ds["labeled"], None, st.refine,
                            run.cfg.student.trainable, progress)
            evaluate_model(run, m, "student_refined", ds["val"])
    return _models_summary(run, ["student_refined"])
