"""Figures of a run (matplotlib; every plotting function returns a ``Figure``) and the one
computed table behind them, :func:`pseudo_label_precision` (pseudo-label bias per class).

Inputs come from the run dir: ``logs/<tag>.jsonl`` (one dict per logged step), ``metrics.json``
and ImageRecord jsonl files (see :mod:`sskd.rundir`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from sskd.data.records import Dataset, ImageRecord, Instance, mask_iou
from sskd import graph
from sskd.rundir import MODEL_TAGS

log = logging.getLogger("sskd")

#: rows of the results table (the paper's Table 1): (model tag, label), from the stage graph
TABLE1_ROWS = graph.table1_rows()
#: display label of every model tag
TAG_LABELS = {m.tag: m.label for m in graph.MODELS}
LOSS_TERMS = ("loss", "loss_sup", "loss_semi", "loss_pxl")
EFFICIENCY_KEYS = (("params_M", "params (M)"), ("gflops", "GFLOPs"), ("latency_ms", "latency (ms)"),
                   ("throughput_img_s", "throughput (img/s)"), ("peak_mem_MB", "peak memory (MB)"))


# --------------------------------------------------------------------------- logs


def read_log(path: str | Path) -> list[dict]:
    """``logs/<tag>.jsonl`` -> list of step dicts ([] when missing; a torn last line is dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: skipped a malformed log line (a killed writer leaves one)", path)
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def load_logs(run_root: str | Path, tags: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Non-empty logs of a run dir, keyed by tag, in pipeline order (``MODEL_TAGS`` first)."""
    logs_dir = Path(run_root) / "logs"
    names = list(tags) if tags is not None else sorted(
        (p.stem for p in logs_dir.glob("*.jsonl")),
        key=lambda n: (MODEL_TAGS.index(n) if n in MODEL_TAGS else len(MODEL_TAGS), n))
    out = {n: read_log(logs_dir / f"{n}.jsonl") for n in names}
    return {n: rows for n, rows in out.items() if rows}


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_curves(logs: Mapping[str, list[dict]], terms: Sequence[str] = LOSS_TERMS) -> Figure:
    """One panel per stage log, one line per loss term present in it (``loss`` = weighted J)."""
    names = [n for n in logs if logs[n]]
    fig = Figure(figsize=(4.2 * max(1, len(names)), 3.2), layout="constrained")
    if not names:
        _empty(fig.add_subplot(), "no training logs yet")
        return fig
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        for term in terms:
            x, y = _series(logs[name], term)
            if x:
                ax.plot(x, y, label=term, lw=1.8 if term == "loss" else 1.2)
        ax.set(title=name, xlabel="step", ylabel="loss" if i == 0 else None)
        ax.legend(fontsize=8)
    return fig


def margin_fnr_curves(logs: Mapping[str, list[dict]]) -> Figure:
    """The paper's Fig. 3 (docs/method.md, 'Diagnostics'): margin Delta (mean negative - mean positive distance) and the
    false-negative rate of sampled negatives vs step, one line per stage that used L_pxl.

    The FNR panel has a dashed reference at 0.5 (the margin-growth proposition needs
    p = 1 - FNR > 0.5).
    """
    fig = Figure(figsize=(9, 3.2), layout="constrained")
    ax_m, ax_f = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, rows in logs.items():
        for ax, key in ((ax_m, "margin"), (ax_f, "fnr")):
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, label=name)
    ax_m.set(title="margin Δ", xlabel="step")
    ax_f.set(title="false-negative rate of negatives", xlabel="step", ylim=(0, 1))
    ax_f.axhline(0.5, ls="--", c="grey", lw=1, label="p = 0.5 bound")
    for ax in (ax_m, ax_f):
        if ax.lines:
            ax.legend(fontsize=8)
    if not ax_m.lines:
        _empty(ax_m, "no L_pxl diagnostics logged")
    return fig


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


# --------------------------------------------------------------------------- pseudo-label bias


def _bin_edges(bins: int | Sequence[float]) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, int(bins) + 1) if isinstance(bins, int) else np.asarray(bins, float)
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"bins must be a positive count or increasing edges, got {bins!r}")
    return edges


def _match_image(preds: list[Instance], gts: list[Instance], iou: float) -> list[tuple[float, bool]]:
    """Greedy COCO-style matching of one class in one image: predictions by descending score,
    each to the best still-unmatched ground truth with IoU >= ``iou``. -> [(score, is_tp)]."""
    preds = sorted(preds, key=lambda i: -(1.0 if i.score is None else i.score))
    scores = [1.0 if p.score is None else float(p.score) for p in preds]
    if not gts:
        return [(s, False) for s in scores]
    ious = mask_iou(preds, gts)
    taken = np.zeros(len(gts), bool)
    out = []
    for d, s in enumerate(scores):
        cand = np.where(~taken & (ious[d] >= iou))[0]
        if len(cand):
            taken[cand[np.argmax(ious[d, cand])]] = True
        out.append((s, bool(len(cand))))
    return out


def pseudo_label_precision(pred_records: Iterable[ImageRecord], gt_dataset: Dataset,
                           iou: float = 0.5, bins: int | Sequence[float] = 10) -> list[dict]:
    """Confidence vs precision of predicted instances per class (the pseudo-label bias view).

    A prediction is a true positive when it matches a same-class ground-truth instance with
    mask IoU >= ``iou`` (pycocotools ``maskUtils.iou``; greedy by score, one match per ground
    truth; crowd ground truth is ignored). Predictions of images missing from ``gt_dataset``
    are skipped, counted and logged.

    Returns one row per (class, confidence bin): ``{"class_id", "class", "bin", "lo", "hi",
    "count", "tp", "precision", "mean_score"}`` (precision/mean_score NaN for empty bins), then
    one row per class with ``"bin": "all"`` that also holds ``"num_gt"``, ``"recall"`` and
    ``"gap"`` = mean_score - precision (> 0: the teacher is over-confident on that class).
    """
    edges = _bin_edges(bins)
    nb, classes = len(edges) - 1, list(gt_dataset.classes)
    gt_by_id = gt_dataset.by_id()
    hits: dict[int, list[tuple[float, bool]]] = {c: [] for c in range(len(classes))}
    num_gt = np.zeros(len(classes), int)
    seen, skipped = set(), 0
    for rec in pred_records:
        gt = gt_by_id.get(rec.image_id)
        if gt is None:
            skipped += 1
            continue
        seen.add(rec.image_id)
        for c in range(len(classes)):
            preds = [i for i in rec.instances if i.class_id == c]
            gts = [i for i in gt.instances if i.class_id == c and not i.iscrowd]
            num_gt[c] += len(gts)
            if preds:
                hits[c].extend(_match_image(preds, gts, iou))
    if skipped:
        log.warning("pseudo_label_precision: skipped %d prediction record(s) whose image_id is "
                    "not in ground-truth dataset %r", skipped, gt_dataset.name)
    rows, summary = [], []
    for c, name in enumerate(classes):
        s = np.array([h[0] for h in hits[c]], float)
        tp = np.array([h[1] for h in hits[c]], bool)
        idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, nb - 1)
        for b in range(nb):
            sel = idx == b
            n = int(sel.sum())
            rows.append({"class_id": c, "class": name, "bin": b, "lo": float(edges[b]),
                         "hi": float(edges[b + 1]), "count": n, "tp": int(tp[sel].sum()),
                         "precision": float(tp[sel].mean()) if n else math.nan,
                         "mean_score": float(s[sel].mean()) if n else math.nan})
        n = len(s)
        prec = float(tp.mean()) if n else math.nan
        mean_s = float(s.mean()) if n else math.nan
        summary.append({"class_id": c, "class": name, "bin": "all", "lo": float(edges[0]),
                        "hi": float(edges[-1]), "count": n, "tp": int(tp.sum()),
                        "precision": prec, "mean_score": mean_s, "num_gt": int(num_gt[c]),
                        "recall": float(tp.sum() / num_gt[c]) if num_gt[c] else math.nan,
                        "gap": mean_s - prec if n else math.nan})
    return rows + summary


def confidence_precision(table: list[dict]) -> Figure:
    """Plot :func:`pseudo_label_precision`: precision vs mean confidence per bin, one line per
    class, and the diagonal (a calibrated teacher lies on it; below it = over-confident)."""
    fig = Figure(figsize=(5, 4), layout="constrained")
    ax = fig.add_subplot()
    if not any(r.get("num_gt") for r in table):
        _empty(ax, "no ground truth for these images: the bias view needs labels\n"
                   "(the synthetic benchmark keeps D_u's hidden ground truth)")
        return fig
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="calibrated")
    per_class: dict[str, list[dict]] = {}
    for r in table:
        if r["bin"] != "all" and r["count"] > 0:
            per_class.setdefault(r["class"], []).append(r)
    for name, rs in per_class.items():
        ax.plot([r["mean_score"] for r in rs], [r["precision"] for r in rs], marker="o", label=name)
    ax.set(xlabel="confidence (mean score in bin)", ylabel="precision @ IoU", xlim=(0, 1),
           ylim=(0, 1.02), title="pseudo-label confidence vs precision")
    ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- results


def ap_per_stage(models: Mapping[str, dict], tags: Sequence[str] | None = None,
                 keys: Sequence[str] = ("AP", "AP50")) -> Figure:
    """Grouped bars: one group per model tag present in ``models`` (default: the Table-1 rows,
    in their order), one bar per metric key."""
    tags = [t for t, _ in TABLE1_ROWS] if tags is None else list(tags)
    present = [(t, TAG_LABELS.get(t, t)) for t in tags if t in models]
    fig = Figure(figsize=(max(5, 1.5 * len(present) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    if not present:
        _empty(ax, "no evaluated models yet")
        return fig
    width = 0.8 / len(keys)
    x = np.arange(len(present))
    for k, key in enumerate(keys):
        vals = [float(models[t].get(key, math.nan)) for t, _ in present]
        bars = ax.bar(x + (k - (len(keys) - 1) / 2) * width, vals, width, label=key)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [label.replace(", ", ",\n").replace(" after ", "\nafter ")
                      for _, label in present], fontsize=8)
    ax.set(ylabel="mask AP", title="mask AP per stage")
    ax.legend(fontsize=8)
    return fig


def efficiency_bars(efficiency: Sequence[Mapping[str, Any]]) -> Figure:
    """One panel per efficiency metric present, one bar per model (teacher vs student);
    ratio rows (``is_ratio``) are left out."""
    efficiency = [e for e in efficiency if not e.get("is_ratio")]
    keys = [(k, lab) for k, lab in EFFICIENCY_KEYS if any(e.get(k) is not None for e in efficiency)]
    fig = Figure(figsize=(2.6 * max(1, len(keys)), 3.0), layout="constrained")
    if not keys:
        _empty(fig.add_subplot(), "no efficiency measurements")
        return fig
    names = [str(e.get("name", e.get("model", f"model {i}"))) for i, e in enumerate(efficiency)]
    colors = [f"C{i}" for i in range(len(names))]
    for i, (key, label) in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        vals = [float(e[key]) if e.get(key) is not None else math.nan for e in efficiency]
        bars = ax.bar(names, vals, color=colors)
        ax.bar_label(bars, fmt="{:.4g}", fontsize=7)
        ax.set_title(label, fontsize=9)
    return fig


# --------------------------------------------------------------------------- images


def class_color(class_id: int) -> tuple[float, float, float]:
    from matplotlib import colormaps
    return tuple(colormaps["tab10"](class_id % 10)[:3])


def overlay_masks(image: np.ndarray, instances: Sequence[Instance], alpha: float = 0.45) -> np.ndarray:
    """``H x W x 3`` uint8 image with each instance mask blended in its class colour."""
    out = image.astype(np.float32).copy()
    h, w = image.shape[:2]
    for inst in instances:
        m = inst.mask().astype(bool)
        if m.shape != (h, w):  # masks are stored at the image's size; tolerate a resized image
            from PIL import Image
            m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
        out[m] = (1 - alpha) * out[m] + alpha * 255 * np.asarray(class_color(inst.class_id))
    return out.clip(0, 255).astype(np.uint8)


def draw_instances(ax: Any, image: np.ndarray, instances: Sequence[Instance],
                   classes: Sequence[str] | None = None, score_threshold: float = 0.0,
                   title: str | None = None, alpha: float = 0.45) -> int:
    """Draw ``image`` (``H x W x 3`` uint8) with instance masks, boxes and labels on ``ax``.

    Instances with a score below ``score_threshold`` are left out (ground truth has no score
    and is always drawn). Returns the number of instances drawn.
    """
    shown = [i for i in instances if i.score is None or i.score >= score_threshold]
    ax.imshow(overlay_masks(image, shown, alpha))
    for inst in shown:
        x, y, w, h = inst.bbox
        color = class_color(inst.class_id)
        ax.add_patch(Rectangle((x, y), w, h, fill=False, ec=color, lw=1))
        name = classes[inst.class_id] if classes and inst.class_id < len(classes) else str(inst.class_id)
        label = name if inst.score is None else f"{name} {inst.score:.2f}"
        ax.text(x, y, label, fontsize=6, color="white", va="bottom",
                bbox={"facecolor": color, "alpha": 0.8, "pad": 0.5, "lw": 0})
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return len(shown)


def record_image(record: ImageRecord) -> np.ndarray:
    """Pixels of a record (``H x W x 3`` uint8) via :func:`sskd.data.images.load_image`."""
    from sskd.data.images import load_image
    return load_image(record.file_name)


def image_grid(records: Sequence[ImageRecord], classes: Sequence[str] | None = None, n: int = 8,
               cols: int = 4, title: str | None = None, score_threshold: float = 0.0) -> Figure:
    """The first ``n`` records drawn with their instances, ``cols`` per row."""
    records = list(records)[:n]
    rows = max(1, math.ceil(len(records) / cols))
    fig = Figure(figsize=(2.2 * cols, 2.3 * rows + (0.3 if title else 0)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, rec in zip(axes, records):
        draw_instances(ax, record_image(rec), rec.instances, classes, score_threshold,
                       title=f"#{rec.image_id} ({len(rec.instances)})")
    for ax in axes[len(records):]:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig
