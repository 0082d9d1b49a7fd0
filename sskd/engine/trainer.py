"""The training engine: one objective J = L_sup + l_semi L_semi + l_pxl L_pxl (docs/method.md), switched per stage.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sskd.config import PixelContrastConfig, PseudoLabelConfig, TrainConfig
from sskd.data.records import Dataset
from sskd.engine import distributed as dist_utils
from sskd.engine.data import SampleCache, hard_pseudo_labels, instance_id_map
from sskd.models.base import Segmenter, SegmenterOutput


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


@dataclass
class Objective:
    """Loss weights of J for one stage (L_sup always has weight 1 when labels are given)."""

    l_semi: float = 0.0
    l_pxl: float = 0.0
    pixel_contrast: PixelContrastConfig = field(default_factory=PixelContrastConfig)
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)


def step_seed(seed: int, step: int, slot: int = 0) -> int:
    """Independent, reproducible 63-bit seed for (run seed, step, slot)."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(2, np.uint64)[0] >> 1)


def poly_factor(step: int, total: int, power: float, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, 1.0 - step / max(1, total)) ** power


def _views(sample, generator: torch.Generator, size: int, augment: bool):
    """Weak and strong views sharing one geometry (pixel p of one is pixel p of the other)."""
    from sskd.data.views import make_views
    if not augment:
        valid = torch.ones(sample.image.shape[-2:], dtype=torch.bool)
        return sample.image, sample.image, sample.masks, sample.labels, valid
    v = make_views(sample.image, sample.masks, generator, out_size=size)
    return v.weak, v.strong, v.masks, sample.labels[v.keep], v.valid


def train(model: Segmenter, labeled: Dataset, paths: TrainPaths, cfg: TrainConfig,
          objective: Objective, *, unlabeled: Dataset | None = None, input_size: int = 64,
          device: str | torch.device = "cpu", augment: bool = True, progress: bool = True,
          desc: str = "train", on_log: Callable[[dict], None] | None = None,
          cache: SampleCache | None = None) -> dict:
    """Train ``model`` in place for ``cfg.steps`` steps and save it to ``paths.model_dir``.

    ``labeled``: records with ground truth (L_sup). ``unlabeled``: records whose instances are
    the teacher's soft pseudo-labels (scores); they are made hard with ``objective.pseudo_label``
    and used for L_semi (and L_pxl). Resumes from ``paths.state`` when it exists. Returns a
    summary dict (steps, seconds, final losses).
    """
    device = torch.device(device)
    dist_utils.init_from_env(device)
    rank, world_size = dist_utils.world()
    model.to(device).train()
    cache = cache or SampleCache(input_size)
    hard_u = [hard_pseudo_labels(r, objective.pseudo_label) for r in unlabeled.records] \
        if unlabeled is not None and len(unlabeled) else []
    if not labeled.records and not hard_u:
        raise ValueError(f"{desc}: nothing to train on (no labeled and no pseudo-labeled images)")
    use_pxl = objective.l_pxl > 0
    n_unl = int(round(cfg.batch_size * cfg.unlabeled_ratio)) if hard_u else 0
    if not labeled.records:
        n_unl = cfg.batch_size
    n_lab = cfg.batch_size - n_unl

    groups = model.param_groups(cfg.lr, cfg.backbone_lr_mult)
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]

    start = 0
    if paths.state.is_file():
        start = _load_state(paths.state, model, optimizer, device)
    if rank == 0:
        _truncate_log(paths.log, start)

    amp = cfg.amp and device.type == "cuda"
    t0 = time.perf_counter()
    last: dict = {}
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, disable=not progress or rank != 0,
               leave=False, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        factor = poly_factor(step, cfg.steps, cfg.poly_power, cfg.warmup_steps)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        # Which images this step uses: the same on every rank, each rank takes its slice.
        pick = torch.Generator().manual_seed(step_seed(cfg.seed, step, 0))
        lab_idx = torch.randint(len(labeled.records), (n_lab,), generator=pick).tolist() if n_lab else []
        unl_idx = torch.randint(len(hard_u), (n_unl,), generator=pick).tolist() if n_unl else []
        slots = [("l", i) for i in lab_idx] + [("u", i) for i in unl_idx]
        mine = list(range(rank, len(slots), world_size))
        weak, strong, valid, targets, kinds = [], [], [], [], []
        for slot in mine:
            kind, idx = slots[slot]
            rec = labeled.records[idx] if kind == "l" else hard_u[idx]
            sample = cache.sample(rec, tag=0 if kind == "l" else 1)
            g = torch.Generator().manual_seed(step_seed(cfg.seed, step, 1 + slot))
            w, s, m, lab, ok = _views(sample, g, input_size, augment)
            weak.append(w), strong.append(s), valid.append(ok), kinds.append(kind)
            targets.append({"masks": m.float().to(device), "labels": lab.to(device)})
        torch.manual_seed(step_seed(cfg.seed, step, 10_000 + rank))  # loss point sampling
        weak_t = torch.stack(weak).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(weak_t, embeddings="weak" if use_pxl else "none")
            n_l = kinds.count("l")
            logs: dict[str, float] = {}
            total = weak_t.new_zeros(())
            if n_l:
                sup = model.compute_losses(out.select(slice(0, n_l)), targets[:n_l])
                total = total + sup["loss"]
                logs["loss_sup"] = float(sup["loss"].detach())
            if n_l < len(kinds) and objective.l_semi > 0:
                semi = model.compute_losses(out.select(slice(n_l, None)), targets[n_l:])
                total = total + objective.l_semi * semi["loss"]
                logs["loss_semi"] = float(semi["loss"].detach())
            if use_pxl:
                loss_pxl, diag = _pixel_loss(model, out, torch.stack(strong).to(device), targets,
                                             torch.stack(valid), objective.pixel_contrast, step,
                                             cfg, rank)
                total = total + objective.l_pxl * loss_pxl
                logs.update({"loss_pxl": float(loss_pxl.detach()), **diag})
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
            _save_state(paths.state, model, optimizer, done)
    bar.close()
    dist_utils.barrier()
    if rank == 0:
        save_model_atomic(model, paths.model_dir)
        if paths.state.exists():
            paths.state.unlink()
    dist_utils.barrier()
    return {"steps": cfg.steps, "resumed_from": start, "seconds": time.perf_counter() - t0, **last}


