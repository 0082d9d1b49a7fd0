"""Notebook widgets (ipywidgets). They construct and update without a browser: figures are
drawn with matplotlib into PNG bytes shown by an ``ipywidgets.Image``, so tests (and batch runs)
can drive ``.value`` and read back what would be displayed.

Progress: the training engine and the inference writer use ``tqdm.auto``, which renders as a
live widget bar in Jupyter and as text in papermill logs; :func:`live_progress` makes the same
kind of bar for notebook code.
"""

from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import ipywidgets as W
import numpy as np
from matplotlib.figure import Figure

from sskd import graph
from sskd.config import Config
from sskd.data.records import Dataset, ImageRecord


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- pseudo-label browser


class PseudoLabelBrowser(W.VBox):
    """Image slider + confidence-threshold slider; teacher pseudo-labels beside ground truth.

    Attributes: ``image_slider`` (``IntSlider``, index into the records), ``threshold_slider``
    (``FloatSlider``, instances scoring below it are hidden), ``image`` (``ipywidgets.Image``,
    PNG of the current view), ``figure`` (the matplotlib ``Figure`` drawn last), ``shown``
    (pseudo-labels drawn in the current view).
    """

    def __init__(self, records: Sequence[ImageRecord] | Dataset, gt: Dataset | Sequence[ImageRecord] | None = None,
                 classes: Sequence[str] | None = None, threshold: float = 0.3,
                 loader: Callable[[ImageRecord], np.ndarray] | None = None) -> None:
        from sskd.plots import record_image

        self.records = list(records.records if isinstance(records, Dataset) else records)
        if not self.records:
            raise ValueError("pseudo_label_browser: no records to browse (is the pseudo-label "
                             "file empty? run the zero-shot stage first)")
        self.classes = list(classes if classes is not None else
                            getattr(records, "classes", None) or getattr(gt, "classes", None) or [])
        gt_records = gt.records if isinstance(gt, Dataset) else (gt or [])
        self.gt = {r.image_id: r for r in gt_records}
        self.loader = loader or record_image
        self.image_slider = W.IntSlider(0, min=0, max=len(self.records) - 1, description="image",
                                        continuous_update=False)
        self.threshold_slider = W.FloatSlider(threshold, min=0.0, max=1.0, step=0.05,
                                              description="min score", continuous_update=False)
        self.image = W.Image(format="png")
        self.info = W.HTML()
        self.figure: Figure | None = None
        self.shown = 0
        for s in (self.image_slider, self.threshold_slider):
            s.observe(lambda _change: self.render(), names="value")
        super().__init__([W.HBox([self.image_slider, self.threshold_slider]), self.info, self.image])
        self.render()

    def render(self) -> None:
        """Redraw the current image at the current threshold."""
        from sskd.plots import draw_instances

        rec = self.records[self.image_slider.value]
        gt = self.gt.get(rec.image_id)
        pixels = self.loader(rec)
        fig = Figure(figsize=(7 if gt is not None else 3.6, 3.6), layout="constrained")
        axes = fig.subplots(1, 2 if gt is not None else 1, squeeze=False).ravel()
        thr = self.threshold_slider.value
        self.shown = draw_instances(axes[0], pixels, rec.instances, self.classes, thr,
                                    title=f"teacher (score >= {thr:.2f})")
        n_gt = draw_instances(axes[1], pixels, gt.instances, self.classes,
                              title="ground truth") if gt is not None else None
        self.figure = fig
        self.image.value = _png(fig)
        self.info.value = (f"image #{rec.image_id} ({rec.file_name}): {self.shown} of "
                           f"{len(rec.instances)} pseudo-labels shown"
                           + (f", {n_gt} ground-truth instances" if n_gt is not None else ""))


def pseudo_label_browser(records: Sequence[ImageRecord] | Dataset, gt: Dataset | None = None,
                         classes: Sequence[str] | None = None, threshold: float = 0.3,
                         loader: Callable[[ImageRecord], np.ndarray] | None = None) -> PseudoLabelBrowser:
    """Browse teacher pseudo-labels (``ImageRecord`` with scores) against ground truth
    (matched by ``image_id``; pass ``gt=None`` when there is none). ``loader(record)`` returns
    ``H x W x 3`` uint8 pixels (default: the record's image file)."""
    return PseudoLabelBrowser(records, gt, classes, threshold, loader)


# --------------------------------------------------------------------------- loss-weight picker

