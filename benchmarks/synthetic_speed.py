"""Speed of the synthetic benchmark generator (images/s), and an optional sample grid.

    .venv/bin/python benchmarks/synthetic_speed.py [--n 200] [--sizes 64 128] [--grid /tmp/grid.png]

Prints one row per (domain, image size): render-only rate (``render_image`` in memory) and the
full rate (``generate_domain``: render + PNG + RLE + json). The grid shows source images (top
rows) and target images (bottom rows), each above its instance masks coloured by class.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from sskd.config import SyntheticConfig
from sskd.data.synthetic import generate_domain, render_image

CLASS_COLORS = np.array([(230, 60, 60), (60, 200, 60), (60, 100, 240), (240, 200, 40),
                         (200, 60, 220), (40, 200, 210)], dtype=np.uint8)


def rate_render(domain, size: int, classes, n: int) -> float:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(n):
        render_image(domain, size, classes, rng)
    return n / (time.perf_counter() - t)


def rate_generate(domain, size: int, classes, n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        generate_domain(domain, n, size, classes, 0, d)
        return n / (time.perf_counter() - t)


def class_map(size: int, instances) -> np.ndarray:
    """``H x W x 3`` uint8: black background, each visible mask in its class colour, white edges."""
    out = np.zeros((size, size, 3), dtype=np.uint8)
    for class_id, m in instances:
        out[m] = CLASS_COLORS[class_id % len(CLASS_COLORS)]
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 255
    return out


def save_grid(path: str, cfg: SyntheticConfig, size: int, cols: int = 8) -> None:
    rows = []
    for salt, dom in ((0, cfg.source), (1, cfg.target)):
        for r in range(2):
            imgs, maps = [], []
            for c in range(cols):
                img, inst = render_image(dom, size, cfg.classes,
                                         np.random.default_rng([cfg.seed, salt, r * cols + c]))
                imgs.append(img)
                maps.append(class_map(size, inst))
            pad = np.full((size, 2, 3), 255, np.uint8)
            rows.append(np.concatenate(sum(([i, pad] for i in imgs), []), 1))
            rows.append(np.concatenate(sum(([m, pad] for m in maps), []), 1))
            rows.append(np.full((2, rows[-1].shape[1], 3), 255, np.uint8))
    Image.fromarray(np.concatenate(rows, 0)).save(path)
    print(f"sample grid written to {path} (source: rows 1-4, target: rows 5-8; "
          f"mask colours: {', '.join(cfg.classes)} = red, green, blue)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images per measurement")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sides in px")
    ap.add_argument("--grid", default="", help="also save a sample grid PNG here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = SyntheticConfig()
    print(f"{'domain':<8} {'size':>5} {'render img/s':>13} {'render+write img/s':>19}")
    for name, dom in (("source", cfg.source), ("target", cfg.target)):
        for size in args.sizes:
            print(f"{name:<8} {size:>5} {rate_render(dom, size, cfg.classes, args.n):>13.0f} "
                  f"{rate_generate(dom, size, cfg.classes, args.n):>19.0f}")
    if args.grid:
        save_grid(args.grid, cfg, max(args.sizes))


if __name__ == "__main__":
    main()
