"""The training engine: one objective J = L_sup + l_semi L_semi + l_pxl L_pxl (docs/method.md), switched per stage.

The objective is :mod:`sskd.engine.objective`; the batches come from :mod:`sskd.engine.loader`
(a ``torch.utils.data`` dataset, optionally built by worker processes).

AdamW with a backbone LR multiplier, poly schedule with optional warm-up, gradient clipping, AMP
(bf16 autocast) on CUDA, batches mixing labeled and pseudo-labeled images in a set ratio,
periodic checkpoints with resume, tqdm progress, per-step metric logs, torchrun multi-process.

Determinism: every random choice of step ``t`` (which images, their augmentations, the loss's
point sampling, the contrastive sampler) is drawn from generators seeded by ``(seed, t)``, so a
run resumed from a checkpoint at step ``t`` continues exactly as an uninterrupted one would, and
a run on 2 ranks sees the same images and views as on 1 rank (each rank takes a slice).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from sskd.config import TrainConfig
from sskd.data.records import Dataset
from sskd.engine import distributed as dist_utils
from sskd.engine.data import InputGeometry, SampleCache, hard_pseudo_labels
from sskd.engine.loader import StepBatches, batch_loader
from sskd.engine.objective import Objective, step_seed  # noqa: F401  (re-exported)
from sskd.models.base import Segmenter


@dataclass
class TrainPaths:
    """Where a training run keeps its state (all written atomically)."""

    state: Path        # resumable checkpoint (model + optimizer + step)
    log: Path          # JSON lines of per-step metrics
    model_dir: Path    # final weights (Segmenter.save); its presence marks the run complete

    @classmethod
    def in_dir(cls, directory: str | Path, stage: str) -> "TrainPaths":
        d = Path(directory)
        return cls(d / "checkpoints" / stage / "state.pt", d / "logs" / f"{stage}.jsonl",
                   d / "checkpoints" / stage / "model")


def poly_factor(step: int, total: int, power: float, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - step / max(1, total)) ** power


def train(model: Segmenter, labeled: Dataset, paths: TrainPaths, cfg: TrainConfig,
          objective: Objective, *, unlabeled: Dataset | None = None, input_size: int = 64,
          device: str | torch.device = "cpu", augment: bool = True, progress: bool = True,
          desc: str = "train", on_log: Callable[[dict], None] | None = None,
          cache: SampleCache | None = None, geometry: InputGeometry | None = None,
          num_workers: int = 0, cache_mb: float = 2048.0) -> dict:
    """Train ``model`` in place for ``cfg.steps`` steps and save it to ``paths.model_dir``.

    ``labeled``: records with ground truth (L_sup). ``unlabeled``: records whose instances are
    the teacher's soft pseudo-labels (scores); they are made hard with ``objective.pseudo_label``
    and used for L_semi (and L_pxl). Resumes from ``paths.state`` when it exists. Returns a
    summary dict (steps, seconds, final losses).

    ``geometry``: how images are sized (default: square ``input_size``); ``num_workers``: loader
    processes building the batches (0: this process; the batches are the same either way);
    ``cache_mb``: the loader's decoded-image cache bound; ``cache``: a cache to use in this
    process (``num_workers=0`` only).
    """
    device = torch.device(device)
    dist_utils.init_from_env(device)
    rank, world_size = dist_utils.world()
    model.to(device).train()
    geometry = geometry or InputGeometry(int(input_size))
    hard_u = [hard_pseudo_labels(r, objective.pseudo_label) for r in unlabeled.records] \
        if unlabeled is not None and len(unlabeled) else []
    if not labeled.records and not hard_u:
        raise ValueError(f"{desc}: nothing to train on (no labeled and no pseudo-labeled images)")
    n_unl = int(round(cfg.batch_size * cfg.unlabeled_ratio)) if hard_u else 0
    if not labeled.records:
        n_unl = cfg.batch_size
    n_lab = cfg.batch_size - n_unl

    groups = model.param_groups(cfg.lr, cfg.backbone_lr_mult)
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]

    ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    start = 0
    if paths.state.is_file():
        start = _load_state(paths.state, model, optimizer, device, ema)
    if rank == 0:
        _truncate_log(paths.log, start)

    amp = cfg.amp and device.type == "cuda"
    t0 = time.perf_counter()
    last: dict = {}
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress or rank != 0,
               leave=False, dynamic_ncols=True)
    data = StepBatches(labeled.records, hard_u, n_lab, n_unl, cfg.seed, cfg.steps, geometry,
                       augment=augment, rank=rank, world_size=world_size, cache_mb=cache_mb,
                       cache=cache if not num_workers else None)
    batches = iter(batch_loader(data, start, num_workers))
    for step in range(start, cfg.steps):
        factor = poly_factor(step, cfg.steps, cfg.poly_power, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        batch = next(batches)
        torch.manual_seed(step_seed(cfg.seed, step, 10_000 + rank))  # loss point sampling
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            total, logs = objective(model, batch.to(device), step=step, total_steps=cfg.steps,
                                    seed=cfg.seed, rank=rank)
        optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(total):
            raise FloatingPointError(f"{desc}: non-finite loss at step {step}: {logs}; lower "
                                     "train.lr or check the pseudo-labels")
        total.backward()
        dist_utils.average_gradients(params)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        model.after_optimizer_step()
        if ema is not None:
            ema.update(model, step)
        logs["loss"] = float(total.detach())
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            logs = dist_utils.average_scalars(logs)
            last = {"step": done, "lr": optimizer.param_groups[0]["lr"], **logs,
                    "seconds": round(time.perf_counter() - t0, 3)}
            bar.set_postfix(loss=f"{logs['loss']:.3f}")
            if rank == 0:
                _append_log(paths.log, last)
                if on_log:
                    on_log(last)
        if rank == 0 and (done % cfg.checkpoint_every == 0) and done < cfg.steps:
            _save_state(paths.state, model, optimizer, done, ema)
    bar.close()
    dist_utils.barrier()
    if ema is not None:
        ema.copy_to(model)
    if rank == 0:
        save_model_atomic(model, paths.model_dir)
        if paths.state.exists():
            paths.state.unlink()
    dist_utils.barrier()
    return {"steps": cfg.steps, "resumed_from": start, "seconds": time.perf_counter() - t0, **last}


class WeightAverage:
    """Exponential moving average of a model's weights (Polyak averaging, ``train.ema_decay``).

    ``avg <- d * avg + (1 - d) * w`` after every optimizer step, with ``d = min(decay,
    (1 + t) / (10 + t))`` so the first steps' random weights fade fast. Floating-point buffers
    are averaged like parameters; integer buffers (counters) are copied. Why: with noisy
    pseudo-labels the last step's weights carry the last batches' noise; their average is a
    flatter, steadier solution (Mean Teacher, Tarvainen & Valpola 2017).
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay = {decay}: must be in (0, 1) to average (0 = off)")
        self.decay = decay
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            avg = self.state[k]
            if avg.is_floating_point():
                avg.mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                avg.copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.state)


