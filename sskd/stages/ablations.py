"""Ablations (the paper's ablation tables, docs/method.md) as child runs, and the efficiency comparison of a run.

An ablation is ``name -> config overrides`` in ``cfg.ablations``. It becomes a child run in
``<run>/ablations/<name>/`` that reuses the parent's splits and pseudo-labels and re-runs only
the stages its overrides touch: stage 2 always (its student AP is what the paper's ablation
tables report), stage 1 too when the overrides touch the teacher or ``stages.adapt_*``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from sskd import graph
from sskd.config import (from_dict, merge_dicts, nest_keys, read_config, save_config, to_dict,
                         validate)
from sskd.metrics import drop_stale_results, read_metrics, remove_metrics, update_metrics
from sskd.stages.pipeline import adapt_teacher, transfer
from sskd.stages.run import Run, as_run, locked, log

#: config keys whose change re-runs stage 1 in the child: the teacher, its pretraining and the
#: teacher's paper stages (the supervised baseline is off in child runs)
TEACHER_KEYS = ("teacher", "stages.teacher_pretrain") + tuple(
    f"stages.{m.config_key}" for m in graph.MODELS if m.role == "teacher" and m.kind == "stage")
#: the child's own stage-1 teachers (re-run, or copied from the parent when not)
_STAGE1 = tuple(m.tag for m in graph.MODELS if m.role == "teacher" and m.kind == "stage")


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


def reruns_teacher(overrides: dict) -> bool:
    """Whether an ablation's overrides change stage 1 (else it reuses the parent's teacher)."""
    return any(k == t or k.startswith(t + ".") for k in _flat_keys(nest_keys(overrides))
               for t in TEACHER_KEYS)


def transfer_only_ablations(run: Run) -> list[str]:
    """Ablations that re-run only stage 2: they can train beside the parent's stage 2."""
    return [n for n, ov in run.cfg.ablations.items() if not reruns_teacher(ov)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mirror_file(src: Path, dst: Path) -> bool:
    """Make ``dst`` a copy of ``src`` (same bytes), or remove it when ``src`` is missing.
    Returns whether ``dst`` changed. The copy is written under a unique name, then renamed."""
    if not src.is_file():
        if dst.is_file():
            dst.unlink()
            return True
        return False
    if dst.is_file() and _sha(src) == _sha(dst):
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    return True


def ablation_run(run: Run, name: str, overrides: dict) -> tuple[Run, bool]:
    """Create (or update) the child run of one ablation; returns it and whether stage 1 re-runs.

    The child always follows the parent as it is now: its config is the parent's current one
    plus the overrides, and its splits and the parent's pseudo-labels it reuses are copied again
    whenever their content differs (a re-split or re-adapted parent). The stages then retrain
    what these inputs changed (their fingerprints).
    """
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
    if child.dir.config.is_file():  # the child's results from an older config go first
        drop_stale_results(child.dir, to_dict(read_config(child.dir.config)), to_dict(cfg))
    save_config(cfg, child.dir.config)
    for split in ("labeled", "unlabeled", "val"):
        mirror_file(run.dir.split(split), child.dir.split(split))
    reused = [m.tag for m in graph.MODELS if m.writes_pseudo_labels
              and (m.kind == "zero_shot" or not rerun_teacher)]
    for tag in reused:
        if not rerun_teacher and tag in _STAGE1 and child.dir.checkpoint_dir(tag).is_dir():
            _invalidate_child(child, tag)  # its own teacher from when it re-ran stage 1
        if mirror_file(run.dir.pseudo_labels(tag), child.dir.pseudo_labels(tag)):
            # not the child's own prediction: no sidecar may claim a model made it
            child.dir.pseudo_labels(tag).with_name(f"{tag}.jsonl.fingerprint").unlink(
                missing_ok=True)
            log.info("ablation %s: %s pseudo-labels follow the parent's", name, tag)
    return child, rerun_teacher


def _invalidate_child(child: Run, tag: str) -> None:
    from sskd.stages.common import _invalidate
    _invalidate(child, tag)


def drop_removed_ablations(run: Run) -> list[str]:
    """Remove the child runs and ``metrics["ablations"]`` entries of ablations the config no
    longer has, so they cannot feed the report's claims. Returns their names."""
    entries = read_metrics(run.dir.metrics)["ablations"]
    root = run.dir.root / "ablations"
    dirs = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    gone = sorted((set(entries) | set(dirs)) - set(run.cfg.ablations))
    for name in gone:
        log.info("ablation %s is no longer in the config: removing its results", name)
        shutil.rmtree(root / name, ignore_errors=True)
    remove_metrics(run.dir.metrics, {"ablations": gone})
    return gone


@locked
def run_ablations(run: Run | str | Path, names: list[str] | None = None, progress: bool = True) -> dict:
    """Run every (or the named) ablation; results go to ``metrics["ablations"][name]``.

    Each entry records the overrides and the sampler the child actually used (from its config).
    Ablations removed from the config lose their child run and metrics entry.
    """
    run = as_run(run)
    drop_removed_ablations(run)
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
                 "sampler": child.cfg.pixel_contrast.sampler,
                 "models": m["models"], "stages": m["stages"]}
        update_metrics(run.dir.metrics, "ablations", name, entry)
        results[name] = {t: {k: v[k] for k in ("AP", "AP50")} for t, v in m["models"].items()}
    return results


@locked
def measure_efficiency(run: Run | str | Path, image_size: int | None = None) -> list[dict]:
    """Teacher vs student params, FLOPs, latency, throughput, memory -> ``metrics["efficiency"]``."""
    from sskd.evaluation.efficiency import compare
    from sskd.models.base import load_model
    from sskd.stages.common import build_from_config
    run = as_run(run)
    from sskd.stages.data import load_datasets
    classes = load_datasets(run)["labeled"].classes
    models = {}
    for role in ("teacher", "student"):
        tags = graph.final_models(role)
        found = next((run.dir.model_dir(t) for t in tags if run.dir.model_dir(t).is_dir()), None)
        mc = getattr(run.cfg, role)
        models[role] = load_model(found) if found else build_from_config(mc, list(classes))
    rows = compare(models, image_size=image_size or run.cfg.data.input_size, device=run.device)
    update_metrics(run.dir.metrics, "efficiency", None, rows)
    return rows
