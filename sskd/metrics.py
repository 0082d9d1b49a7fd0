"""``metrics.json`` of a run: every stage adds its results here, read-modify-write, atomically.

Layout::

    {"models":     {tag: {"AP", "AP50", "AP75", "per_class": {name: AP}, "params", "num_images"}},
     "stages":     {stage: {"seconds": float, "done": true}},
     "ablations":  {name: {"models": {tag: {...}}, "overrides": {...}}},
     "efficiency": rows of :func:`sskd.evaluation.efficiency.compare` ("name", "params_M",
                   "gflops", "latency_ms", "throughput_img_s", "peak_mem_MB", ratio row last)}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def remove_metrics(path: str | Path, entries: dict[str, list[str] | tuple[str, ...]]) -> dict:
    """Delete ``metrics[section][key]`` for every key listed under its section (missing ones are
    ignored): what produced them was invalidated. Same lock as :func:`update_metrics`."""
    import fcntl
    path = Path(path)
    if not path.is_file():
        return read_metrics(path)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_metrics(path)
        gone = [(s, k) for s, keys in entries.items() for k in keys
                if isinstance(data.get(s), dict) and k in data[s]]
        for section, key in gone:
            del data[section][key]
        if gone:
            write_json_atomic(data, path, indent=2, sort_keys=True)
    return data
