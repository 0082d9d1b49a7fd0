"""Peak RSS of streaming pseudo-labelling, 100 vs 1000 images (constant memory in #images).

Each count runs in its own process: ``sskd.engine.inference.predict_to_jsonl`` with the demo
teacher over synthetic target-domain images, score threshold 0 (every query kept, so the
records are as large as they get). Target (issue 4): RSS growth from 100 to 1000 < 10%.

    python benchmarks/pseudo_label_memory.py [--counts 100 1000] [--size teacher_demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(n: int, size: str, image_size: int) -> dict:
    import resource

    import torch

    from sskd.config import PseudoLabelConfig, SyntheticConfig
    from sskd.data.coco import read_coco
    from sskd.data.synthetic import generate_domain
    from sskd.engine.inference import predict_to_jsonl
    from sskd.models import build_model

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        js = generate_domain(SyntheticConfig().target, n, image_size,
                             ["circle", "rectangle", "triangle"], 0, Path(tmp) / "data")
        ds = read_coco(js, Path(js).parent)
        torch.manual_seed(0)
        model = build_model("mask2former", 3, size=size)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        out = predict_to_jsonl(model, ds, Path(tmp) / "pl.jsonl",
                               PseudoLabelConfig(score_threshold=0.0, max_instances=20),
                               input_size=image_size, batch_size=16)
        secs = time.perf_counter() - t0
        lines = sum(1 for _ in open(out))
        file_mb = out.stat().st_size / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images": n, "lines": lines, "rss_before_MB": base, "peak_rss_MB": peak,
            "file_MB": file_mb, "img_per_s": n / secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--size", default="teacher_demo")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.size, a.image_size)))
        return
    rows = []
    for n in a.counts:
        cmd = [sys.executable, __file__, "--one", str(n), "--size", a.size,
               "--image-size", str(a.image_size)]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True)
                               .stdout.strip().splitlines()[-1]))
    print(f"\nstreaming pseudo-labelling, {a.size}, {a.image_size} px\n")
    print("| images | lines written | jsonl MB | RSS before MB | peak RSS MB | img/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['lines']} | {r['file_MB']:.1f} | {r['rss_before_MB']:.0f} | "
              f"{r['peak_rss_MB']:.0f} | {r['img_per_s']:.0f} |")
    growth = rows[-1]["peak_rss_MB"] / rows[0]["peak_rss_MB"] - 1
    print(f"\npeak RSS growth {rows[0]['images']} -> {rows[-1]['images']} images: {100 * growth:+.1f}% "
          f"(target < 10%)")


if __name__ == "__main__":
    main()
