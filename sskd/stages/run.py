"""A run: its directory, its resolved config, and the datasets its split files name."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from sskd.config import Config, load_config, read_config, save_config
from sskd.locking import run_dir_lock
from sskd.rundir import RunDir

log = logging.getLogger("sskd")


@dataclass
class Run:
    dir: RunDir
    cfg: Config

    @property
    def device(self) -> torch.device:
        if self.cfg.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.cfg.device)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.cache_dir).expanduser() if self.cfg.cache_dir else \
            Path.home() / ".cache" / "sskd"


def open_run(run_name: str, preset: str = "demo", runs_root: str | Path = "runs",
             overrides: Mapping[str, Any] | list[str] | None = None) -> Run:
    """Create the run dir and its ``config.yaml`` when new; else load it (and apply overrides).

    ``overrides`` are dotted config keys (``{"stages.refine.enabled": False}``). On an existing
    run they are applied and saved, so the run dir always holds the config that produced it;
    results the change makes stale (the AP of every model derived from a changed setting, the
    report) are removed first
    (:func:`sskd.metrics.drop_stale_results`), while trained weights stay for reuse.
    """
    rd = RunDir(Path(runs_root) / run_name)
    if rd.config.is_file():
        cfg = read_config(rd.config)
        if overrides:
            from sskd.config import from_dict, merge_dicts, parse_overrides, to_dict, validate
            from sskd.metrics import drop_stale_results
            old = to_dict(cfg)
            cfg = from_dict(merge_dicts(old, parse_overrides(overrides)))
            validate(cfg)
            drop_stale_results(rd, old, to_dict(cfg))
            save_config(cfg, rd.config)
    else:
        cfg = load_config(preset, overrides, run_name=run_name, runs_root=str(runs_root))
        save_config(cfg, rd.config)
    return Run(rd, cfg)


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_threads() -> None:
    """Use every core for intra-op parallelism (torch defaults may pick fewer in notebooks)."""
    torch.set_num_threads(max(1, cpu_cores()))


def locked(stage: Callable) -> Callable:
    """Decorate a stage function ``f(run, ...)``: it holds the run dir's lock while it runs, so
    calling it from a notebook while ``sskd run`` works on the same run dir fails at once,
    naming the runner's PID. Under ``sskd run`` (and in side processes) the lock is inherited."""
    @functools.wraps(stage)
    def wrapper(run: Run | str | Path, *args: Any, **kwargs: Any) -> Any:
        run = as_run(run)
        with run_dir_lock(run.dir.root, f"sskd.stages.{stage.__name__}"):
            return stage(run, *args, **kwargs)
    return wrapper


def as_run(run: Run | str | Path) -> Run:
    if isinstance(run, Run):
        return run
    rd = RunDir(run)
    return Run(rd, read_config(rd.config))
