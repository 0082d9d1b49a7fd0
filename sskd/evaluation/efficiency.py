"""Efficiency of segmenters side by side: params, FLOPs, latency, throughput, memory, train step.

The paper reports teacher -> student as 568M -> 52M params, 880 -> 200 GFLOPs, 350.9 -> 76.9 ms
latency and 5.6 -> 0.8 GB memory. :func:`measure` gives the same quantities for one model:

* ``params_M``: all parameters (frozen and EMA ones included), in millions;
* ``gflops``: forward FLOPs per image at batch 1 counted by ``torch.utils.flop_counter.
  FlopCounterMode`` (matmul, conv, attention; one multiply-add = 2 FLOPs, so fvcore/detectron2
  "GFLOPs", which count multiply-adds, are half of this; elementwise ops and grid sampling are
  not counted);
* ``latency_ms``: median wall time of ``model.predict`` (forward + instance post-processing) on
  one image;
* ``throughput_img_s``: images per second of ``model.predict`` at ``batch_size``;
* ``peak_mem_MB``: peak memory of a batch-1 ``predict`` including the weights. CUDA:
  ``torch.cuda.max_memory_allocated``. CPU: bytes of parameters and buffers + the peak rise of
  the process RSS during the call, sampled every ~1 ms by a psutil thread (``mem_method`` says
  which; CPU values are approximate because the allocator reuses freed memory).

:func:`measure_train_step` adds the training cost (forward + loss + backward + AdamW step).
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from sskd.models.base import Segmenter

COLUMNS = [  # (key, header, format)
    ("params_M", "params (M)", "{:.2f}"),
    ("gflops", "GFLOPs/img", "{:.2f}"),
    ("latency_ms", "latency (ms, bs 1)", "{:.1f}"),
    ("throughput_img_s", "throughput (img/s)", "{:.3g}"),
    ("peak_mem_MB", "peak mem (MB)", "{:.0f}"),
    ("s_per_step", "train s/step", "{:.3f}"),
    ("cpu_s_per_step", "train CPU s/step", "{:.3f}"),  # steadier than wall time on busy CPUs
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images(batch: int, image_size: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, image_size, image_size, generator=g).to(device)


def _median_time(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, iters)):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def count_flops(model: Segmenter, image_size: int, device: torch.device | str = "cpu") -> float:
    """Forward FLOPs for one ``1 x 3 x S x S`` image (see module docstring for what is counted)."""
    device = torch.device(device)
    x = _images(1, image_size, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


class _RssPeak:
    """Context manager: peak rise of this process's RSS (bytes), sampled by a thread."""

    def __init__(self, interval_s: float = 0.001) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval = interval_s
        self.peak_delta = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_delta = max(self.peak_delta, self.proc.memory_info().rss - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> "_RssPeak":
        self.base = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_delta = max(self.peak_delta, self.proc.memory_info().rss - self.base)


def peak_memory_mb(model: Segmenter, image_size: int, device: torch.device | str = "cpu") -> tuple[float, str]:
    """Peak memory (MB) of a batch-1 ``predict`` including weights, and the method used."""
    device = torch.device(device)
    x = _images(1, image_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        model.predict(x)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_memory_allocated"
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with _RssPeak() as rss:
        model.predict(x)
    return (weights + rss.peak_delta) / 2**20, "cpu_weights_plus_rss_peak_delta"


def measure(model: Segmenter, image_size: int, batch_size: int = 8, device: str | torch.device = "cpu",
            warmup: int = 2, iters: int = 10) -> dict:
    """Params, GFLOPs/img, batch-1 latency, throughput at ``batch_size`` and peak memory.

    ``model`` is moved to ``device``; inputs are random ``B x 3 x S x S`` images in [0, 1].
    """
    device = torch.device(device)
    model.to(device)
    model.eval()
    x1, xb = _images(1, image_size, device), _images(batch_size, image_size, device)
    latency = _median_time(lambda: model.predict(x1), device, warmup, iters)
    per_batch = _median_time(lambda: model.predict(xb), device, min(warmup, 1), max(1, iters // 2))
    mem, method = peak_memory_mb(model, image_size, device)
    return {"params_M": model.num_parameters() / 1e6,
            "gflops": count_flops(model, image_size, device) / 1e9,
            "latency_ms": latency * 1e3, "throughput_img_s": batch_size / per_batch,
            "peak_mem_MB": mem, "mem_method": method, "image_size": image_size,
            "batch_size": batch_size, "device": str(device), "threads": torch.get_num_threads()}


def synthetic_targets(batch: int, image_size: int, num_classes: int, per_image: int = 3,
                      seed: int = 0, device: torch.device | str = "cpu") -> list[dict]:
    """``batch`` targets of ``per_image`` random rectangles (``N x S x S`` masks, labels)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        masks = torch.zeros(per_image, image_size, image_size)
        for k in range(per_image):
            y0, x0 = torch.randint(0, image_size // 2, (2,), generator=g).tolist()
            h, w = torch.randint(image_size // 8, image_size // 2, (2,), generator=g).tolist()
            masks[k, y0:y0 + h, x0:x0 + w] = 1
        labels = torch.randint(0, num_classes, (per_image,), generator=g)
        out.append({"masks": masks.to(device), "labels": labels.to(device)})
    return out


def measure_train_step(model: Segmenter, image_size: int, batch_size: int = 8,
                       device: str | torch.device = "cpu", warmup: int = 2, iters: int = 5,
                       lr: float = 1e-4) -> dict:
    """Seconds per training step (forward + loss + backward + AdamW step) on a copy of ``model``.

    Returns ``s_per_step`` (median wall time) and ``cpu_s_per_step`` (process CPU time per step,
    all threads; on a busy machine it is a steadier number than wall time).
    """
    device = torch.device(device)
    model = copy.deepcopy(model).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    x = _images(batch_size, image_size, device)
    targets = synthetic_targets(batch_size, image_size, model.num_classes, device=device)

    def step() -> None:
        loss = model.compute_losses(model(x), targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.after_optimizer_step()

    for _ in range(warmup):
        step()
    cpu0 = time.process_time()
    wall = _median_time(step, device, 0, iters)
    cpu = (time.process_time() - cpu0) / max(1, iters)
    return {"s_per_step": wall, "cpu_s_per_step": cpu, "train_batch_size": batch_size}


def compare(models: dict[str, Segmenter], image_size: int, batch_size: int = 8,
            device: str | torch.device = "cpu", warmup: int = 2, iters: int = 10,
            train_step: bool = False, train_batch_size: int = 8,
            ratios: list[tuple[str, str]] | None = None) -> list[dict]:
    """One row per model (``name`` + :func:`measure` fields) plus ratio rows.

    ``ratios``: ``(numerator, denominator)`` name pairs; default: every model whose name lacks
    "student" over the first model whose name contains "student" (teacher / student).
    """
    rows = []
    for name, model in models.items():
        row = {"name": name, **measure(model, image_size, batch_size, device, warmup, iters)}
        if train_step:
            row.update(measure_train_step(model, image_size, train_batch_size, device))
        rows.append(row)
    if ratios is None:
        students = [n for n in models if "student" in n]
        ratios = [(n, students[0]) for n in models if students and "student" not in n]
    by_name = {r["name"]: r for r in rows}
    for num, den in ratios:
        if num not in by_name or den not in by_name:
            raise KeyError(f"ratio {num}/{den}: both must be among {list(by_name)}")
        ratio = {"name": f"{num} / {den}", "is_ratio": True}
        for key, _, _ in COLUMNS:
            a, b = by_name[num].get(key), by_name[den].get(key)
            if a is not None and b:
                ratio[key] = a / b
        rows.append(ratio)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`compare` rows (ratio rows as ``x12.3``)."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| model | " + " | ".join(h for _, h, _ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("" if v is None else (f"x{v:.2f}" if r.get("is_ratio") else fmt.format(v)))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
