"""Seed-to-seed noise of a whole run, and whether the paper's differences stand out of it.

    .venv/bin/python benchmarks/seed_noise.py                         # demo preset, seeds 0 1
    .venv/bin/python benchmarks/seed_noise.py --seeds 0 1 2 --json noise.json
    .venv/bin/python benchmarks/seed_noise.py --preset smoke --runs-root /tmp/noise
    .venv/bin/python benchmarks/seed_noise.py --extra-run runs/demo --seeds 1 2   # reuse make demo

Runs every stage (the library functions the notebooks call, without the notebooks and the
FiftyOne export) once per seed, each in ``<runs-root>/<preset>_seed<S>``; the run's ``seed``
changes model init and every stage's sampling. The data, the split and the stand-ins' pretrained
weights stay fixed (like downloaded foundation weights, they do not depend on the run's seed).
Finished runs are reused, so adding a seed costs one run; a seed stopped part-way resumes from
its last checkpoint when the script is run again. Prints three tables:

* mask AP of every model per seed, with the spread (max - min) across seeds;
* each headline difference of the paper (docs/method.md) per seed, with its smallest value across seeds;
* the demo preset's design targets (:data:`DEMO_TARGETS`) per seed, and whether every seed meets them.

A difference stands out of seed noise when its smallest value exceeds the largest spread of
the rows it compares. A seed of the demo preset took about 31 min on one core of a 2-core
machine (two seeds in parallel, ``-p workers=1``, the stand-ins cached, no ablations; measured
2026-12-03); the first run on a machine adds their one-time pretraining (~17 min).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from sskd.data.records import write_json_atomic
from sskd.metrics import read_metrics
from sskd.report import markdown_table
from sskd.stages import (adapt_teacher, open_run, prepare_data, refine, run_ablations, transfer,
                         zero_shot)

#: (name, minuend, subtrahend): a row is a model tag, or "ablation/tag"
DIFFERENCES = [
    ("adapted teacher - zero-shot teacher", "teacher_adapted", "teacher_zero_shot"),
    ("adapted teacher - supervised teacher", "teacher_adapted", "teacher_supervised"),
    ("adapted teacher (1b) - teacher after 1a", "teacher_adapted", "teacher_1a"),
    ("adapted teacher - supervised student", "teacher_adapted", "student_supervised"),
    ("stage-2 student - supervised student", "student_transfer", "student_supervised"),
    ("refined student - adapted teacher", "student_refined", "teacher_adapted"),
    ("refined student - supervised student", "student_refined", "student_supervised"),
    ("stage-2 student: fused - uniform negatives", "student_transfer",
     "uniform_negatives/student_transfer"),
]

#: what the demo preset is sized to show in *every* seed: (what, row, row subtracted or None,
#: least value). The paper's story: a broad teacher that adaptation lifts well above a student
#: trained on the labels alone, and a distilled student that reaches the adapted teacher.
DEMO_TARGETS = [
    ("zero-shot teacher >= 5 AP", "teacher_zero_shot", None, 5.0),
    ("adapted teacher >= zero-shot teacher + 5", "teacher_adapted", "teacher_zero_shot", 5.0),
    ("adapted teacher >= supervised student + 5", "teacher_adapted", "student_supervised", 5.0),
    ("refined student >= supervised student + 5", "student_refined", "student_supervised", 5.0),
    ("refined student >= adapted teacher - 1", "student_refined", "teacher_adapted", -1.0),
    ("stage-2 student >= supervised student", "student_transfer", "student_supervised", 0.0),
]


def run_aps(run_dir: Path) -> dict[str, float]:
    """Mask AP of every model of a finished run, ablation models as ``<ablation>/<tag>``."""
    m = read_metrics(Path(run_dir) / "metrics.json")
    out = {tag: res["AP"] for tag, res in m["models"].items()}
    for name, entry in m.get("ablations", {}).items():
        out.update({f"{name}/{tag}": res["AP"] for tag, res in entry.get("models", {}).items()})
    return out


def run_seed(preset: str, seed: int, runs_root: Path, overrides: list[str], ablations: bool) -> dict:
    run = open_run(f"{preset}_seed{seed}", preset=preset, runs_root=runs_root,
                   overrides=[f"seed={seed}", *overrides])
    t0 = time.perf_counter()
    prepare_data(run)
    zero_shot(run, progress=False)
    adapt_teacher(run, progress=False)
    transfer(run, progress=False)
    refine(run, progress=False)
    if ablations:
        run_ablations(run, progress=False)
    out = run_aps(run.dir.root)
    print(f"seed {seed}: {time.perf_counter() - t0:.0f} s ({run.dir.root})", file=sys.stderr, flush=True)
    return out


def tables(per_seed: dict[int, dict[str, float]]) -> tuple[str, str, dict]:
    seeds = sorted(per_seed)
    rows = sorted({r for res in per_seed.values() for r in res})
    spread = {}
    ap_rows = []
    for r in rows:
        vals = [per_seed[s].get(r) for s in seeds]
        got = [v for v in vals if v is not None]
        spread[r] = max(got) - min(got) if len(got) > 1 else None
        ap_rows.append([r, *("—" if v is None else f"{v:.1f}" for v in vals),
                        "—" if spread[r] is None else f"{spread[r]:.1f}"])
    diff_rows, summary = [], {}
    for name, a, b in DIFFERENCES:
        diffs = [per_seed[s][a] - per_seed[s][b] for s in seeds if a in per_seed[s] and b in per_seed[s]]
        if not diffs:
            continue
        noise = max((spread[r] or 0.0) for r in (a, b))
        stands = len(diffs) > 1 and min(diffs) > noise
        summary[name] = {"per_seed": diffs, "min": min(diffs), "noise": noise, "stands_out": stands}
        diff_rows.append([name, *(f"{d:+.1f}" for d in diffs), f"{min(diffs):+.1f}", f"{noise:.1f}",
                          "yes" if stands else ("n/a (one seed)" if len(diffs) < 2 else "no")])
    t1 = markdown_table(["model (mask AP)", *(f"seed {s}" for s in seeds), "spread"], ap_rows)
    t2 = markdown_table(["difference (AP)", *(f"seed {s}" for s in seeds), "min",
                         "noise (largest spread of its rows)", "min > noise"], diff_rows)
    return t1, t2, {"ap": per_seed, "spread": spread, "differences": summary}


def targets_table(per_seed: dict[int, dict[str, float]]) -> tuple[str, dict]:
    """The demo's design targets (:data:`DEMO_TARGETS`) per seed, and whether every seed meets them."""
    seeds = sorted(per_seed)
    rows, met = [], {}
    for name, a, b, least in DEMO_TARGETS:
        vals = [per_seed[s][a] - (per_seed[s][b] if b else 0.0) for s in seeds
                if a in per_seed[s] and (b is None or b in per_seed[s])]
        if not vals:
            continue
        met[name] = {"per_seed": vals, "met": all(v >= least for v in vals)}
        rows.append([name, *(f"{v:+.1f}" if b else f"{v:.1f}" for v in vals),
                     "yes" if met[name]["met"] else "no"])
    return markdown_table(["demo target", *(f"seed {s}" for s in seeds), "every seed"], rows), met


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--runs-root", default="runs/seed_noise")
    p.add_argument("-p", dest="overrides", action="append", default=[],
                   help="extra config override key=value (repeatable)")
    p.add_argument("--no-ablations", action="store_true", help="skip the ablation child runs")
    p.add_argument("--extra-run", action="append", default=[], metavar="RUN_DIR",
                   help="also tabulate this finished run (e.g. runs/demo), its config's seed "
                        "naming the column; that seed is then not run again")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from sskd.config import read_config
    per_seed = {}
    for rd in args.extra_run:
        seed = read_config(Path(rd) / "config.yaml").seed
        if seed in per_seed:
            p.error(f"two runs with seed {seed}: {rd} and an earlier --extra-run")
        per_seed[seed] = run_aps(Path(rd))
    for s in args.seeds:
        if s not in per_seed:
            per_seed[s] = run_seed(args.preset, s, Path(args.runs_root), args.overrides,
                                   not args.no_ablations)
    t1, t2, data = tables(per_seed)
    t3, data["targets"] = targets_table(per_seed)
    print(f"## seed noise: preset {args.preset}, seeds {sorted(per_seed)}\n\n{t1}\n\n{t2}\n\n{t3}")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    # each tabulated run gets the numbers too: its report grades claims against this spread
    for rd in [*args.extra_run, *(Path(args.runs_root) / f"{args.preset}_seed{s}" for s in args.seeds)]:
        if Path(rd).is_dir():
            write_json_atomic(data, Path(rd) / "seed_noise.json", indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
