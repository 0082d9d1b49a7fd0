"""The run report: ``runs/<name>/report/report.md`` + ``report.html`` + figures + metrics copy.

Everything in it is read from the run dir (``metrics.json``, ``logs/``, ``config.yaml``); the
"claims" section compares measured numbers and prints PASS/FAIL (WITHIN NOISE when the
difference is below one run's seed noise); nothing is hard-coded.
"""

from __future__ import annotations

import html
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from sskd.config import Config, ConfigError, parse_overrides, read_config
from sskd.data.records import write_atomic
from sskd.data.records import write_json_atomic
from sskd.graph import stage_order
from sskd.rundir import MODEL_TAGS, RunDir

MISSING = "—"
#: stage names of metrics.json "stages", in pipeline order (others follow alphabetically)
STAGE_ORDER = stage_order()
#: the claims need the student this many times smaller than the teacher (the paper: ~11x, docs/method.md)
MIN_PARAM_RATIO = 10.0


# --------------------------------------------------------------------------- inputs


def _resolve(run: Any) -> tuple[RunDir, Config | None]:
    """A ``Run`` (``.dir``/``.cfg``), a ``RunDir`` or a path -> (run dir, config or None)."""
    if hasattr(run, "dir") and hasattr(run, "cfg"):
        return run.dir, run.cfg
    rd = run if isinstance(run, RunDir) else RunDir(run)
    try:
        return rd, read_config(rd.config) if rd.config.is_file() else None
    except (ConfigError, ValueError):
        return rd, None


def read_run_metrics(run_dir: RunDir) -> dict:
    """``metrics.json`` with every section present (empty when the file is missing)."""
    import json

    data: dict = {}
    if run_dir.metrics.is_file():
        try:
            data = json.loads(run_dir.metrics.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{run_dir.metrics} is not valid JSON ({e}); delete it and re-run "
                             "the stages to rebuild it") from e
    for key in ("models", "stages", "ablations", "pseudo_labels"):
        data.setdefault(key, {})
    data.setdefault("efficiency", [])
    return data


# --------------------------------------------------------------------------- tables


def fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_params(n: Any) -> str:
    """Parameter count -> millions with 3 significant digits (``1620000`` -> ``1.62M``)."""
    if n is None:
        return MISSING
    return f"{float(n) / 1e6:.3g}M"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def results_table(models: Mapping[str, dict]) -> str:
    """The paper's Table 1 shape (docs/method.md, 'Paper results'): one row per model of the pipeline, ``—`` where not run."""
    from sskd.plots import TABLE1_ROWS

    rows = []
    official = any("cityscapes_AP" in (m or {}) for m in models.values())
    for tag, label in TABLE1_ROWS:
        m = models.get(tag) or {}
        rows.append([label, f"`{tag}`", fmt(m.get("AP")), fmt(m.get("AP50"))]
                    + ([fmt(m.get("cityscapes_AP")), fmt(m.get("cityscapes_AP50"))] if official else [])
                    + [fmt_params(m.get("params"))])
    extra = ["Cityscapes AP", "Cityscapes AP50"] if official else []
    return markdown_table(["model", "tag", "AP", "AP50", *extra, "params"], rows)


def per_class_table(models: Mapping[str, dict]) -> str:
    tags = [t for t in MODEL_TAGS if t in models] + sorted(set(models) - set(MODEL_TAGS))
    classes: list[str] = []
    for t in tags:
        classes += [c for c in models[t].get("per_class", {}) if c not in classes]
    if not classes:
        return ""
    rows = [[f"`{t}`"] + [fmt(models[t].get("per_class", {}).get(c)) for c in classes] for t in tags]
    return markdown_table(["model"] + classes, rows)


def efficiency_name(row: Mapping[str, Any], i: int = 0) -> str:
    """Row label of an efficiency entry (``name``, as sskd.evaluation.efficiency writes it, or
    ``model``)."""
    return str(row.get("name", row.get("model", f"model {i}")))