def _pixel_loss(model: Segmenter, out: SegmenterOutput, strong: torch.Tensor, targets: list[dict],
                valid: torch.Tensor, pc: PixelContrastConfig, step: int, cfg: TrainConfig,
                rank: int):
    """L_pxl of the batch: weak embeddings vs stop-gradient strong ones, negatives by ``pc.sampler``.

    FNR is measured against the instances of the batch's targets (labels or hard pseudo-labels).
    """
    from sskd.losses.pixel_contrastive import (fused_pseudo_probabilities, pixel_contrastive_loss,
                                               temperature_at)
    with torch.no_grad():
        z_strong = model.pixel_embeddings(strong, "strong")
    z_weak = out.embed_weak
    y = None
    if pc.sampler != "uniform":
        pm, pcls = model.pixel_probabilities(out)
        y = fused_pseudo_probabilities(pm, pcls, mode=pc.sampler)
    ids = instance_id_map([t["masks"].cpu() for t in targets], tuple(z_weak.shape[-2:])).to(z_weak.device)
    temp = pc.temperature if pc.temperature_start <= 0 else \
        temperature_at(step, cfg.steps, pc.temperature_start, pc.temperature)
    g = torch.Generator(device=z_weak.device).manual_seed(step_seed(cfg.seed, step, 20_000 + rank))
    loss, diag = pixel_contrastive_loss(
        z_weak.float(), z_strong.float(), None if y is None else y.float(),
        num_anchors=pc.num_anchors, num_negatives=pc.num_negatives, temperature=temp,
        sampler=pc.sampler, generator=g, instance_ids=ids, valid=valid.to(z_weak.device),
        candidates=pc.candidates)
    keep = {k: float(v) for k, v in diag.items() if k in ("margin", "fnr") and v is not None}
    keep["temperature"] = float(temp)
    return loss, keep


def _save_state(path: Path, model: Segmenter, optimizer, step: int) -> None:
    """Model, optimizer and step: tensors and plain values only, so it loads with
    ``weights_only=True`` (every random draw is seeded by (seed, step): no RNG state needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    tmp.replace(path)


def _load_state(path: Path, model: Segmenter, optimizer, device: torch.device) -> int:
    """Restore a :func:`_save_state` checkpoint (tensors only); returns its step."""
    from sskd.safe_load import CorruptFileError, load_torch
    fix = (f"delete {path} to restart this training from step 0 (the checkpoint only saves "
           "time; the results do not depend on it)")
    state = load_torch(path, fix, map_location=device, keys=("model", "optimizer", "step"))
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
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
