"""Which error of the teacher's pseudo-labels limits the student: retrain stages 2-3 on oracles.

    .venv/bin/python benchmarks/pseudo_label_oracle.py runs/demo                     # every oracle
    .venv/bin/python benchmarks/pseudo_label_oracle.py runs/demo --oracles masks truth
    .venv/bin/python benchmarks/pseudo_label_oracle.py runs/seed_noise/demo_seed1 --out /tmp/or

For a finished run on data whose D_u keeps hidden ground truth (the synthetic benchmark), each
oracle (:mod:`sskd.evaluation.pseudo_label_oracles`: ``classes``, ``masks``, ``recall``,
``truth``) copies the run dir to ``<out>/<run>_oracle_<kind>`` (teacher weights, pseudo-labels
and the supervised baselines come along; the students do not), rewrites the pseudo-labels stage 2
distils with that error removed, and retrains stage 2 and stage 3 with the run's own config.
Prints one table: the pseudo-labels' AP, mask recall and class accuracy, and the students' AP,
beside the run's own (``teacher``) row. A copy already finished is reused.

Costs stage 2 + 3 of the run per oracle (demo preset: ~10-15 min on one core).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from sskd.data.records import write_json_atomic, write_records_jsonl
from sskd.evaluation.pseudo_label_oracles import ORACLES, oracle_pseudo_labels
from sskd.metrics import read_metrics, update_metrics
from sskd.report import fmt, markdown_table
from sskd.stages import refine, transfer
from sskd.stages.common import load_pseudo_labels, pseudo_label_quality, wants_class_probs
from sskd.stages.data import load_datasets
from sskd.stages.pipeline import transfer_pseudo_tag
from sskd.stages.run import as_run

#: what a copy leaves behind: the students it retrains, and files that describe the source run
_SKIP = ("student_transfer", "student_refined", "ablations", "report", "seed_noise.json", ".lock")


def _copy_run(src: Path, dst: Path) -> None:
    def ignore(_dir: str, names: list[str]) -> list[str]:
        return [n for n in names if any(n.startswith(s) for s in _SKIP)]
    shutil.copytree(src, dst, ignore=ignore)
    m = read_metrics(dst / "metrics.json")
    for tag in ("student_transfer", "student_refined"):
        m["models"].pop(tag, None)
    write_json_atomic(m, dst / "metrics.json", indent=2)


def pl_row(run, tag: str) -> dict:
    entry = read_metrics(run.dir.metrics).get("pseudo_labels", {}).get(tag, {})
    match = entry.get("matching", {})
    return {"pl_AP": entry.get("AP"), "recall": match.get("mask_recall"),
            "class_acc": match.get("class_accuracy")}


def run_oracle(src: Path, kind: str, out: Path) -> dict:
    """Stage 2 + 3 of ``src`` retrained on its ``kind`` oracle pseudo-labels; their numbers."""
    dst = out / f"{src.name}_oracle_{kind}"
    if not dst.is_dir():
        _copy_run(src, dst)
    run = as_run(dst)
    tag = transfer_pseudo_tag(run)
    ds = load_datasets(run)
    if "oracle" not in read_metrics(run.dir.metrics).get("pseudo_labels", {}).get(tag, {}):
        teacher_pl = load_pseudo_labels(run, tag, ds["labeled"].classes)
        recs, counts = oracle_pseudo_labels(ds["unlabeled"], teacher_pl.records, kind,
                                            score_threshold=run.cfg.pseudo_label.score_threshold)
        if wants_class_probs(run.cfg, ["transfer"]) and any(
                i.class_probs is None for r in recs for i in r.instances):
            raise SystemExit(f"{src}: its pseudo-labels {tag} carry no class distributions but "
                             "the config trains on them (soft_classes / class_prior): run the "
                             "source run's stage 2 first, which labels D_u with them")
        write_records_jsonl(recs, run.dir.pseudo_labels(tag))
        update_metrics(run.dir.metrics, "pseudo_labels", tag,
                       {**pseudo_label_quality(ds["unlabeled"], recs),
                        "oracle": {"kind": kind, **counts}})
        logging.getLogger("sskd").warning("%s oracle: %s", kind, counts)
    transfer(run, progress=False)
    refine(run, progress=False)
    return numbers(run, tag)


def numbers(run, tag: str) -> dict:
    models = read_metrics(run.dir.metrics)["models"]
    ap = {t: models[t]["AP"] for t in ("teacher_adapted", "student_transfer", "student_refined")
          if t in models}
    return {**pl_row(run, tag), **ap}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a finished run (stage 3 done) on data with hidden D_u truth")
    p.add_argument("--oracles", nargs="+", choices=ORACLES, default=list(ORACLES))
    p.add_argument("--out", default=None, help="where the copies go (default: beside the run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    src = Path(args.run_dir).resolve()
    base = as_run(src)
    if "student_refined" not in read_metrics(base.dir.metrics)["models"]:
        p.error(f"{src} has no refined student: finish the run (sskd run, or notebooks 00-04) "
                "first, so the oracles have its own students to be compared with")
    out = Path(args.out) if args.out else src.parent
    out.mkdir(parents=True, exist_ok=True)
    tag = transfer_pseudo_tag(base)
    rows = {"teacher": numbers(base, tag)}
    for kind in args.oracles:
        rows[kind] = run_oracle(src, kind, out)
    ref = rows["teacher"].get("teacher_adapted")
    table = [[name, *(fmt(r.get(k), 1) for k in ("pl_AP", "recall", "class_acc",
                                                   "student_transfer", "student_refined")),
              "—" if ref is None or r.get("student_refined") is None
              else f"{r['student_refined'] - ref:+.1f}"]
             for name, r in rows.items()]
    print(f"## pseudo-label oracles: {src}\n\n" + markdown_table(
        ["pseudo-labels", "PL AP", "PL mask recall %", "PL right class %", "stage-2 student",
         "refined student", "refined - adapted teacher"], table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