def efficiency_table(efficiency: Sequence[Mapping[str, Any]]) -> str:
    """Measured rows, then ratio rows (``is_ratio``; computed teacher / student when absent)."""
    from sskd.plots import EFFICIENCY_KEYS

    models = [e for e in efficiency if not e.get("is_ratio")]
    if not models:
        return ""
    rows = [[efficiency_name(e, i)] + [_sig(e.get(k)) for k, _ in EFFICIENCY_KEYS]
            for i, e in enumerate(models)]
    ratios = [e for e in efficiency if e.get("is_ratio")]
    by = {efficiency_name(e): e for e in models}
    if not ratios and "teacher" in by and "student" in by:  # how much the distillation saves
        t, s = by["teacher"], by["student"]
        ratios = [{"name": "teacher / student", **{k: t[k] / s[k] for k, _ in EFFICIENCY_KEYS
                                                    if t.get(k) and s.get(k)}}]
    rows += [[efficiency_name(r)] + [f"{r[k]:.1f}x" if r.get(k) else MISSING
                                     for k, _ in EFFICIENCY_KEYS] for r in ratios]
    return markdown_table(["model"] + [lab for _, lab in EFFICIENCY_KEYS], rows)


def _sig(v: Any) -> str:
    """4 significant digits: efficiency numbers span 0.007 GFLOPs to 5600 MB."""
    return MISSING if v is None else f"{float(v):.4g}"


def dataset_summary(datasets: Mapping[str, Any]) -> str:
    """Markdown table of ``{split: Dataset}``: images, instances, instances per class."""
    classes: list[str] = []
    for ds in datasets.values():
        classes += [c for c in ds.classes if c not in classes]
    rows = []
    for split, ds in datasets.items():
        counts = [0] * len(ds.classes)
        for r in ds.records:
            for i in r.instances:
                counts[i.class_id] += 1
        per = dict(zip(ds.classes, counts))
        rows.append([split, len(ds), sum(counts)] + [per.get(c, 0) for c in classes])
    return markdown_table(["split", "images", "instances"] + classes, rows)


def precision_summary(table: Sequence[Mapping[str, Any]]) -> str:
    """Per-class rows (``bin == "all"``) of :func:`sskd.plots.pseudo_label_precision` as markdown."""
    rows = [r for r in table if r.get("bin") == "all"]
    if not any(r.get("num_gt") for r in rows):
        return "No ground truth for these images: the bias view needs labels."
    return markdown_table(
        ["class", "pseudo-labels", "true positives", "precision", "mean score",
         "over-confidence (score - precision)", "ground truth", "recall"],
        [[r["class"], r["count"], r["tp"], fmt(r["precision"], 3), fmt(r["mean_score"], 3),
          fmt(r["gap"], 3), r["num_gt"], fmt(r["recall"], 3)] for r in rows])


def without_figures(md: str) -> str:
    """The report markdown minus its figure section (for display inside a notebook, where the
    PNG links do not resolve; the notebook draws the figures itself)."""
    return re.sub(r"\n## Figures\n.*?(?=\n## |\nRaw numbers|\Z)", "", md, flags=re.S)


def _ordered(keys: Any, order: Sequence[str]) -> list[str]:
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def ablation_overrides(name: str, entry: Mapping[str, Any], cfg: Config | None) -> dict[str, Any]:
    """Dotted overrides of one ablation: from metrics.json, else from the run config."""
    ov = entry.get("overrides")
    if ov is None and cfg is not None:
        ov = cfg.ablations.get(name)
    return _flat(parse_overrides(ov)) if ov else {}


