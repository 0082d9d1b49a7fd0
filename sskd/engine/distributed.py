"""torch.distributed helpers: torchrun-launched multi-process training (gloo on CPU, nccl on GPU).

Gradients are averaged by an explicit all-reduce after backward instead of wrapping the model in
DistributedDataParallel: stages switch loss terms on and off (a projection head is unused when
``l_pxl = 0``), which DDP only tolerates with ``find_unused_parameters``; the explicit reduce
handles unused parameters (zero gradient) at the same cost for the small models trained here.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Initialise the default process group when launched by torchrun (``WORLD_SIZE`` > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    rank, size = world()
    if size == 1:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def average_scalars(values: dict[str, float]) -> dict[str, float]:
    rank, size = world()
    if size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / size for k, v in zip(keys, t.tolist())}


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