def _save_state(path: Path, model: Segmenter, optimizer, step: int,
                ema: WeightAverage | None = None) -> None:
    """Model, optimizer, step (and the weight average): tensors and plain values only, so it
    loads with ``weights_only=True`` (every random draw is seeded by (seed, step): no RNG state
    needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
    if ema is not None:
        state["ema"] = ema.state
    torch.save(state, tmp)
    tmp.replace(path)


def _load_state(path: Path, model: Segmenter, optimizer, device: torch.device,
                ema: WeightAverage | None = None) -> int:
    """Restore a :func:`_save_state` checkpoint (tensors only); returns its step."""
    from sskd.safe_load import CorruptFileError, load_torch
    fix = (f"delete {path} to restart this training from step 0 (the checkpoint only saves "
           "time; the results do not depend on it)")
    state = load_torch(path, fix, map_location=device, keys=("model", "optimizer", "step"))
    if ema is not None and "ema" not in state:
        raise CorruptFileError(path, "it holds no weight average, but train.ema_decay is set "
                                     "(it was written with ema_decay 0)", fix)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.state = {k: v.to(device) for k, v in state["ema"].items()}
            if ema.state.keys() != model.state_dict().keys():
                raise KeyError("the weight average's keys differ from the model's")
        return int(state["step"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(path, f"it does not fit this model/optimizer: "
                                     f"{str(e).splitlines()[0]}", fix) from e


def save_model_atomic(model: Segmenter, directory: Path) -> Path:
    """Save into a sibling temp dir, then rename: a crash never leaves a half-written model."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        model.save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(directory)
    tmp.replace(directory)
    return directory


def _append_log(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a resumed run restarts from)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("step", math.inf) <= step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