def current_ablations(metrics: Mapping[str, Any], cfg: Config | None) -> dict[str, Any]:
    """``metrics["ablations"]`` entries the config still has with the same overrides (a removed
    or changed ablation's old numbers must not reach the report)."""
    entries = metrics.get("ablations", {})
    if cfg is None:
        return dict(entries)
    now = {n: parse_overrides(ov) for n, ov in cfg.ablations.items()}
    return {n: e for n, e in entries.items()
            if n in now and parse_overrides(e.get("overrides", cfg.ablations[n])) == now[n]}


def ablations_section(metrics: Mapping[str, Any], cfg: Config | None) -> str:
    main = metrics.get("models", {})
    parts = []
    for name, entry in current_ablations(metrics, cfg).items():
        ov = ablation_overrides(name, entry, cfg)
        models = entry.get("models", {})
        tags = [t for t in MODEL_TAGS if t in models]
        rows = []
        for t in tags:
            a, m = models[t].get("AP"), main.get(t, {}).get("AP")
            delta = f"{a - m:+.1f}" if a is not None and m is not None else MISSING
            rows.append([f"`{t}`", fmt(a), fmt(models[t].get("AP50")), fmt(m), delta])
        parts.append(f"### {name}\n\noverrides: "
                     + (", ".join(f"`{k}={v}`" for k, v in ov.items()) or "(none recorded)")
                     + "\n\n" + (markdown_table(["model", "AP", "AP50", "AP (main run)",
                                                 "Δ AP"], rows) if rows else "no models evaluated"))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- claims


@dataclass
class Claim:
    """One paper claim checked on this run: ``status`` is PASS, FAIL, WITHIN NOISE, SKIPPED or
    NOT GRADED (a teacher claim when the teacher has no pretrained weights)."""

    name: str
    status: str
    detail: str


def _ap(models: Mapping[str, dict], tag: str) -> float | None:
    v = models.get(tag, {}).get("AP")
    return None if v is None else float(v)


def _params(metrics: Mapping[str, Any], tag: str, role: str) -> float | None:
    p = metrics.get("models", {}).get(tag, {}).get("params")
    if p is None:  # fall back to the efficiency table's count of that role
        e = next((e for e in metrics.get("efficiency", []) if efficiency_name(e) == role), None)
        p = e["params_M"] * 1e6 if e and e.get("params_M") else None
    return None if p is None else float(p)


def _sampler_of(name: str, entry: Mapping[str, Any], cfg: Config | None) -> str | None:
    """The sampler the ablation's child run used: recorded from its config, else its overrides
    on top of the run's config (never guessed from the ablation's name)."""
    if entry.get("sampler"):
        return str(entry["sampler"])
    ov = ablation_overrides(name, entry, cfg)
    if "pixel_contrast.sampler" in ov:
        return str(ov["pixel_contrast.sampler"])
    return cfg.pixel_contrast.sampler if cfg is not None else None


#: seed-to-seed noise of one short CPU run (docs/method.md, 'Training on a CPU': +-3-4 AP) when the run's
#: config (``evaluation.seed_noise_ap``) is not at hand; smaller differences are reported as
#: such, whatever their sign
NOISE_AP = 3.5


def _noise(diff: float, noise: float = NOISE_AP) -> str:
    return "" if abs(diff) >= noise else f"; |difference| < {noise:g} AP, within single-run seed noise"


@dataclass(frozen=True)
class Comparison:
    """One comparison of the paper's Table 1: ``better`` beats (``gain``) or matches (``parity``)
    ``base``. Rows are model tags, or ``<ablation>/<tag>`` for an ablation's model."""

    key: str
    name: str
    better: str
    base: str
    kind: str = "gain"        # "gain": AP(better) > AP(base); "parity": AP(better) >= AP(base)
    teacher: bool = False     # meaningless when the teacher has no pretrained weights


