"""Teacher vs student efficiency table (the paper's 568M -> 52M / 350.9 -> 76.9 ms comparison).

    .venv/bin/python benchmarks/efficiency.py [--sizes demo|paper] [--image-size N] [--json out.json]
        [--batch-size B] [--threads T] [--device auto|cpu|cuda] [--train-step] [--no-grounded-sam]
        [--preset demo [-p teacher.options.KEY=VALUE ...]]

Builds the Mask2Former-family teacher and student of the chosen sizes side by side in one
process (random weights: efficiency does not depend on them), plus the Grounding DINO + SAM
teacher at its "paper" size when that model is registered, and prints a markdown table with
teacher / student ratio rows. Paper sizes on CPU default to 224 px and few iterations (the paper
measures at full resolution on a GPU); the table header says what was used.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from sskd.evaluation.efficiency import compare, format_table
from sskd.models import build_model, list_models

DEFAULTS = {  # per --sizes: image size, batch size, warmup, iters, classes
    "demo": dict(image_size=64, batch_size=8, warmup=3, iters=10, num_classes=3),
    "paper": dict(image_size=224, batch_size=2, warmup=1, iters=3, num_classes=8),
}


def preset_options(preset: str | None, overrides: list[str]) -> dict[str, dict]:
    """``{"teacher": {...}, "student": {...}}``: the model options of a preset (+ overrides),
    so the table measures the models as that preset builds them (e.g. the demo's outline heads
    and mask upsampler); ``{}`` without a preset."""
    if not preset:
        if overrides:
            raise SystemExit("efficiency.py: -p needs --preset (the overrides apply to its config)")
        return {}
    from sskd.config import load_config
    cfg = load_config(preset, overrides)
    return {"teacher": dict(cfg.teacher.options), "student": dict(cfg.student.options)}


def build_models(sizes: str, num_classes: int, grounded_sam: bool,
                 options: dict[str, dict] | None = None) -> tuple[dict, list[str]]:
    options = options or {}
    notes = [f"{role} options {o}" for role, o in options.items() if o]
    models = {f"teacher_{sizes}": build_model("mask2former", num_classes, size=f"teacher_{sizes}",
                                              **options.get("teacher", {}))}
    if sizes == "paper" and grounded_sam:
        if "grounded_sam" not in list_models():
            notes.append("grounded_sam is not registered: row skipped")
        else:
            try:
                models["grounded_sam_paper"] = build_model("grounded_sam", num_classes, size="paper")
            except (KeyError, ValueError) as e:  # registered without a "paper" size
                notes.append(f"grounded_sam paper size unavailable ({e}): row skipped")
    models[f"student_{sizes}"] = build_model("mask2former", num_classes, size=f"student_{sizes}",
                                             **options.get("student", {}))
    return models, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", choices=sorted(DEFAULTS), default="demo")
    p.add_argument("--image-size", type=int, help="square input side in px (demo 64, paper 224)")
    p.add_argument("--batch-size", type=int, help="batch of the throughput measurement")
    p.add_argument("--warmup", type=int, help="untimed calls before timing")
    p.add_argument("--iters", type=int, help="timed calls (median reported)")
    p.add_argument("--num-classes", type=int, help="classes K (demo 3, paper 8 = Cityscapes things)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--train-step", action="store_true", help="also time a training step (batch 8)")
    p.add_argument("--no-grounded-sam", action="store_true", help="skip the Grounding DINO + SAM row")
    p.add_argument("--preset", help="build the teacher and student with this preset's model "
                   "options (e.g. demo); default: the sizes' own")
    p.add_argument("-p", dest="overrides", action="append", default=[],
                   help="config override key=value on top of --preset (repeatable)")
    p.add_argument("--json", type=Path, help="write rows and settings to this json file")
    args = p.parse_args(argv)
    d = DEFAULTS[args.sizes]
    image_size = args.image_size or d["image_size"]
    batch_size = args.batch_size or d["batch_size"]
    warmup = d["warmup"] if args.warmup is None else args.warmup
    iters = args.iters or d["iters"]
    num_classes = args.num_classes or d["num_classes"]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models, notes = build_models(args.sizes, num_classes, not args.no_grounded_sam,
                                 preset_options(args.preset, args.overrides))
    rows = compare(models, image_size, batch_size=batch_size, device=device, warmup=warmup,
                   iters=iters, train_step=args.train_step)
    meta = {"sizes": args.sizes, "image_size": image_size, "batch_size": batch_size,
            "warmup": warmup, "iters": iters, "num_classes": num_classes, "device": device,
            "threads": args.threads, "torch": torch.__version__, "machine": platform.processor()
            or platform.machine(), "notes": notes}
    if device == "cpu" and args.sizes == "paper":
        notes.append(f"paper sizes measured on CPU at {image_size} px, not the paper's GPU setting")
    print(f"# efficiency: sizes={args.sizes} image={image_size}px batch={batch_size} "
          f"device={device} threads={args.threads} torch={torch.__version__}")
    for n in notes:
        print(f"# note: {n}")
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