#: the paper's stages whose loss weights the picker exposes: (config key, label), from the graph
WEIGHTED_STAGES = tuple((m.config_key, m.label) for m in graph.MODELS if m.kind == "stage")
#: baselines the picker can switch on/off
BASELINE_STAGES = tuple((m.config_key, m.label) for m in graph.MODELS if m.kind == "baseline")
SLIDER_MAX = {"l_semi": 2.0, "l_pxl": 1.0}  # slider ranges (the paper sweeps l_pxl up to 0.5)


class LossWeightPicker(W.VBox):
    """Stage on/off checkboxes and l_semi / l_pxl sliders -> config overrides.

    ``overrides`` holds only what differs from the given config, as dotted keys
    (``{"stages.transfer.l_pxl": 0.2}``): pass it to ``open_run(..., overrides=...)`` or as
    ``-p`` options of ``sskd run``. The picker changes nothing by itself (inert in batch runs).
    """

    def __init__(self, cfg: Config, run_name: str | None = None) -> None:
        self.cfg = cfg
        self.run_name = run_name or cfg.run_name
        self.enabled: dict[str, W.Checkbox] = {}
        self.sliders: dict[str, W.FloatSlider] = {}
        rows = []
        for name, label in WEIGHTED_STAGES + BASELINE_STAGES:
            sc = getattr(cfg.stages, name)
            box = W.Checkbox(sc.enabled, description=label, indent=False,
                             layout=W.Layout(width="16em"))
            self.enabled[name] = box
            row = [box]
            if name in dict(WEIGHTED_STAGES):
                for term in ("l_semi", "l_pxl"):
                    value = float(getattr(sc, term))
                    s = W.FloatSlider(value, min=0.0, max=max(SLIDER_MAX[term], value), step=0.01,
                                      description=term, readout_format=".2f", continuous_update=False)
                    self.sliders[f"{name}.{term}"] = s
                    row.append(s)
            rows.append(W.HBox(row))
        self.summary = W.HTML()
        for w in list(self.enabled.values()) + list(self.sliders.values()):
            w.observe(lambda _change: self._update(), names="value")
        super().__init__(rows + [self.summary])
        self._update()

    @property
    def overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, box in self.enabled.items():
            if box.value != getattr(self.cfg.stages, name).enabled:
                out[f"stages.{name}.enabled"] = bool(box.value)
        for key, s in self.sliders.items():
            name, term = key.split(".")
            value = round(float(s.value), 4)
            if value != round(float(getattr(getattr(self.cfg.stages, name), term)), 4):
                out[f"stages.{name}.{term}"] = value
        return out

    def objective(self, stage: str) -> str:
        """The stage's objective J with the picked weights, as text."""
        semi = self.sliders[f"{stage}.l_semi"].value
        pxl = self.sliders[f"{stage}.l_pxl"].value
        return f"J = L_sup + {semi:.2f}·L_semi + {pxl:.2f}·L_pxl"

    def _update(self) -> None:
        lines = []
        for name, label in WEIGHTED_STAGES:
            state = self.objective(name) if self.enabled[name].value else "off"
            lines.append(f"<li>{label} (<code>stages.{name}</code>): {state}</li>")
        for name, label in BASELINE_STAGES:
            lines.append(f"<li>{label} (<code>stages.{name}</code>): "
                         f"{'on' if self.enabled[name].value else 'off'}</li>")
        ov = self.overrides
        cmd = " ".join(f"-p {k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in ov.items())
        # sskd run re-executes the notebook owning the first changed key and every later one
        steps = [s.name for s in graph.STEPS]
        first = min((steps.index(graph.config_step(k)) for k in ov), default=0)
        nb = graph.STEPS[first].notebook
        self.summary.value = (
            "<ul>" + "".join(lines) + "</ul>"
            + (f"<p>overrides: <code>{ov}</code><br>batch: <code>sskd run --name {self.run_name} "
               f"{cmd}</code> (re-executes {nb} and the notebooks after it)</p>"
               if ov else "<p>no changes to the config</p>"))


def loss_weight_picker(cfg: Config, run_name: str | None = None) -> LossWeightPicker:
    """Checkboxes (stage on/off) and l_semi/l_pxl sliders over ``cfg``; read ``.overrides``."""
    return LossWeightPicker(cfg, run_name)


# --------------------------------------------------------------------------- progress


def live_progress(total: int, desc: str = "", **kwargs: Any):
    """A ``tqdm.auto`` bar (a widget in Jupyter, text elsewhere), as the engine uses: call
    ``.update(n)``, ``.set_postfix(loss=...)`` and ``.close()`` on it."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, **kwargs)