#: every comparison of Table 1 the report grades, in the order it lists them
COMPARISONS = (
    Comparison("adapted_vs_zero_shot", "adaptation helps the teacher: AP(adapted) > AP(zero-shot)",
               "teacher_adapted", "teacher_zero_shot", teacher=True),
    Comparison("adapted_vs_supervised_teacher",
               "adaptation beats supervised fine-tuning: AP(adapted) > AP(teacher, supervised)",
               "teacher_adapted", "teacher_supervised", teacher=True),
    Comparison("1b_vs_1a", "self-training (1b) improves on 1a: AP(adapted) > AP(1a)",
               "teacher_adapted", "teacher_1a", teacher=True),
    Comparison("transfer_vs_supervised_student",
               "stage 2 beats the supervised student: AP(stage 2) > AP(supervised only)",
               "student_transfer", "student_supervised"),
    Comparison("refined_vs_supervised_student",
               "distillation helps the student: AP(refined) > AP(supervised only)",
               "student_refined", "student_supervised"),
    Comparison("refined_vs_adapted_teacher",
               f"refined student >= adapted teacher with >= {MIN_PARAM_RATIO:g}x fewer parameters",
               "student_refined", "teacher_adapted", kind="parity", teacher=True),
)


def teacher_is_pretrained(cfg: Config | None) -> bool:
    """Whether the run's teacher starts from pretrained weights (else its "zero-shot" row is a
    randomly initialised network and the teacher claims mean nothing). Unknown config: True."""
    if cfg is None:
        return True
    from sskd.stages.checks import missing_teacher_weights
    t = cfg.teacher
    standin = (t.name == "mask2former" and cfg.data.kind == "synthetic"
               and cfg.stages.teacher_pretrain.steps > 0)
    return standin or not missing_teacher_weights(t)


def read_seed_noise(run_dir: RunDir) -> dict[int, dict[str, float]]:
    """``{seed: {row: AP}}`` from ``<run>/seed_noise.json`` (``benchmarks/seed_noise.py`` writes
    it into the runs it tabulates); {} when there is none or it is unreadable."""
    import json
    path = run_dir.root / "seed_noise.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {int(s): {r: float(v) for r, v in aps.items()} for s, aps in data["ap"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}


def _grade(diffs: list[float], noise: float, kind: str) -> str:
    """PASS / FAIL / WITHIN NOISE of per-seed differences ``better - base``.

    One seed: a difference of at least ``noise`` (``evaluation.seed_noise_ap``) decides it.
    Several seeds: every seed's difference must exceed ``noise``, the largest seed spread of
    the two rows. A ``parity`` claim (>=) holds when no seed's difference is below 0.
    """
    lo, hi = min(diffs), max(diffs)
    one = len(diffs) == 1
    if hi <= -noise if one else hi < -noise:
        return "FAIL"
    if kind == "parity":
        return "PASS" if lo >= 0 else "WITHIN NOISE"
    return "PASS" if (lo >= noise if one else lo > noise) else "WITHIN NOISE"


def _compare(c: Comparison, ap: Mapping[str, float | None], seeds: Mapping[int, Mapping[str, float]],
             noise_1: float, words: tuple[str, str] | None = None) -> tuple[str, str]:
    """(status, detail) of comparison ``c`` on this run's APs ``ap`` and, when it has them,
    the per-seed APs ``seeds`` (this run's seed among them)."""
    b, s = ap.get(c.better), ap.get(c.base)
    if b is None or s is None:
        return "SKIPPED", f"not measured: needs {c.base} and {c.better} in metrics.json"
    bw, sw = words or (c.better, c.base)
    detail = f"{bw} {b:.1f} vs {sw} {s:.1f} ({b - s:+.1f} AP)"
    per = {k: v[c.better] - v[c.base] for k, v in seeds.items() if c.better in v and c.base in v}
    if len(per) >= 2:
        spread = max(max(v[r] for v in seeds.values() if r in v) -
                     min(v[r] for v in seeds.values() if r in v) for r in (c.better, c.base))
        diffs = list(per.values())
        status = _grade(diffs, spread, c.kind)
        detail += (f"; {len(per)} seeds: " + ", ".join(f"{d:+.1f}" for d in diffs) +
                   f" (mean {sum(diffs) / len(diffs):+.1f}), largest seed spread of the two rows "
                   f"{spread:.1f} AP")
        return status, detail
    status = _grade([b - s], noise_1, c.kind)
    return status, detail + f"; 1 seed (noise threshold `evaluation.seed_noise_ap` = {noise_1:g} AP)"


