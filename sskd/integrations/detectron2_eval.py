"""Evaluate sskd predictions with detectron2's own evaluators.

* ``evaluator="coco"``: ``COCOEvaluator`` on the ground truth registered as a detectron2
  dataset (converted to COCO json in a temp dir). It computes the same pycocotools COCOeval as
  :func:`sskd.evaluation.coco_eval.evaluate_masks`, so the numbers agree (tested); the fast C++
  COCOeval is used only when detectron2 was built with its compiled ops.
* ``evaluator="cityscapes"``: ``CityscapesInstanceEvaluator`` (the official Cityscapes
  instance-level AP / AP50, computed by ``cityscapesscripts`` against the ``*_gtFine_instanceIds.png``
  files under ``gt_dir``). It needs ``pip install cityscapesscripts`` and a Cityscapes-layout
  ground truth with Cityscapes class names; otherwise a clear error says what is missing.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import logging
import math
import sys
import tempfile
import types
from pathlib import Path
from typing import Sequence

from sskd.integrations.detectron2_require import compiled_ops_available, require_detectron2

require_detectron2()

import numpy as np  # noqa: E402
from detectron2.structures import Instances  # noqa: E402

from sskd.data.records import Dataset, ImageRecord, Instance  # noqa: E402
# the numpy-2 shims of cityscapesscripts live with sskd's own (detectron2-free) Cityscapes AP
from sskd.evaluation.cityscapes_eval import INSTALL_HINT, cityscapes_available  # noqa: E402,F401
from sskd.evaluation.cityscapes_eval import cityscapes_numpy2 as _cityscapes_numpy2  # noqa: E402
from sskd.integrations.detectron2_convert import record_to_instances  # noqa: E402
from sskd.integrations.detectron2_data import register_dataset, unregister  # noqa: E402

log = logging.getLogger(__name__)

_COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_counter = itertools.count()


def _check_predictions(gt: Dataset, pred: Dataset | Sequence[ImageRecord]) -> dict[int, ImageRecord]:
    records = pred.records if isinstance(pred, Dataset) else list(pred)
    if isinstance(pred, Dataset) and list(pred.classes) != list(gt.classes):
        raise ValueError(f"prediction classes {pred.classes} differ from ground-truth classes {gt.classes}")
    index = gt.by_id()
    by_id: dict[int, ImageRecord] = {}
    for rec in records:
        if rec.image_id not in index:
            raise ValueError(f"prediction for image id {rec.image_id} ({rec.file_name}) that is not in "
                             f"the ground truth {gt.name!r}")
        if rec.image_id in by_id:
            raise ValueError(f"predictions hold image id {rec.image_id} twice: merge its instances")
        g = index[rec.image_id]
        for inst in rec.instances:
            if inst.score is None:
                raise ValueError(f"prediction for image {rec.image_id}: an instance has no score")
            if not 0 <= inst.class_id < len(gt.classes):
                raise ValueError(f"prediction for image {rec.image_id}: class_id {inst.class_id} "
                                 f"outside 0..{len(gt.classes) - 1}")
            if [int(v) for v in inst.segmentation["size"]] != [g.height, g.width]:
                raise ValueError(f"prediction for image {rec.image_id}: mask size "
                                 f"{inst.segmentation['size']} != image size {[g.height, g.width]}")
        by_id[rec.image_id] = rec
    return by_id


def _pred_instances(gt_rec: ImageRecord, pred: ImageRecord | None) -> Instances:
    if pred is not None and pred.instances:
        return record_to_instances(pred, as_prediction=True)
    return record_to_instances(gt_rec.without_instances(), as_prediction=True)


def evaluate_with_detectron2(gt: Dataset, pred: Dataset | Sequence[ImageRecord], *,
                             evaluator: str = "coco", iou_type: str = "segm",
                             use_fast_impl: bool | None = None, gt_dir: str | Path | None = None,
                             output_dir: str | Path | None = None,
                             dataset_name: str | None = None) -> dict:
    """Evaluate ``pred`` (records with scored instances) against ``gt`` with a detectron2 evaluator.

    Args:
        gt: ground truth; every one of its images is evaluated (no prediction = all missed).
        pred: predicted records, masks at the ground-truth image sizes.
        evaluator: "coco" or "cityscapes".
        iou_type: "segm" or "bbox" (COCO only).
        use_fast_impl: COCO only; default: detectron2's C++ COCOeval when its compiled ops exist.
        gt_dir: Cityscapes only: ``<root>/gtFine/<split>`` (default: the ``gt_dir`` inferred from
            the first record, ``.../leftImg8bit/<split>/<city>/x.png`` -> ``.../gtFine/<split>``).
        output_dir: keep detectron2's files (COCO json, results) here instead of a temp dir.
        dataset_name: name to register ``gt`` under (default: a fresh ``sskd_eval_<n>``,
            unregistered afterwards).

    Returns COCO: ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {name: AP},
    "num_images", "num_predictions", "iou_type", "evaluator"}`` (percent, NaN where undefined).
    Cityscapes: ``{"AP", "AP50", "num_images", "num_predictions", "evaluator"}``.
    """
    if evaluator not in ("coco", "cityscapes"):
        raise ValueError(f"evaluator must be 'coco' or 'cityscapes', got {evaluator!r}")
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
    if not gt.records:
        raise ValueError(f"ground truth {gt.name!r} has no images to evaluate on")
    by_id = _check_predictions(gt, pred)
    n_pred = sum(len(r.instances) for r in by_id.values())
    name = dataset_name or f"sskd_eval_{next(_counter)}"
    if evaluator == "cityscapes":
        res = _cityscapes(gt, by_id, name, gt_dir)
    else:
        res = _coco(gt, by_id, name, iou_type, use_fast_impl, output_dir)
    res.update(num_images=len(gt.records), num_predictions=n_pred, evaluator=evaluator)
    if dataset_name is None:
        unregister(name)
    return res


def _run(ev, gt: Dataset, by_id: dict[int, ImageRecord]) -> dict:
    ev.reset()
    for rec in gt.records:
        inputs = [{"image_id": rec.image_id, "file_name": rec.file_name, "height": rec.height,
                   "width": rec.width}]
        ev.process(inputs, [{"instances": _pred_instances(rec, by_id.get(rec.image_id))}])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # pycocotools / cityscapesscripts print progress
        out = ev.evaluate()
    log.debug("evaluator output:\n%s", buf.getvalue())
    return out


def _coco(gt: Dataset, by_id: dict[int, ImageRecord], name: str, iou_type: str,
          use_fast_impl: bool | None, output_dir: str | Path | None) -> dict:
    from detectron2.evaluation import COCOEvaluator
    if use_fast_impl is None:
        use_fast_impl = compiled_ops_available()
    register_dataset(name, gt, kind="val")
    if not any(r.instances for r in by_id.values()):
        # COCOEvaluator reports NaN when there is no prediction at all; one empty-mask false
        # positive (IoU 0 with everything, so no AP can change) makes it compute COCO's numbers
        # (0 for classes with ground truth), as sskd's evaluate_masks does.
        first = gt.records[0]
        blank = Instance.from_mask(np.zeros((first.height, first.width), np.uint8), 0, score=1e-6)
        by_id = {**by_id, first.image_id: ImageRecord(first.file_name, first.height, first.width,
                                                      first.image_id, [blank])}
    with contextlib.ExitStack() as stack:
        out_dir = str(output_dir) if output_dir else stack.enter_context(tempfile.TemporaryDirectory())
        ev = COCOEvaluator(name, tasks=(iou_type,), distributed=False, output_dir=out_dir,
                           use_fast_impl=use_fast_impl, allow_cached_coco=False)
        out = _run(ev, gt, by_id)
    raw = out[iou_type]
    res = {k: float(raw[k]) for k in _COCO_KEYS}
    res["per_class"] = {c: float(raw.get(f"AP-{c}", math.nan)) for c in gt.classes}
    res["iou_type"] = iou_type
    return res


# --------------------------------------------------------------------------- Cityscapes

_INTERNAL = "deeplearning.projects.cityscapesApi.cityscapesscripts"


@contextlib.contextmanager
def _cityscapes_import_alias():
    """Make ``cityscapesscripts`` importable under the path some detectron2 versions use.

    detectron2's main branch (since Dec 2024) imports
    ``deeplearning.projects.cityscapesApi.cityscapesscripts`` (a path internal to Meta) in
    ``CityscapesInstanceEvaluator``; released versions import ``cityscapesscripts``. While the
    evaluator runs, the internal names are aliased to the installed package, then removed.
    """
    try:
        importlib.import_module(_INTERNAL + ".helpers.labels")
        native = True
    except ImportError:
        native = False
    if native:
        yield
        return
    subs = ("", ".helpers", ".helpers.labels", ".evaluation", ".evaluation.evalInstanceLevelSemanticLabeling")
    added = []
    for parent in ("deeplearning", "deeplearning.projects", "deeplearning.projects.cityscapesApi"):
        if parent not in sys.modules:
            sys.modules[parent] = types.ModuleType(parent)
            added.append(parent)
    for s in subs:
        sys.modules[_INTERNAL + s] = importlib.import_module("cityscapesscripts" + s)
        added.append(_INTERNAL + s)
    for full in added:  # parent.attr = child, as a real import would set
        parent, _, leaf = full.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], leaf, sys.modules[full])
    try:
        yield
    finally:
        for full in reversed(added):
            sys.modules.pop(full, None)


def _default_gt_dir(gt: Dataset) -> Path:
    p = Path(gt.records[0].file_name).resolve()
    parts = p.parts
    if "leftImg8bit" not in parts:
        raise ValueError(f"cannot infer the Cityscapes gt_dir from {p}: pass gt_dir=<root>/gtFine/<split>")
    i = parts.index("leftImg8bit")
    return Path(*parts[:i], "gtFine", parts[i + 1])


def _cityscapes(gt: Dataset, by_id: dict[int, ImageRecord], name: str, gt_dir: str | Path | None) -> dict:
    if not cityscapes_available():
        raise ImportError(f"the Cityscapes evaluator needs cityscapesscripts: {INSTALL_HINT} "
                          "(or use evaluator='coco')")
    from cityscapesscripts.helpers.labels import name2label
    unknown = [c for c in gt.classes if c not in name2label]
    if unknown:
        raise ValueError(f"classes {unknown} are not Cityscapes label names; the Cityscapes "
                         "evaluator only applies to Cityscapes data (use evaluator='coco')")
    gt_dir = Path(gt_dir) if gt_dir is not None else _default_gt_dir(gt)
    if not any(gt_dir.glob("*/*_gtFine_instanceIds.png")):
        raise FileNotFoundError(f"no */*_gtFine_instanceIds.png under gt_dir={gt_dir}: point it at "
                                "<cityscapes root>/gtFine/<split>")
    from detectron2.evaluation import CityscapesInstanceEvaluator
    register_dataset(name, gt, kind="val", gt_dir=str(gt_dir))
    with tempfile.TemporaryDirectory() as work, _cityscapes_import_alias(), _cityscapes_numpy2(work):
        out = _run(CityscapesInstanceEvaluator(name), gt, by_id)
    return {"AP": float(out["segm"]["AP"]), "AP50": float(out["segm"]["AP50"])}
