"""Images per second of the training input pipeline (sskd.engine.loader), per geometry and workers.

Synthetic images are written once (PNG), then the loader builds `--steps` batches of
`--batch` images (decode, resize, weak + strong views, targets) with 0 and 2 worker processes:
at 518 x 518 (square, the paper presets' student side) and at 1024 x 2048 (Cityscapes frames,
short side kept at 1024, 512 x 1024 crops). The first batches include decoding (cold cache);
`--warm` runs the steps twice and times the second pass.

    nice -n 15 python benchmarks/loader_throughput.py --steps 6 --batch 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sskd.data.records import ImageRecord, Instance
from sskd.engine.data import InputGeometry
from sskd.engine.loader import StepBatches, batch_loader


def _records(root: Path, n: int, h: int, w: int) -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        path = root / f"{h}x{w}_{i}.png"
        Image.fromarray(img).save(path, compress_level=1)
        insts = []
        for k in range(8):
            m = np.zeros((h, w), np.uint8)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            m[y:y + h // 4, x:x + w // 4] = 1
            insts.append(Instance.from_mask(m, k % 3))
        out.append(ImageRecord(str(path), h, w, i, insts))
    return out


def measure(records, geometry, workers: int, steps: int, batch: int, warm: bool) -> float:
    data = StepBatches(records, [], batch, 0, seed=0, steps=steps, geometry=geometry)
    if warm and workers == 0:
        for _ in batch_loader(data, 0, 0):
            pass
    t0 = time.perf_counter()
    n = sum(len(b.kinds) for b in batch_loader(data, 0, workers))
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--warm", action="store_true", help="time a second pass (cache warm, 0 workers)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cases = [("518 x 518 square", (518, 518), InputGeometry(518)),
             ("1024 x 2048, 512 x 1024 crops", (1024, 2048),
              InputGeometry(518, test_short_side=1024, train_crop=(512, 1024),
                            scale_range=(0.5, 2.0)))]
    print("| input | workers | images/s |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (h, w), geo in cases:
            recs = _records(Path(tmp), args.images, h, w)
            for workers in (0, 2):
                ips = measure(recs, geo, workers, args.steps, args.batch, args.warm)
                print(f"| {name} | {workers} | {ips:.1f} |", flush=True)


if __name__ == "__main__":
    main()
