"""Ablations (the paper's ablation tables, docs/method.md) as child runs, and the efficiency comparison of a run.

An ablation is ``name -> config overrides`` in ``cfg.ablations``. It becomes a child run in
``<run>/ablations/<name>/`` that reuses the parent's splits and pseudo-labels and re-runs only
the stages its overrides touch: stage 2 always (its student AP is what the paper's ablation
tables report), stage 1 too when the overrides touch the teacher or ``stages.adapt_*``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sskd.config import from_dict, merge_dicts, nest_keys, save_config, to_dict, validate
from sskd.metrics import read_metrics, update_metrics
from sskd.stages.pipeline import adapt_teacher, transfer
from sskd.stages.run import Run, as_run, log

_TEACHER_KEYS = ("teacher", "stages.adapt_1a", "stages.adapt_1b", "stages.teacher_pretrain")


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def reruns_teacher(overrides: dict) -> bool:
    """Whether an ablation's overrides change stage 1 (else it reuses the parent's teacher)."""
    return any(k.startswith(_TEACHER_KEYS) for k in _flat_keys(nest_keys(overrides)))


def transfer_only_ablations(run: Run) -> list[str]:
    """Ablations that re-run only stage 2: they can train beside the parent's stage 2."""
    return [n for n, ov in run.cfg.ablations.items() if not reruns_teacher(ov)]


def ablation_run(run: Run, name: str, overrides: dict) -> tuple[Run, bool]:
    """Create (or open) the child run of one ablation; returns it and whether stage 1 re-runs."""
    nested = nest_keys(overrides)
    rerun_teacher = reruns_teacher(overrides)
    root = run.dir.root / "ablations"
    data = merge_dicts(to_dict(run.cfg), nested)
    # workers 1: a child run is itself run in the parent's side process (no nested processes)
    data.update(run_name=name, runs_root=str(root), ablations={}, workers=1)
    data["stages"]["student_supervised"]["enabled"] = False
    data["stages"]["teacher_supervised"]["enabled"] = False
    cfg = from_dict(data)
    validate(cfg)
    child = Run(type(run.dir)(root / name), cfg)
    save_config(cfg, child.dir.config)
    for sub in ("splits",):
        _copy_tree(run.dir.root / sub, child.dir.root / sub)
    tags = ["teacher_zero_shot"] + ([] if rerun_teacher else ["teacher_1a", "teacher_adapted"])
    for tag in tags:
        src = run.dir.pseudo_labels(tag)
        if src.is_file() and not child.dir.pseudo_labels(tag).is_file():
            child.dir.pseudo_labels(tag).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, child.dir.pseudo_labels(tag))
    return child, rerun_teacher


def _copy_tree(src: Path, dst: Path) -> None:
    if src.is_dir() and not dst.exists():
        shutil.copytree(src, dst)


def run_ablations(run: Run | str | Path, names: list[str] | None = None, progress: bool = True) -> dict:
    """Run every (or the named) ablation; results go to ``metrics["ablations"][name]``."""
    run = as_run(run)
    results = {}
    for name, overrides in run.cfg.ablations.items():
        if names is not None and name not in names:
            continue
        child, rerun_teacher = ablation_run(run, name, overrides)
        log.info("ablation %s: overrides %s (stage 1 %s)", name, overrides,
                 "re-run" if rerun_teacher else "reused")
        if rerun_teacher:
            adapt_teacher(child, progress=progress)
        transfer(child, progress=progress)
        m = read_metrics(child.dir.metrics)
        entry = {"overrides": overrides, "reran": (["adapt_teacher"] if rerun_teacher else []) + ["transfer"],
                 "models": m["models"], "stages": m["stages"]}
        update_metrics(run.dir.metrics, "ablations", name, entry)
        results[name] = {t: {k: v[k] for k in ("AP", "AP50")} for t, v in m["models"].items()}
    return results


def measure_efficiency(run: Run | str | Path, image_size: int | None = None) -> list[dict]:
    """Teacher vs student params, FLOPs, latency, throughput, memory -> ``metrics["efficiency"]``."""
    from sskd.evaluation.efficiency import compare
    from sskd.models.base import load_model
    from sskd.stages.common import build_from_config
    run = as_run(run)
    from sskd.stages.data import load_datasets
    classes = load_datasets(run)["labeled"].classes
    models = {}
    for role, tags in (("teacher", ["teacher_adapted", "teacher_1a"]),
                       ("student", ["student_refined", "student_transfer"])):
        found = next((run.dir.model_dir(t) for t in tags if run.dir.model_dir(t).is_dir()), None)
        mc = getattr(run.cfg, role)
        models[role] = load_model(found) if found else build_from_config(mc, list(classes))
    rows = compare(models, image_size=image_size or run.cfg.data.input_size, device=run.device)
    update_metrics(run.dir.metrics, "efficiency", None, rows)
    return rows