def check_claims(metrics: Mapping[str, Any], cfg: Config | None = None,
                 seeds: Mapping[int, Mapping[str, float]] | None = None) -> list[Claim]:
    """The paper's Table 1 comparisons (:data:`COMPARISONS`) and the sampler ablation, graded
    on this run; with ``seeds`` (``{seed: {row: AP}}``, see :func:`read_seed_noise`) against
    the measured seed-to-seed spread, else against ``evaluation.seed_noise_ap`` ("1 seed")."""
    models = metrics.get("models", {})
    noise = cfg.evaluation.seed_noise_ap if cfg is not None else NOISE_AP
    seeds = seeds or {}
    pretrained = teacher_is_pretrained(cfg)
    ap = {t: _ap(models, t) for t in models}
    claims = []
    for c in COMPARISONS:
        if c.teacher and not pretrained:
            claims.append(Claim(c.name, "NOT GRADED", "the teacher has no pretrained weights: "
                                "its zero-shot row is a random network"))
            continue
        status, detail = _compare(c, ap, seeds, noise)
        if c.key == "refined_vs_adapted_teacher" and status != "SKIPPED":
            pt = _params(metrics, "teacher_adapted", "teacher")
            ps = _params(metrics, "student_refined", "student")
            if not pt or not ps:
                status, detail = "SKIPPED", "not measured: needs the params of both models"
            else:
                ratio = pt / ps
                status = status if ratio >= MIN_PARAM_RATIO else "FAIL"
                detail += f"; params {fmt_params(ps)} vs {fmt_params(pt)} ({ratio:.1f}x fewer)"
        claims.append(Claim(c.name, status, detail))
    claims.append(_fused_vs_uniform(metrics, cfg, noise, seeds))
    return claims


def _fused_vs_uniform(metrics: Mapping[str, Any], cfg: Config | None,
                      noise: float = NOISE_AP, seeds: Mapping[int, Mapping[str, float]] | None = None) -> Claim:
    """fused >= uniform negatives, on the stage-2 student (the paper's sampler ablation)."""
    name = "fused negative sampling >= uniform"
    runs: dict[str, tuple[str, str, Mapping[str, dict]]] = {}
    main_sampler = cfg.pixel_contrast.sampler if cfg is not None else "fused"
    runs[main_sampler] = ("main run", "", metrics.get("models", {}))
    for ab_name, entry in current_ablations(metrics, cfg).items():
        s = _sampler_of(ab_name, entry, cfg)
        if s in ("fused", "uniform"):  # the main run wins for its own sampler
            runs.setdefault(s, (f"ablation {ab_name}", f"{ab_name}/", entry.get("models", {})))
    if "fused" not in runs or "uniform" not in runs:
        return Claim(name, "SKIPPED", "not measured: no uniform-sampler ablation in metrics.json")
    (fl, fp, fm), (ul, up, um) = runs["fused"], runs["uniform"]
    tag = next((t for t in ("student_transfer", "student_refined", "teacher_adapted")
                if _ap(fm, t) is not None and _ap(um, t) is not None), None)
    if tag is None:
        return Claim(name, "SKIPPED", f"not measured: {fl} and {ul} share no evaluated model")
    c = Comparison("fused_vs_uniform", name, fp + tag, up + tag, kind="parity")
    status, detail = _compare(c, {c.better: _ap(fm, tag), c.base: _ap(um, tag)}, seeds or {},
                              noise, (f"fused ({fl})", f"uniform ({ul})"))
    return Claim(name, status, f"`{tag}`: " + detail)


