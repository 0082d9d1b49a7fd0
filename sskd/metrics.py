"""``metrics.json`` of a run: every stage adds its results here, read-modify-write, atomically.

Layout::

    {"models":     {tag: {"AP", "AP50", "AP75", "per_class": {name: AP}, "params", "num_images"}},
     "stages":     {stage: {"seconds": float, "done": true}},
     "ablations":  {name: {"models": {tag: {...}}, "overrides": {...}}},
     "efficiency": rows of :func:`sskd.evaluation.efficiency.compare` ("name", "params_M",
                   "gflops", "latency_ms", "throughput_img_s", "peak_mem_MB", ratio row last)}
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Mapping

from sskd.data.records import write_json_atomic


def read_metrics(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {"models": {}, "stages": {}, "ablations": {}}
    from sskd.safe_load import load_json
    data = load_json(path, "delete it and re-run the stages (`sskd run --force`): it is rebuilt "
                           "from their outputs, trained models are reused")
    for key in ("models", "stages", "ablations"):
        data.setdefault(key, {})
    return data


def update_metrics(path: str | Path, section: str, key: str | None, value: Any) -> dict:
    """Set ``metrics[section][key] = value`` (or ``metrics[section] = value`` when key is None).

    The read-modify-write holds an exclusive lock on ``<path>.lock``: stages that run in
    parallel processes (:mod:`sskd.stages.parallel`) update the same file.
    """
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_metrics(path)
        if key is None:
            data[section] = value
        else:
            data.setdefault(section, {})[key] = value
        write_json_atomic(data, path, indent=2, sort_keys=True)
    return data


def remove_metrics(path: str | Path,
                   entries: Mapping[str, list[str] | tuple[str, ...] | None]) -> dict:
    """Delete ``metrics[section][key]`` for every key listed under its section, or the whole
    section when its list is None (missing ones are ignored): what produced them was
    invalidated. Same lock as :func:`update_metrics`."""
    import fcntl
    path = Path(path)
    if not path.is_file():
        return read_metrics(path)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_metrics(path)
        whole = [s for s, keys in entries.items() if keys is None and s in data]
        gone = [(s, k) for s, keys in entries.items() if keys is not None for k in keys
                if isinstance(data.get(s), dict) and k in data[s]]
        for section in whole:
            del data[section]
        for section, key in gone:
            del data[section][key]
        if gone or whole:
            write_json_atomic(data, path, indent=2, sort_keys=True)
    return data


def drop_stale_results(run_dir: Any, old: Mapping[str, Any] | None,
                       new: Mapping[str, Any]) -> dict[str, list[str] | None]:
    """Remove the results a config change makes stale, so ``metrics.json`` and ``report/`` only
    ever hold what the run's ``config.yaml`` describes.

    ``run_dir``: a :class:`sskd.rundir.RunDir`; ``old``/``new``: the config before and after
    (nested dicts, ``to_dict(cfg)``). :func:`sskd.graph.stale_results` decides, per model, what
    the change touched; those models' AP, pseudo-label scores and stage records go, and with any
    of them (or a report setting) the ablations, the efficiency table and ``report/``.
    Weights and predictions stay: each stage's own fingerprint decides whether it retrains, so
    re-running a stage whose inputs did not really change only re-evaluates it. Returns what
    was removed, ``{section: [keys] or None for all of it}``; logs it.
    """
    from sskd.graph import stale_results
    if old is None:
        return {}
    stale = stale_results(old, new)
    if not stale:
        return {}
    before = read_metrics(run_dir.metrics)
    entries = {"models": stale.models, "pseudo_labels": stale.models, "stages": stale.stages,
               "ablations": tuple(before["ablations"]) if stale.report else ()}
    gone: dict[str, list[str] | None] = {
        s: [k for k in keys if k in before.get(s, {})] for s, keys in entries.items()}
    gone = {s: keys for s, keys in gone.items() if keys}
    if stale.report and before.get("efficiency"):
        gone["efficiency"] = None
    remove_metrics(run_dir.metrics, gone)
    if stale.report and run_dir.report.is_dir():
        shutil.rmtree(run_dir.report)
        gone["report"] = [str(run_dir.report)]
    if gone:
        logging.getLogger("sskd").warning(
            "%s: the config changed; removed the results it no longer describes: %s (trained "
            "weights stay and are reused where their inputs are unchanged)", run_dir.root,
            "; ".join(s if k is None else f"{s}: {', '.join(k)}" for s, k in gone.items()))
    return gone
