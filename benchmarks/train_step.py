"""Cost of L_pxl in a training step: step time and peak memory with and without it.

Each configuration runs the real engine (``sskd.engine.trainer.train``) in its own process, on
synthetic target-domain images, so peak RSS (CPU) or ``max_memory_allocated`` (CUDA) belongs
to that configuration alone. The first ``--warmup`` steps are excluded from the time.

    python benchmarks/train_step.py                       # demo sizes at 64 px, CPU
    python benchmarks/train_step.py --sizes paper --image-size 224 --steps 6
    python benchmarks/train_step.py --json out.json
Target (issue 4): L_pxl adds <= 15% to a step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"demo": ["student_demo", "teacher_demo"], "paper": ["student_paper"]}


def one(size: str, l_pxl: float, image_size: int, steps: int, warmup: int, batch: int,
        threads: int, device: str, anchors: int, negatives: int) -> dict:
    import resource

    import torch

    from sskd.config import PixelContrastConfig, SyntheticDomainConfig, TrainConfig
    from sskd.data.coco import read_coco
    from sskd.data.synthetic import generate_domain
    from sskd.engine.trainer import Objective, TrainPaths, train
    from sskd.models import build_model

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        js = generate_domain(SyntheticDomainConfig(), 16, image_size,
                             ["circle", "rectangle", "triangle"], 0, Path(tmp) / "data")
        ds = read_coco(js, Path(js).parent)
        model = build_model("mask2former", 3, size=size)
        times: list[float] = []
        last = [time.perf_counter()]

        def on_log(entry: dict) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        obj = Objective(l_pxl=l_pxl, pixel_contrast=PixelContrastConfig(
            num_anchors=anchors, num_negatives=negatives))
        cfg = TrainConfig(steps=steps, batch_size=batch, log_every=1, checkpoint_every=10**9)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train(model, ds, TrainPaths.in_dir(tmp, "bench"), cfg, obj, input_size=image_size,
              device=device, progress=False, on_log=on_log)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    step = sorted(times[warmup:])[len(times[warmup:]) // 2]
    return {"size": size, "l_pxl": l_pxl, "s_per_step": step, "peak_MB": peak,
            "params_M": model.num_parameters() / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="demo", choices=sorted(SIZES))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--anchors", type=int, default=64, help="anchors per image (demo preset: 64)")
    ap.add_argument("--negatives", type=int, default=64, help="R negatives per anchor (demo: 64)")
    ap.add_argument("--json", default="")
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "L_PXL"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    common = (a.image_size, a.steps, a.warmup, a.batch, a.threads, a.device, a.anchors, a.negatives)
    if a.one:
        print(json.dumps(one(a.one[0], float(a.one[1]), *common)))
        return
    rows = []
    for size in SIZES[a.sizes]:
        for l_pxl in (0.0, 0.1):
            cmd = [sys.executable, __file__, "--one", size, str(l_pxl)] + [
                f"--{k}={v}" for k, v in (("image-size", a.image_size), ("steps", a.steps),
                                          ("warmup", a.warmup), ("batch", a.batch),
                                          ("threads", a.threads), ("device", a.device),
                                          ("anchors", a.anchors), ("negatives", a.negatives))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\ntraining step, batch {a.batch}, {a.image_size} px, {a.threads} threads, {a.device}, "
          f"L_pxl with {a.anchors} anchors/image and R={a.negatives}\n")
    print("| model | params M | L_pxl | s/step | peak MB | step overhead of L_pxl |")
    print("|---|---|---|---|---|---|")
    for base, with_pxl in zip(rows[::2], rows[1::2]):
        over = with_pxl["s_per_step"] / base["s_per_step"] - 1
        for r, o in ((base, ""), (with_pxl, f"{100 * over:+.1f}%")):
            print(f"| {r['size']} | {r['params_M']:.2f} | {'on' if r['l_pxl'] else 'off'} | "
                  f"{r['s_per_step']:.3f} | {r['peak_MB']:.0f} | {o} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