def claims_section(claims: Sequence[Claim]) -> str:
    rows = [[c.name, f"**{c.status}**", c.detail] for c in claims]
    return markdown_table(["claim", "result", "measured"], rows)


# --------------------------------------------------------------------------- figures


def write_figures(run_dir: RunDir, metrics: Mapping[str, Any], out_dir: Path) -> dict[str, str]:
    """Save the report's PNG figures into ``out_dir``; returns {caption: file name}."""
    from sskd import plots

    figs = {}
    if metrics.get("models"):
        figs["mask AP per stage"] = ("ap_per_stage.png", plots.ap_per_stage(metrics["models"]))
    if metrics.get("efficiency"):
        figs["efficiency, teacher vs student"] = ("efficiency.png",
                                                  plots.efficiency_bars(metrics["efficiency"]))
    logs = plots.load_logs(run_dir.root)
    if logs:
        figs["training losses per term"] = ("losses.png", plots.loss_curves(logs))
        if any(r.get("margin") is not None for rows in logs.values() for r in rows):
            figs["margin and false-negative rate of L_pxl (the paper's Fig. 3)"] = (
                "margin_fnr.png", plots.margin_fnr_curves(logs))
    out = {}
    for caption, (fname, fig) in figs.items():
        fig.savefig(out_dir / fname, dpi=110)
        out[caption] = fname
    return out


# --------------------------------------------------------------------------- report


def report_markdown(run_dir: RunDir, cfg: Config | None, metrics: Mapping[str, Any],
                    figures: Mapping[str, str]) -> str:
    """The whole report as markdown (figures referenced by file name)."""
    models = metrics.get("models", {})
    preset = cfg.preset if cfg is not None and cfg.preset else "?"
    parts = [f"# sskd report: run `{run_dir.name}`",
             f"preset `{preset}`, built {time.strftime('%Y-%m-%d %H:%M')}, from `{run_dir.root}`."]
    if not teacher_is_pretrained(cfg):
        from sskd.stages.checks import missing_teacher_weights
        empty = ", ".join(f"`{s}`" for s, _ in missing_teacher_weights(cfg.teacher))
        parts.append(f"**The teacher has no pretrained weights** ({empty} empty, and it is not "
                     "the offline stand-in): its \"zero-shot\" row is a randomly initialised "
                     "network, so the teacher claims below are not graded. Set those keys to the "
                     "foundation model's local weights (README, 'Your own data').")
    parts += ["## Results (the paper's Table 1 shape, mask AP on val)", results_table(models)]
    if cfg is not None and cfg.data.kind == "cityscapes" and not any(
            "cityscapes_AP" in (m or {}) for m in models.values()):
        from sskd.evaluation.cityscapes_eval import INSTALL_HINT
        parts.append(f"The official Cityscapes AP was not computed: {INSTALL_HINT}.")
    if "teacher_1a" in models:
        m = models["teacher_1a"]
        parts.append(f"Teacher after stage 1a (`teacher_1a`): AP {fmt(m.get('AP'))}, "
                     f"AP50 {fmt(m.get('AP50'))}.")
    seeds = read_seed_noise(run_dir)
    parts += ["## Claims", claims_section(check_claims(metrics, cfg, seeds)),
              (f"Graded against the seed-to-seed spread measured over {len(seeds)} seeds "
               "(`seed_noise.json`, written by `benchmarks/seed_noise.py`): a gain is PASS when "
               "every seed's difference exceeds the larger spread of its two rows. "
               if len(seeds) >= 2 else
               "One seed: a difference below `evaluation.seed_noise_ap` = "
               f"{cfg.evaluation.seed_noise_ap if cfg is not None else NOISE_AP:g} AP (one short "
               "run's typical seed-to-seed spread) is WITHIN NOISE whatever its sign; "
               "`benchmarks/seed_noise.py --extra-run RUN_DIR` measures the spread and writes "
               "`seed_noise.json` into the run, which this report then uses. ") +
              "A >= claim holds when no seed's difference is below 0."]
    pc = per_class_table(models)
    if pc:
        parts += ["## Per-class AP", pc]
    pl = metrics.get("pseudo_labels", {})
    if pl:
        parts += ["## Pseudo-label quality on D_u (hidden ground truth, never used in training)",
                  pseudo_label_table(pl)]
        note = mask_refine_note(cfg)
        if note:
            parts.append(note)
    ab = ablations_section(metrics, cfg)
    parts += ["## Ablations", ab or "No ablations were run (config key `ablations`)."]
    eff = efficiency_table(metrics.get("efficiency", []))
    parts += ["## Efficiency", eff or "Not measured."]
    stages = metrics.get("stages", {})
    if stages:
        parts += ["## Stage wall time", markdown_table(
            ["stage", "seconds", "note"],
            [[s, fmt(stages[s].get("seconds")), "cached" if stages[s].get("cached") else ""]
             for s in _ordered(stages, STAGE_ORDER)]),
            "Times overlap: a stage's time includes the stand-in pretraining it triggered, and "
            "with `workers: 2` independent trainings (stand-in student, baselines, ablations) "
            "run in a side process during another stage; the executed notebooks in "
            "`notebooks/` hold each notebook's wall time."]
    if figures:
        parts.append("## Figures")
        parts += [f"![{cap}]({fname})" for cap, fname in figures.items()]
    parts.append("Raw numbers: [metrics.json](metrics.json).")
    return "\n\n".join(parts) + "\n"


