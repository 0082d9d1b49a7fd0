"""The official Cityscapes instance-level AP / AP50 of sskd predictions (``cityscapesscripts``).

The stages call :func:`evaluate_cityscapes` beside COCO mask AP when ``data.kind: cityscapes``.
It runs ``cityscapesscripts``' own matching and AP code (``evalInstanceLevelSemanticLabeling``:
overlaps 0.5:0.95, minimum region 100 px, void and crowd handling of the official benchmark)
against the ``*_gtFine_instanceIds.png`` files of the evaluated images, with predictions written
in its result format (one binary PNG per instance and a ``<image>_pred.txt`` index). It needs
only the optional extra ``sskd[cityscapes]``, not detectron2 (whose evaluator does the same with
the same package, :mod:`sskd.integrations.detectron2_eval`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from sskd.data.records import Dataset, ImageRecord

#: how to get the evaluator, in every message that says it is missing
INSTALL_HINT = "pip install 'sskd[cityscapes]' (cityscapesscripts==2.3.0)"
_MODULE = "cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling"


def cityscapes_available() -> bool:
    """True when ``cityscapesscripts`` (the official evaluation code) is importable."""
    return importlib.util.find_spec("cityscapesscripts") is not None


@contextlib.contextmanager
def cityscapes_numpy2(workdir: str | Path):
    """Run cityscapesscripts (2.3.0, written for numpy 1) under numpy 2, in ``workdir``.

    Scoped workarounds, all undone on exit: ``np.in1d`` (removed in numpy 2.4) is provided;
    its JSON writer gets a fallback for numpy scalars (numpy 2 returns them where numpy 1 gave
    Python ints); the current directory is ``workdir`` because it writes ``matches.json`` there.
    """
    ev = importlib.import_module(_MODULE)

    def write_json(obj, file_name):
        def default(o):
            return o.item() if isinstance(o, np.generic) else o.__dict__
        with open(file_name, "w") as f:
            f.write(json.dumps(obj, default=default, sort_keys=True, indent=4))

    added_in1d = not hasattr(np, "in1d")
    if added_in1d:
        np.in1d = lambda a, b, assume_unique=False, invert=False: np.isin(  # flattened, as in1d
            a, b, assume_unique=assume_unique, invert=invert).ravel()
    writer = ev.writeDict2JSON
    ev.writeDict2JSON = write_json
    try:
        with contextlib.chdir(workdir):
            yield ev
    finally:
        ev.writeDict2JSON = writer
        if added_in1d:
            del np.in1d


def gt_file(record: ImageRecord) -> Path:
    """``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` -> its
    ``root/gtFine/<split>/<city>/<name>_gtFine_instanceIds.png``."""
    p = Path(record.file_name)
    parts = p.parts
    if "leftImg8bit" not in parts or not p.name.endswith("_leftImg8bit.png"):
        raise ValueError(f"{p} is not a Cityscapes leftImg8bit/<split>/<city>/*_leftImg8bit.png "
                         "image: the Cityscapes AP needs the Cityscapes layout (data.kind: "
                         "cityscapes)")
    i = len(parts) - 1 - parts[::-1].index("leftImg8bit")
    name = p.name[:-len("_leftImg8bit.png")] + "_gtFine_instanceIds.png"
    return Path(*parts[:i], "gtFine", *parts[i + 1:-1], name)


def _write_predictions(gt: Dataset, preds: dict[int, ImageRecord], label_ids: list[int],
                       out: Path) -> list[str]:
    """One ``<name>_pred.txt`` per image (``masks/<name>_<k>.png <label id> <score>`` lines)."""
    (out / "masks").mkdir(parents=True, exist_ok=True)
    files = []
    for rec in gt.records:
        stem = Path(rec.file_name).name[:-len("_leftImg8bit.png")]
        lines = []
        pred = preds.get(rec.image_id)
        for k, inst in enumerate(pred.instances if pred is not None else []):
            mask = inst.mask()
            if mask.shape != (rec.height, rec.width):
                raise ValueError(f"prediction for {rec.file_name}: mask {mask.shape} differs from "
                                 f"the image's {rec.height}x{rec.width}; map predictions back to "
                                 "the original resolution first")
            name = f"masks/{stem}_{k}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / name)
            lines.append(f"{name} {label_ids[inst.class_id]} {float(inst.score):.6f}\n")
        txt = out / f"{stem}_pred.txt"
        txt.write_text("".join(lines))
        files.append(str(txt.resolve()))
    return files


def evaluate_cityscapes(gt: Dataset, predictions: Dataset | Iterable[ImageRecord]) -> dict:
    """Official Cityscapes instance AP of ``predictions`` on the images of ``gt``.

    ``gt``: Cityscapes records (:func:`sskd.data.cityscapes.read_cityscapes`, or any records
    whose ``file_name`` lies in the Cityscapes layout, with the Cityscapes class names);
    ``predictions``: scored instances, masks at the original image size. Only ``gt``'s images
    are evaluated (a ``data.max_val`` subset is fine).

    Returns ``{"AP", "AP50", "per_class": {name: AP}, "num_images"}`` in percent (per-class NaN
    where a class has no ground truth or prediction). Raises ImportError naming
    :data:`INSTALL_HINT` without ``cityscapesscripts``.
    """
    if not cityscapes_available():
        raise ImportError(f"the official Cityscapes AP needs cityscapesscripts: {INSTALL_HINT}")
    from cityscapesscripts.helpers.labels import name2label
    unknown = [c for c in gt.classes if c not in name2label]
    if unknown:
        raise ValueError(f"classes {unknown} are not Cityscapes label names; the Cityscapes AP "
                         "only applies to Cityscapes data")
    if not gt.records:
        raise ValueError(f"ground truth {gt.name!r} has no images to evaluate on")
    label_ids = [name2label[c].id for c in gt.classes]
    records = predictions.records if isinstance(predictions, Dataset) else list(predictions)
    by_id = {r.image_id: r for r in records}
    gt_files = [str(gt_file(r).resolve()) for r in gt.records]
    missing = [f for f in gt_files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} gtFine files are missing, e.g. {missing[0]}: "
                                "unpack gtFine_trainvaltest.zip into data.root")
    with tempfile.TemporaryDirectory() as tmp, cityscapes_numpy2(tmp) as ev:
        pred_files = _write_predictions(gt, by_id, label_ids, Path(tmp))
        saved = dict(vars(ev.args))
        ev.args.predictionPath = str(Path(tmp).resolve())
        ev.args.predictionWalk = None
        ev.args.gtInstancesFile = str(Path(tmp) / "gtInstances.json")  # never the package dir
        ev.args.JSONOutput = False
        ev.args.quiet = True
        ev.args.colorized = False
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                res = ev.evaluateImgLists(pred_files, gt_files, ev.args)["averages"]
        finally:
            vars(ev.args).clear()
            vars(ev.args).update(saved)
    per_class = {c: float(res["classes"][c]["ap"]) * 100 for c in gt.classes
                 if c in res["classes"]}
    return {"AP": float(res["allAp"]) * 100, "AP50": float(res["allAp50%"]) * 100,
            "per_class": per_class, "num_images": len(gt.records)}
