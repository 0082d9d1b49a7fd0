"""How fast a stand-in learns on the foundation corpus: zero-shot target AP per CPU-second.

    .venv/bin/python benchmarks/standin_sizing.py --size teacher_demo --steps 1400 --eval-every 350
    .venv/bin/python benchmarks/standin_sizing.py --size student_demo --opt hidden_dim=96 --lr 5e-4

Pretrains one model of the ``mask2former`` family on the preset's pretraining corpus
(``data.synthetic.source`` / ``corpus_*``) exactly as the stand-ins are pretrained (L_sup,
``stages.teacher_pretrain`` settings unless overridden), with ``--threads`` intra-op threads,
and every ``--eval-every`` steps scores it zero-shot on the target-domain val images. Prints a
table: step, training seconds (evaluation excluded), loss, params, target mask AP / AP50. Use it
to size a stand-in for a CPU budget; run two at once (``--threads 1`` each) to see the speed
the demo gets with ``workers: 2``. Nothing is cached; the run dir is a temp dir.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from sskd.config import load_config
from sskd.data.coco import read_coco
from sskd.data.synthetic import generate_benchmark
from sskd.engine.inference import iter_predictions
from sskd.engine.trainer import Objective, TrainPaths, train
from sskd.evaluation.coco_eval import evaluate_masks
from sskd.models.base import build_model
from sskd.report import markdown_table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--size", default="teacher_demo", help="mask2former size preset")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="mask2former option override (repeatable), e.g. hidden_dim=96")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--eval-every", type=int, default=350)
    p.add_argument("--lr", type=float, help="default: stages.teacher_pretrain.lr of the preset")
    p.add_argument("--warmup", type=int, help="default: the preset's warmup_steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset)
    tc = cfg.stages.teacher_pretrain
    tc = dataclasses.replace(tc, steps=args.steps, log_every=args.eval_every,
                             checkpoint_every=args.steps, seed=args.seed,
                             lr=args.lr if args.lr is not None else tc.lr,
                             warmup_steps=args.warmup if args.warmup is not None else tc.warmup_steps)
    paths = generate_benchmark(cfg.data.synthetic, cfg.data.root)
    corpus = read_coco(paths["source"], paths["source"].parent)
    val = read_coco(paths["val"], paths["val"].parent)
    opts = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.opt)}
    torch.manual_seed(args.seed)
    model = build_model("mask2former", num_classes=len(corpus.classes), size=args.size, **opts)
    rows: list[list] = []
    clock = {"train": 0.0, "since": time.perf_counter()}

    def score(entry: dict) -> None:
        clock["train"] += time.perf_counter() - clock["since"]
        preds = list(iter_predictions(model, val, cfg.evaluation, input_size=cfg.data.input_size))
        res = evaluate_masks(val, preds)
        model.train()
        rows.append([entry["step"], f"{clock['train']:.0f}", f"{entry['loss']:.2f}",
                     f"{res['AP']:.1f}", f"{res['AP50']:.1f}"])
        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
        clock["since"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        train(model, corpus, TrainPaths.in_dir(tmp, "sizing"), tc, Objective(),
              input_size=cfg.data.input_size, progress=False, on_log=score)
    print(f"## {args.size} {opts or ''}: {model.num_parameters() / 1e6:.2f}M params, lr {tc.lr:g}, "
          f"warmup {tc.warmup_steps}, batch {tc.batch_size}, {args.threads} thread(s), corpus "
          f"{len(corpus)} images, zero-shot on {len(val)} target val images\n")
    print(markdown_table(["step", "train s", "loss", "AP", "AP50"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