def mask_refine_note(cfg: Config | None) -> str:
    """A sentence when the pseudo-labels' masks were post-processed (``pseudo_label.mask_refine``):
    what the table and the FiftyOne views show then is not the teacher's raw output."""
    if cfg is None or cfg.pseudo_label.mask_refine == "none":
        return ""
    p = cfg.pseudo_label
    return (f"Pseudo-label masks were refined before training (`pseudo_label.mask_refine: "
            f"{p.mask_refine}`, radius {p.refine_radius} px, eps {p.refine_eps:g}): the table "
            "above and the FiftyOne pseudo-label fields show the refined masks; every model's AP "
            "above scores its own, unrefined masks.")


def pseudo_label_table(pl: Mapping[str, Mapping]) -> str:
    """The pseudo-label section of ``metrics["pseudo_labels"]``: AP, and where a ``matching``
    entry exists (:func:`sskd.evaluation.instance_matching.match_instances`) whether masks or
    classes fail; a sentence saying so when nothing was measured (no hidden ground truth)."""
    from sskd.evaluation.instance_matching import top_confusions
    if not pl:
        return "D_u has no hidden ground truth here: pseudo-label quality is not measured."
    tags = _ordered(pl, MODEL_TAGS)
    if not any("matching" in pl[t] for t in tags):
        return markdown_table(["pseudo-labels of", "AP", "AP50"],
                              [[f"`{t}`", fmt(pl[t].get("AP")), fmt(pl[t].get("AP50"))]
                               for t in tags])
    rows = []
    for t in tags:
        m = pl[t].get("matching")
        if m is None:
            rows.append([f"`{t}`", fmt(pl[t].get("AP")), fmt(pl[t].get("AP50"))] + ["n/a"] * 5)
            continue
        conf = "; ".join(f"{a} as {b}: {n}" for a, b, n in top_confusions(m)) or "none"
        rows.append([f"`{t}`", fmt(pl[t].get("AP")), fmt(pl[t].get("AP50")),
                     fmt(m.get("mask_recall"), 0), fmt(m.get("mask_precision"), 0),
                     fmt(m.get("class_accuracy"), 0), fmt(m.get("majority_rate"), 0), conf])
    iou = next(pl[t]["matching"]["iou_threshold"] for t in tags if "matching" in pl[t])
    return (markdown_table(["pseudo-labels of", "AP", "AP50", "objects found (%)",
                            "masks on an object (%)", "right class (%)",
                            "majority-class rate (%)", "most frequent class errors"], rows) +
            f"\n\nMasks are matched to objects one-to-one at mask IoU >= {iou:g}, classes "
            "ignored. *Objects found*: matched objects / all objects; *masks on an object*: "
            "matched pseudo-labels / all pseudo-labels; *right class*: matched pseudo-labels "
            "whose class is the object's. A right class near the majority-class rate means the "
            "pseudo-labels teach outlines, not classes, even when the teacher's own AP is "
            "good: its evaluation ranks every class of each query, a pseudo-label keeps only "
            "the top one.")


