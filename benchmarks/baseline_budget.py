"""Is a supervised-only baseline converged at the preset's step budget? Its AP at several budgets.

    .venv/bin/python benchmarks/baseline_budget.py --steps 2100 4100 --seeds 0 1
    .venv/bin/python benchmarks/baseline_budget.py --model teacher --steps 750 1500
    .venv/bin/python benchmarks/baseline_budget.py --preset smoke --steps 2 4 --runs-root /tmp/bb

A margin over a baseline ("refined student >= supervised student + 5") is a claim about the
method only if the baseline had stopped improving. The presets give each baseline as many steps
as the stages it is compared with, which is fair in steps, but a method that converges faster
then wins by speed, not by what it learns. This trains ``stages.<model>_supervised`` alone (from
the same start the run would use: the stand-in's cached weights or encoder) once per seed and
budget, each in ``<runs-root>/<preset>_<model>_seed<S>_steps<N>`` (finished ones are reused),
and prints:

* the baseline's mask AP per budget and seed, with the spread across seeds;
* per seed, the gain from the smallest budget to each larger one, and whether it stands out of
  seed noise (its smallest value above the larger spread of the two rows).

Each budget is its own run because the learning-rate schedule (poly decay to 0) spans the whole
budget: the AP at step 2100 of a 4100-step run is not the AP of a 2100-step run.
Measured 2026-12-02 on a 2-core machine, seed 0 (docs/method.md, "Is the baseline converged?"):
the demo's student 18.4 -> 17.0 from 2100 to 4100 steps (converged); with the outline head
(``student.options.silhouette_channels=32``) 22.1 -> 29.3 (not).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from sskd.metrics import read_metrics
from sskd.report import markdown_table
from sskd.stages import open_run, prepare_data
from sskd.stages.pipeline import student_supervised, teacher_supervised

TRAIN = {"student": student_supervised, "teacher": teacher_supervised}


def run_baseline(preset: str, model: str, seed: int, steps: int, runs_root: Path,
                 overrides: list[str]) -> float:
    """Mask AP of ``<model>_supervised`` trained ``steps`` steps with ``seed`` (reused when finished)."""
    tag = f"{model}_supervised"
    run = open_run(f"{preset}_{model}_seed{seed}_steps{steps}", preset=preset, runs_root=runs_root,
                   overrides=[*overrides, f"seed={seed}", f"stages.{tag}.enabled=true",
                              f"stages.{tag}.train.steps={steps}"])
    t0 = time.perf_counter()
    prepare_data(run)
    TRAIN[model](run, progress=False)
    ap = read_metrics(run.dir.root / "metrics.json")["models"][tag]["AP"]
    print(f"{tag} seed {seed}, {steps} steps: {ap:.1f} AP ({time.perf_counter() - t0:.0f} s, "
          f"{run.dir.root})", file=sys.stderr, flush=True)
    return ap


def tables(ap: dict[int, dict[int, float]]) -> tuple[str, str, dict]:
    """``ap[steps][seed]`` -> (AP table, gain table, numbers). Gains are against the smallest budget."""
    budgets = sorted(ap)
    seeds = sorted({s for row in ap.values() for s in row})
    spread = {n: (max(ap[n].values()) - min(ap[n].values())) if len(ap[n]) > 1 else None
              for n in budgets}
    t1 = markdown_table(
        ["steps", *(f"seed {s}" for s in seeds), "mean", "spread"],
        [[str(n), *(f"{ap[n][s]:.1f}" if s in ap[n] else "—" for s in seeds),
          f"{sum(ap[n].values()) / len(ap[n]):.1f}",
          "—" if spread[n] is None else f"{spread[n]:.1f}"] for n in budgets])
    base, gains, rows = budgets[0], {}, []
    for n in budgets[1:]:
        common = [s for s in seeds if s in ap[n] and s in ap[base]]
        if not common:
            continue
        per_seed = [ap[n][s] - ap[base][s] for s in common]
        noise = max(spread[n] or 0.0, spread[base] or 0.0)
        if len(per_seed) < 2:
            verdict = "n/a (one seed)"
        elif min(per_seed) > noise:
            verdict = "still rising: margins over the smaller budget overstate the method"
        elif max(per_seed) < -noise:
            verdict = "falling: the smaller budget is the stronger baseline"
        else:
            verdict = "within noise"
        gains[n] = {"per_seed": dict(zip(common, per_seed)), "min": min(per_seed),
                    "noise": noise, "verdict": verdict}
        rows.append([f"{base} -> {n}", *(f"{ap[n][s] - ap[base][s]:+.1f}" if s in common else "—"
                                         for s in seeds), f"{noise:.1f}", verdict])
    t2 = markdown_table(["steps", *(f"gain, seed {s}" for s in seeds), "noise", "verdict"], rows)
    return t1, t2, {"ap": {str(n): ap[n] for n in budgets}, "spread": spread, "gains": gains}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--model", choices=sorted(TRAIN), default="student",
                   help="which supervised-only baseline (stages.<model>_supervised)")
    p.add_argument("--steps", type=int, nargs="+", required=True,
                   help="step budgets to compare, e.g. the preset's and twice it")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runs-root", default="runs/baseline_budget")
    p.add_argument("-p", dest="overrides", action="append", default=[],
                   help="extra config override key=value (repeatable)")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    if min(args.steps) < 1 or len(set(args.steps)) != len(args.steps):
        p.error(f"--steps {args.steps}: give distinct budgets of at least 1 step")
    logging.basicConfig(level=logging.WARNING)
    ap: dict[int, dict[int, float]] = {}
    for n in sorted(args.steps):
        for s in args.seeds:
            ap.setdefault(n, {})[s] = run_baseline(args.preset, args.model, s, n,
                                                   Path(args.runs_root), args.overrides)
    t1, t2, data = tables(ap)
    print(f"## {args.model}_supervised by step budget: preset {args.preset}\n\n{t1}\n\n{t2}")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