def build_report(run: Any, figures: bool = True) -> Path:
    """Write ``report/report.md``, ``report.html``, the PNG figures and ``metrics.json`` of a
    run (a ``Run``, ``RunDir`` or run-dir path). Returns the path of ``report.md``."""
    run_dir, cfg = _resolve(run)
    if not run_dir.root.is_dir():
        raise FileNotFoundError(f"run dir {run_dir.root} does not exist; run the stages "
                                "(`sskd run --name NAME`) first")
    metrics = read_run_metrics(run_dir)
    out = run_dir.report
    out.mkdir(parents=True, exist_ok=True)
    figs = write_figures(run_dir, metrics, out) if figures else {}
    if run_dir.metrics.is_file():
        shutil.copyfile(run_dir.metrics, out / "metrics.json")
    else:
        write_json_atomic(metrics, out / "metrics.json", indent=2)
    md = report_markdown(run_dir, cfg, metrics, figs)
    _write_atomic(out / "report.md", md)
    _write_atomic(out / "report.html", markdown_to_html(md, title=f"sskd report: {run_dir.name}"))
    return out / "report.md"


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)


# --------------------------------------------------------------------------- markdown -> html

_CSS = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.2em .6em}"
        "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2em}")


_BULLET = re.compile(r"^\s*[-*]\s+")


def _inline(text: str) -> str:
    """Escape, then `code`, **bold**, ![alt](src) and [text](href)."""
    codes: list[str] = []

    def keep(m: re.Match) -> str:
        codes.append(f"<code>{html.escape(m.group(1))}</code>")
        return f"\x00{len(codes) - 1}\x00"

    text = html.escape(re.sub(r"`([^`]+)`", keep, text), quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    text = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)",
                  lambda m: f'<img alt="{m.group(1)}" src="{m.group(2)}">', text)
    text = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{m.group(2)}">{m.group(1)}</a>', text)
    return re.sub(r"\x00(\d+)\x00", lambda m: codes[int(m.group(1))], text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(md: str, title: str = "report") -> str:
    """The markdown subset the report uses (ATX headings, pipe tables, ``-`` lists, images,
    paragraphs, inline code/bold/links) -> a standalone HTML page."""
    lines, body, i = md.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif m := re.match(r"^(#{1,6})\s+(.*)$", line):
            n = len(m.group(1))
            body.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
            i += 1
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            rows = [r for r in block if not re.match(r"^\s*\|(\s*:?-+:?\s*\|)+\s*$", r)]
            head = "".join(f"<th>{_inline(c)}</th>" for c in _cells(rows[0]))
            trs = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(r)) + "</tr>"
                          for r in rows[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif _BULLET.match(line):
            items = []
            while i < len(lines) and _BULLET.match(lines[i]):
                items.append(f"<li>{_inline(_BULLET.sub('', lines[i]))}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(
                    r"^(#{1,6}\s|\s*\||\s*[-*]\s+)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            body.append(f"<p>{_inline(' '.join(para))}</p>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
