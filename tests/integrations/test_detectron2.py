"""sskd/integrations/detectron2*.py: registration, conversions, evaluators, the detectron2 model.

Everything except the import-guard tests is skipped when detectron2 is not installed (CI's
project venv); run them in a venv with detectron2 (see README, "detectron2").
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sskd.config import PseudoLabelConfig, SyntheticDomainConfig
from sskd.data.records import (Dataset, ImageRecord, Instance, decode_mask, encode_mask,
                               polygons_to_rle, write_records_jsonl)
from sskd.integrations.detectron2_require import detectron2_available

needs_d2 = pytest.mark.skipif(not detectron2_available(), reason="detectron2 is not installed")
CLASSES = ["circle", "rectangle", "triangle"]
SIZE = 64


@pytest.fixture(autouse=True)
def _small():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def d2():
    if not detectron2_available():
        pytest.skip("detectron2 is not installed")
    from sskd.integrations import detectron2 as mod
    return mod


# --------------------------------------------------------------------------- fixtures


def _record(image_id: int, rng: np.random.Generator, scores: bool = False, size: int = SIZE,
            file_name: str | None = None) -> ImageRecord:
    insts = []
    for k in range(int(rng.integers(1, 4))):
        m = np.zeros((size, size), np.uint8)
        y, x = rng.integers(0, size - 16, 2)
        h, w = rng.integers(6, 16, 2)
        m[y:y + h, x:x + w] = 1
        if k == 1:
            m[y + 2:y + 4, x + 2:x + 4] = 0  # a hole: RLE must keep it exactly
        insts.append(Instance.from_mask(m, int(rng.integers(0, 3)),
                                        score=float(rng.uniform(0.1, 1)) if scores else None))
    return ImageRecord(file_name or f"img_{image_id}.png", size, size, image_id, insts)


def _dataset(n: int = 6, seed: int = 0, scores: bool = False) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset([_record(i + 1, rng, scores) for i in range(n)], list(CLASSES), "toy")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Dataset:
    """Synthetic shapes (real PNGs): large objects, 1-2 per image, 64 px."""
    from sskd.data.coco import read_coco
    from sskd.data.synthetic import generate_domain
    root = tmp_path_factory.mktemp("shapes")
    dom = SyntheticDomainConfig(scale_min=0.3, scale_max=0.5, max_objects=2, occlusion=0.0)
    js = generate_domain(dom, 48, SIZE, CLASSES, [7, 1], root)
    return read_coco(js, root)


def _masks_equal(a: ImageRecord, b: ImageRecord) -> None:
    assert len(a.instances) == len(b.instances)
    for x, y in zip(a.instances, b.instances):
        assert np.array_equal(x.mask(), y.mask())
        assert x.class_id == y.class_id


# --------------------------------------------------------------------------- import guard


@pytest.fixture(scope="module")
def import_probe() -> list[str]:
    """One fresh interpreter: which detectron2 modules does importing sskd load, and what do
    the entry points say when detectron2 is absent (``sys.modules[name] = None`` makes the
    import machinery treat it as not installed)."""
    code = (
        "import sys, sskd, sskd.models, sskd.data.records, sskd.engine.trainer, "
        "sskd.evaluation.coco_eval, sskd.integrations\n"
        "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] == 'detectron2'))\n"
        "sys.modules['detectron2'] = None\n"
        "from sskd.models import build_model\n"
        "for f in (lambda: __import__('sskd.integrations.detectron2'),\n"
        "          lambda: build_model('detectron2', 3)):\n"
        "    try:\n        f()\n    except ImportError as e:\n        print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_importing_sskd_never_imports_detectron2(import_probe):
    assert "LOADED []" in import_probe


def test_clear_import_error_without_detectron2(import_probe):
    errors = [line for line in import_probe if line.startswith("ERR")]
    assert len(errors) == 2
    for line in errors:
        assert "pip install --no-build-isolation" in line and "detectron2.readthedocs.io" in line


# --------------------------------------------------------------------------- conversions


@needs_d2
def test_record_dict_round_trip_is_exact(d2):
    from detectron2.structures import BoxMode
    for rec in _dataset(4, scores=True).records + _dataset(3, seed=1).records:
        d = d2.record_to_dict(rec)
        assert d["image_id"] == rec.image_id and (d["height"], d["width"]) == (SIZE, SIZE)
        for ann, inst in zip(d["annotations"], rec.instances):
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS and ann["category_id"] == inst.class_id
            assert isinstance(ann["segmentation"]["counts"], str)
        back = d2.dict_to_record(d, num_classes=3)
        _masks_equal(rec, back)
        assert [i.bbox for i in back.instances] == [i.bbox for i in rec.instances]
        assert [i.score for i in back.instances] == [i.score for i in rec.instances]


@needs_d2
def test_dict_to_record_accepts_polygons_xyxy_and_uncompressed_rle(d2):
    from detectron2.structures import BoxMode
    from pycocotools import mask as mu
    poly = [[10.0, 10.0, 30.0, 10.0, 30.0, 25.0, 10.0, 25.0]]
    m = np.zeros((40, 50), np.uint8)
    m[5:9, 3:20] = 1
    raw = mu.encode(np.asfortranarray(m))  # compressed, bytes counts
    # uncompressed RLE: run lengths of the column-major mask, starting with a zero run
    flat = m.T.ravel()
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.r_[0, edges, flat.size]).tolist()
    if flat[0]:
        runs = [0] + runs
    d = {"file_name": "a.png", "height": 40, "width": 50, "image_id": 3, "annotations": [
        {"bbox": [10, 10, 30, 25], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1, "segmentation": poly},
        {"bbox": [3, 5, 17, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
         "segmentation": {"size": [40, 50], "counts": runs}},
        {"bbox": [3, 5, 17, 4], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2, "segmentation": raw}]}
    rec = d2.dict_to_record(d, num_classes=3)
    assert rec.instances[0].bbox == [10.0, 10.0, 20.0, 15.0]  # XYXY -> XYWH
    assert np.array_equal(rec.instances[0].mask(), decode_mask(polygons_to_rle(poly, 40, 50)))
    assert np.array_equal(rec.instances[1].mask(), m)
    assert np.array_equal(rec.instances[2].mask(), m)
    assert all(isinstance(i.segmentation["counts"], str) for i in rec.instances)


@needs_d2
def test_dict_to_record_errors_name_the_problem(d2):
    base = {"file_name": "x.png", "height": 8, "width": 8, "image_id": 1}
    ann = {"bbox": [0, 0, 2, 2], "bbox_mode": 1, "segmentation": encode_mask(np.ones((8, 8)))}
    with pytest.raises(ValueError, match="category_id 5 outside"):
        d2.dict_to_record({**base, "annotations": [{**ann, "category_id": 5}]}, num_classes=3)
    with pytest.raises(ValueError, match="not an integer; pass image_id"):
        d2.dict_to_record({**base, "image_id": "frankfurt_000000_000294", "annotations": []})
    assert d2.dict_to_record({**base, "image_id": "abc"}, image_id=9).image_id == 9
    with pytest.raises(ValueError, match="no 'segmentation'"):
        d2.dict_to_record({**base, "annotations": [{"bbox": [0, 0, 1, 1], "bbox_mode": 1, "category_id": 0}]})
    with pytest.raises(ValueError, match="RLE size"):
        d2.dict_to_record({**base, "annotations": [{**ann, "category_id": 0,
                                                    "segmentation": encode_mask(np.ones((4, 4)))}]})


@needs_d2
def test_polygon_output_is_close_but_lossy(d2):
    rec = _dataset(3, seed=2).records[0]
    d = d2.record_to_dict(rec, mask_format="polygon")
    assert all(isinstance(a["segmentation"], list) for a in d["annotations"])
    back = d2.dict_to_record(d)
    for a, b in zip(rec.instances, back.instances):
        ma, mb = a.mask().astype(bool), b.mask().astype(bool)
        assert (ma & mb).sum() / (ma | mb).sum() > 0.6


@needs_d2
def test_prediction_instances_round_trip(d2):
    from sskd.models.base import Prediction
    masks = torch.zeros(3, 20, 30, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 10:20, 0:4] = True
    masks[2, 7, 7] = True
    pred = Prediction(masks, torch.tensor([2, 0, 1]), torch.tensor([0.9, 0.5, 0.25]))
    inst = d2.prediction_to_instances(pred)
    assert inst.image_size == (20, 30) and inst.pred_masks.dtype == torch.bool
    assert inst.pred_boxes.tensor.tolist()[0] == [3.0, 2.0, 9.0, 5.0]  # XYXY, exclusive max
    back = d2.instances_to_prediction(inst)
    assert torch.equal(back.masks, masks) and torch.equal(back.class_ids, pred.class_ids)
    assert torch.equal(back.scores, pred.scores)
    empty = d2.instances_to_prediction(d2.prediction_to_instances(
        Prediction(torch.zeros(0, 5, 6, dtype=torch.bool), torch.zeros(0, dtype=torch.long), torch.zeros(0))))
    assert empty.masks.shape == (0, 5, 6)


@needs_d2
def test_raw_mask_head_output_is_pasted(d2):
    from detectron2.structures import Boxes, Instances
    inst = Instances((32, 32))
    inst.pred_boxes = Boxes(torch.tensor([[4.0, 8.0, 20.0, 24.0]]))
    inst.pred_masks = torch.ones(1, 1, 28, 28)
    inst.scores, inst.pred_classes = torch.tensor([0.8]), torch.tensor([1])
    pred = d2.instances_to_prediction(inst)
    assert pred.masks.shape == (1, 32, 32)
    ys, xs = torch.nonzero(pred.masks[0], as_tuple=True)
    assert (int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())) == (4, 19, 8, 23)


@needs_d2
def test_record_instances_round_trip_gt_and_predictions(d2):
    from detectron2.structures import BitMasks
    for rec in _dataset(3).records:
        inst = d2.record_to_instances(rec)
        assert isinstance(inst.gt_masks, BitMasks) and inst.gt_masks.tensor.dtype == torch.bool
        back = d2.instances_to_record(inst, rec.file_name, rec.image_id)
        _masks_equal(rec, back)
        for a, b in zip(rec.instances, back.instances):
            assert a.bbox == pytest.approx(b.bbox)
    for rec in _dataset(3, scores=True).records:
        inst = d2.record_to_instances(rec)
        assert inst.has("pred_masks") and inst.has("scores")
        back = d2.instances_to_record(inst, rec.file_name, rec.image_id)
        _masks_equal(rec, back)
        assert [i.score for i in back.instances] == pytest.approx([i.score for i in rec.instances])


@needs_d2
def test_targets_to_instances_resizes_drops_empty_and_checks_labels(d2):
    masks = torch.zeros(3, 16, 16)
    masks[0, 0:8, 0:8] = 1
    masks[2, 8:16, 4:12] = 1  # masks[1] is empty (cropped away by augmentation)
    inst = d2.targets_to_instances({"masks": masks, "labels": torch.tensor([0, 1, 2])}, (32, 32), 3)
    assert len(inst) == 2 and inst.gt_classes.tolist() == [0, 2]
    assert inst.gt_masks.tensor.shape == (2, 32, 32)
    assert inst.gt_boxes.tensor.tolist() == [[0, 0, 16, 16], [8, 16, 24, 32]]
    with pytest.raises(ValueError, match="labels must be class ids"):
        d2.targets_to_instances({"masks": masks, "labels": torch.tensor([0, 1, 3])}, (16, 16), 3)


# --------------------------------------------------------------------------- registration


@needs_d2
def test_register_dataset_round_trip_metadata_and_replacement(d2):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    ds = _dataset(5)
    assert d2.register_dataset("t_reg", ds) == "t_reg"
    dicts = DatasetCatalog.get("t_reg")
    assert [d["image_id"] for d in dicts] == [r.image_id for r in ds.records]
    for d, rec in zip(dicts, ds.records):
        _masks_equal(rec, d2.dict_to_record(d))
    meta = MetadataCatalog.get("t_reg")
    assert meta.thing_classes == CLASSES and meta.evaluator_type == "coco"
    assert len(meta.thing_colors) == 3 and len(set(meta.thing_colors)) == 3
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in meta.thing_colors)
    # registering the same name again replaces it (other classes, other records): no error
    other = Dataset(ds.records[:2], ["a", "b", "c"], "other")
    d2.register_dataset("t_reg", other, colors=[(1, 2, 3)] * 3)
    assert len(DatasetCatalog.get("t_reg")) == 2
    assert MetadataCatalog.get("t_reg").thing_classes == ["a", "b", "c"]
    assert MetadataCatalog.get("t_reg").thing_colors == [(1, 2, 3)] * 3
    d2.unregister("t_reg")
    assert "t_reg" not in DatasetCatalog.list() and "t_reg" not in MetadataCatalog.list()
    with pytest.raises(ValueError, match="kind must be"):
        d2.register_dataset("t_bad", ds, kind="weird")
    bad = Dataset([ImageRecord("x.png", 8, 8, 1, [Instance.from_mask(np.ones((8, 8)), 7)])], CLASSES)
    d2.register_dataset("t_bad", bad)
    with pytest.raises(ValueError, match="class ids \\[7\\] outside"):
        DatasetCatalog.get("t_bad")


@needs_d2
def test_unlabeled_and_pseudo_registration(d2, tmp_path, caplog):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    ds = _dataset(4)
    with caplog.at_level(logging.WARNING):
        d2.register_dataset("t_unl", ds, kind="unlabeled")  # hidden gt is stripped
    assert "FILTER_EMPTY_ANNOTATIONS" in caplog.text
    assert [d["annotations"] for d in DatasetCatalog.get("t_unl")] == [[]] * 4
    assert MetadataCatalog.get("t_unl").sskd_kind == "unlabeled"
    pseudo = _dataset(4, seed=3, scores=True)
    path = write_records_jsonl(pseudo.records, tmp_path / "pseudo_labels" / "teacher_adapted.jsonl")
    cfg = PseudoLabelConfig(score_threshold=0.5, max_instances=1)
    d2.register_dataset("t_pl", path, kind="pseudo", classes=CLASSES, pseudo_label=cfg)
    dicts = DatasetCatalog.get("t_pl")
    for d, rec in zip(dicts, pseudo.records):
        kept = sorted((i for i in rec.instances if i.score >= 0.5), key=lambda i: -i.score)[:1]
        assert [a["score"] for a in d["annotations"]] == pytest.approx([i.score for i in kept])
    # the jsonl is read lazily: a changed file is seen on the next get
    write_records_jsonl(pseudo.records[:1], path)
    assert len(DatasetCatalog.get("t_pl")) == 1
    with pytest.raises(ValueError, match="pass classes="):
        d2.register_dataset("t_pl2", path, kind="pseudo")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        d2.register_dataset("t_pl2", tmp_path / "nope.jsonl", kind="pseudo", classes=CLASSES)


@needs_d2
def test_set_train_datasets_keeps_unlabeled_images(d2):
    """The FILTER_EMPTY_ANNOTATIONS pitfall, shown with detectron2's own loader function."""
    from detectron2.config import get_cfg
    from detectron2.data import get_detection_dataset_dicts
    d2.register_dataset("t_lab2", _dataset(3))
    d2.register_dataset("t_unl2", _dataset(5, seed=4), kind="unlabeled")
    names = ["t_lab2", "t_unl2"]
    assert len(get_detection_dataset_dicts(names, filter_empty=True)) == 3  # unlabeled vanish
    cfg = d2.set_train_datasets(get_cfg(), names)
    assert cfg.DATASETS.TRAIN == tuple(names)
    assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False and cfg.INPUT.MASK_FORMAT == "bitmask"
    assert len(get_detection_dataset_dicts(names, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)) == 8
    cfg2 = d2.set_train_datasets(get_cfg(), ["t_lab2"])  # nothing empty: the default is kept
    assert cfg2.DATALOADER.FILTER_EMPTY_ANNOTATIONS is True
    with pytest.raises(KeyError, match="not registered"):
        d2.set_train_datasets(get_cfg(), ["nope"])


@needs_d2
def test_registered_dicts_feed_detectron2_dataset_mapper(d2, shapes):
    """detectron2's own DatasetMapper reads the image and gives the same masks back."""
    from detectron2.data import DatasetCatalog, DatasetMapper
    d2.register_dataset("t_shapes", shapes.subset([r.image_id for r in shapes.records[:3]]))
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="RGB",
                           use_instance_mask=True, instance_mask_format="bitmask")
    for d, rec in zip(DatasetCatalog.get("t_shapes"), shapes.records[:3]):
        out = mapper(d)
        assert out["image"].shape == (3, SIZE, SIZE)
        assert np.array_equal(out["image"].permute(1, 2, 0).numpy(), np.asarray(Image.open(rec.file_name).convert("RGB")))
        gt = out["instances"]
        assert torch.equal(gt.gt_masks.tensor, torch.from_numpy(rec.masks()).bool())
        assert gt.gt_classes.tolist() == [i.class_id for i in rec.instances]


@needs_d2
def test_register_run_from_run_dir_and_from_mapping(d2, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from sskd.stages.data import load_datasets, prepare_data
    from sskd.stages.run import open_run
    run = open_run("r1", preset="smoke", runs_root=tmp_path / "runs",
                   overrides={"data.root": str(tmp_path / "data")})
    prepare_data(run)
    sets = load_datasets(run)
    pseudo = Dataset([ImageRecord(r.file_name, r.height, r.width, r.image_id,
                                  [Instance(i.class_id, i.segmentation, i.bbox, score=0.9) for i in r.instances])
                      for r in sets["unlabeled"].records], sets["unlabeled"].classes)
    write_records_jsonl(pseudo.records, run.dir.pseudo_labels("teacher_adapted"))
    names = d2.register_run(run.dir.root)
    assert names == {"labeled": "sskd_r1_labeled", "unlabeled": "sskd_r1_unlabeled",
                     "val": "sskd_r1_val", "pseudo_teacher_adapted": "sskd_r1_pseudo_teacher_adapted"}
    for role in ("labeled", "unlabeled", "val"):
        assert len(DatasetCatalog.get(names[role])) == len(sets[role])
    assert all(not d["annotations"] for d in DatasetCatalog.get(names["unlabeled"]))
    pl = DatasetCatalog.get(names["pseudo_teacher_adapted"])
    assert sum(len(d["annotations"]) for d in pl) == sum(len(r.instances) for r in pseudo.records) > 0
    assert MetadataCatalog.get(names["val"]).thing_classes == sets["val"].classes
    again = d2.register_run(run.dir.root)  # idempotent
    assert again == names
    mapped = d2.register_run({"labeled": sets["labeled"]}, prefix="mine",
                             pseudo_labels={"t": run.dir.pseudo_labels("teacher_adapted")})
    assert mapped == {"labeled": "mine_labeled", "pseudo_t": "mine_pseudo_t"}


@needs_d2
def test_pseudo_labels_are_renamed_by_the_class_prior_as_the_stages_rename_them(d2):
    from detectron2.data import DatasetCatalog
    from sskd.engine.class_alignment import align_classes
    m = np.zeros((8, 8), np.uint8)
    m[2:6, 2:6] = 1
    probs = [[0.45, 0.55], [0.45, 0.55], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]]  # mean [0.4, 0.6]
    pl = Dataset([ImageRecord(f"{k}.png", 8, 8, k, [Instance.from_mask(m, int(np.argmax(p)), 0.8,
                                                                        class_probs=p)])
                  for k, p in enumerate(probs)], ["a", "b"])
    cfg = PseudoLabelConfig(class_prior="uniform")
    name = d2.register_dataset("cp", pl, kind="pseudo", pseudo_label=cfg)
    got = [d["annotations"][0]["category_id"] for d in DatasetCatalog.get(name)]
    want = [i.class_id for r in align_classes(pl, np.array([0.5, 0.5]))[0].records for i in r.instances]
    assert got == want == [0, 0, 1, 1, 0]
    plain = d2.register_dataset("cp0", pl, kind="pseudo")
    assert [d["annotations"][0]["category_id"] for d in DatasetCatalog.get(plain)] == [1, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="pseudo_label.class_prior is 'labeled': pass class_prior="):
        d2.register_dataset("cp1", pl, kind="pseudo", pseudo_label=PseudoLabelConfig(class_prior="labeled"))


# --------------------------------------------------------------------------- evaluation


def _noisy_predictions(gt: Dataset, seed: int = 0) -> list[ImageRecord]:
    """Ground truth perturbed: shifted/eroded masks, dropped objects, false positives."""
    rng = np.random.default_rng(seed)
    out = []
    for rec in gt.records:
        insts = []
        for inst in rec.instances:
            r = rng.uniform()
            if r < 0.15:
                continue  # a miss
            m = inst.mask()
            if r < 0.5:
                m = np.roll(m, int(rng.integers(1, 4)), axis=int(rng.integers(0, 2)))
            cls = inst.class_id if rng.uniform() > 0.1 else (inst.class_id + 1) % 3
            if m.any():
                insts.append(Instance.from_mask(m, cls, score=float(rng.uniform(0.05, 1))))
        if rng.uniform() < 0.4:  # a false positive
            m = np.zeros((rec.height, rec.width), np.uint8)
            m[:10, :10] = 1
            insts.append(Instance.from_mask(m, int(rng.integers(0, 3)), score=float(rng.uniform(0, 0.6))))
        out.append(ImageRecord(rec.file_name, rec.height, rec.width, rec.image_id, insts))
    return out


def _reference(gt: Dataset, preds: list[ImageRecord]) -> dict:
    try:
        from sskd.evaluation.coco_eval import evaluate_masks
    except ImportError:  # pragma: no cover - the module is developed in parallel
        pytest.skip("sskd.evaluation.coco_eval is not there yet")
    return evaluate_masks(gt, preds)


@needs_d2
@pytest.mark.parametrize("fast", [False, True])
def test_coco_evaluator_agrees_with_sskd_evaluate_masks(d2, shapes, fast):
    if fast and not d2.compiled_ops_available():
        pytest.skip("detectron2 built without compiled ops: no fast COCOeval")
    gt = shapes.subset([r.image_id for r in shapes.records[:24]], name="val")
    preds = _noisy_predictions(gt)[:-3]  # the last 3 images get no prediction record at all
    ref = _reference(gt, preds)
    got = d2.evaluate_with_detectron2(gt, preds, use_fast_impl=fast)
    assert 10 < ref["AP"] < 95  # a non-trivial case
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        if math.isnan(ref[k]):
            assert math.isnan(got[k]), k
        else:
            assert got[k] == pytest.approx(ref[k], abs=0.05), k
    for c in CLASSES:
        assert got["per_class"][c] == pytest.approx(ref["per_class"][c], abs=0.05, nan_ok=True)
    assert got["num_images"] == 24 and got["num_predictions"] == sum(len(r.instances) for r in preds)
    perfect = [ImageRecord(r.file_name, r.height, r.width, r.image_id,
                           [Instance(i.class_id, i.segmentation, i.bbox, score=1.0) for i in r.instances])
                for r in gt.records]
    assert d2.evaluate_with_detectron2(gt, perfect)["AP"] == pytest.approx(100.0)
    assert d2.evaluate_with_detectron2(gt, [])["AP"] == 0.0


@needs_d2
def test_evaluator_input_errors(d2):
    gt = _dataset(3)
    bad = [ImageRecord("x", SIZE, SIZE, 99, [])]
    with pytest.raises(ValueError, match="not in the ground truth"):
        d2.evaluate_with_detectron2(gt, bad)
    unscored = [gt.records[0]]
    with pytest.raises(ValueError, match="no score"):
        d2.evaluate_with_detectron2(gt, unscored)
    with pytest.raises(ValueError, match="evaluator must be"):
        d2.evaluate_with_detectron2(gt, [], evaluator="lvis")


def _write_cityscapes(root, n: int = 3) -> None:
    rng = np.random.default_rng(5)
    H, W = 64, 128
    for k in range(n):
        name = f"testcity_000000_{k:06d}"
        img = root / "leftImg8bit" / "val" / "testcity" / f"{name}_leftImg8bit.png"
        gtp = root / "gtFine" / "val" / "testcity" / f"{name}_gtFine_instanceIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        gtp.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img)
        ids = np.full((H, W), 7, np.uint16)  # road
        ids[4:30, 4:40] = 26000 + k          # a car
        ids[34:60, 50:70] = 24000            # a person
        ids[10:40, 80:120] = 26001 + k       # another car
        Image.fromarray(ids).save(gtp)


@needs_d2
def test_cityscapes_evaluator(d2, tmp_path):
    if not d2.cityscapes_available():
        pytest.skip("cityscapesscripts is not installed (pip install cityscapesscripts)")
    from sskd.data.cityscapes import read_cityscapes
    _write_cityscapes(tmp_path)
    gt = read_cityscapes(tmp_path, "val")
    perfect = [ImageRecord(r.file_name, r.height, r.width, r.image_id,
                           [Instance(i.class_id, i.segmentation, i.bbox, score=0.9) for i in r.instances])
               for r in gt.records]
    res = d2.evaluate_with_detectron2(gt, perfect, evaluator="cityscapes")
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    assert _reference(gt, perfect)["AP"] == pytest.approx(100.0)
    # drop every person: person AP 0, car AP 100 -> both evaluators give the class mean (50 of
    # the two classes with ground truth)
    no_person = [ImageRecord(r.file_name, r.height, r.width, r.image_id,
                             [i for i in r.instances if gt.classes[i.class_id] != "person"]) for r in perfect]
    cs = d2.evaluate_with_detectron2(gt, no_person, evaluator="cityscapes")
    assert cs["AP"] == pytest.approx(50.0, abs=0.5)
    assert _reference(gt, no_person)["AP"] == pytest.approx(cs["AP"], abs=0.5)
    assert "deeplearning" not in sys.modules  # the import alias is removed afterwards
    with pytest.raises(ValueError, match="not Cityscapes label names"):
        d2.evaluate_with_detectron2(_dataset(2), [], evaluator="cityscapes")


# --------------------------------------------------------------------------- the model


def _targets(batch: int = 2) -> list[dict]:
    out = []
    for b in range(batch):
        masks = torch.zeros(2, SIZE, SIZE)
        masks[0, 4:30, 6:28] = 1
        masks[1, 36:60, 30 + b:58] = 1
        out.append({"masks": masks, "labels": torch.tensor([b % 3, 2])})
    return out


def _images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model(d2):
    from sskd.models import build_model
    torch.manual_seed(0)
    return build_model("detectron2", 3, size="tiny")


@needs_d2
def test_model_registered_lazily_and_outputs(d2, model):
    from sskd.models import Segmenter
    assert isinstance(model, Segmenter) and model.registry_name == "detectron2"
    assert 100_000 < model.num_parameters() < 2_000_000
    model.eval()
    out = model(_images(), embeddings="both")
    Q = model.num_queries
    assert out.class_logits.shape == (2, Q, 4) and out.mask_logits.shape == (2, Q, 16, 16)
    assert torch.isfinite(out.class_logits).all() and torch.isfinite(out.mask_logits).all()
    assert out.embed_weak.shape == out.embed_strong.shape == (2, 128, 16, 16)
    assert torch.allclose(out.embed_weak.norm(dim=1), torch.ones(2, 16, 16), atol=1e-4)
    assert not out.embed_strong.requires_grad
    # the class logits encode the detector's scores: softmax gives them back
    dets = model.predict(_images(), score_threshold=0.0, max_instances=Q)
    probs = out.class_logits.softmax(-1)
    top = probs[..., :3].amax(-1)
    for b, p in enumerate(dets):
        assert len(p) > 0
        assert p.scores.max().item() == pytest.approx(top[b].max().item(), abs=1e-3)
    model.train()
    assert model(_images()).class_logits.shape == (2, 0, 4)  # no detections needed for losses


@needs_d2
def test_model_backward_every_trainable_parameter_and_empty_targets(model):
    model.train()
    out = model(_images(), embeddings="both")
    losses = model.compute_losses(out, _targets())
    assert {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"} <= set(losses)
    assert losses["loss"].item() == pytest.approx(sum(v.item() for k, v in losses.items() if k != "loss"), rel=1e-5)
    total = losses["loss"] + (out.embed_weak * torch.randn(out.embed_weak.shape)).mean()
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    empty = {"masks": torch.zeros(0, SIZE, SIZE), "labels": torch.zeros(0, dtype=torch.long)}
    for targets in ([empty, _targets(1)[0]], [empty, empty]):
        l = model.compute_losses(model(_images()), targets)
        assert all(torch.isfinite(v) for v in l.values())
        l["loss"].backward()


@needs_d2
def test_compute_losses_on_a_batch_slice_needs_extras(model):
    out = model(_images(3))
    part = out.select(slice(1, 3))
    assert part.extras["feat_p2"].shape[0] == 2
    assert torch.isfinite(model.compute_losses(part, _targets(2))["loss"])
    stripped = type(out)(class_logits=out.class_logits, mask_logits=out.mask_logits)
    with pytest.raises(ValueError, match="SegmenterOutput.select"):
        model.compute_losses(stripped, _targets(3))
    with pytest.raises(ValueError, match="got 2 targets for a batch of 3"):
        model.compute_losses(out, _targets(2))


@needs_d2
def test_pixel_probabilities_from_detections(model):
    from sskd.losses.pixel_contrastive import fused_pseudo_probabilities
    model.eval()
    out = model(_images(), embeddings="weak")
    pm, pc = model.pixel_probabilities(out)
    Q = model.num_queries
    assert pm.shape == (2, Q + 1, 16, 16) and pc.shape == (2, Q + 1, 4)
    assert torch.allclose(pm.sum(1), torch.ones(2, 16, 16), atol=1e-5)
    assert torch.equal(pc[:, -1], torch.tensor([0.0, 0, 0, 1]).expand(2, 4))  # background slot
    assert torch.allclose(pc.sum(-1), torch.ones(2, Q + 1), atol=1e-5)
    # a pixel covered by a confident detection is claimed by it, an uncovered one by background
    cls = torch.full((1, 2, 4), math.log(1e-4))
    cls[0, 0, 1], cls[0, 0, 3] = math.log(0.9), math.log(0.1)   # slot 0: class 1, score 0.9
    cls[0, 1, 3] = 0.0                                          # slot 1: unused
    msk = torch.full((1, 2, 4, 4), -9.0)
    msk[0, 0, :2, :2] = 9.0
    pm, pc = model.pixel_probabilities(type(out)(class_logits=cls, mask_logits=msk))
    assert pm[0, 0, 0, 0] > 0.85 and pm[0, -1, 3, 3] > 0.99
    y = fused_pseudo_probabilities(pm, pc)  # the sampler's input builds from them
    assert y.shape == (1, 3 + 4, 4, 4)
    assert (y[0, :, 0, 0] * y[0, :, 0, 1]).sum() > 0.99 > (y[0, :, 0, 0] * y[0, :, 3, 3]).sum()


@needs_d2
def test_predict_valid_and_thresholds(model):
    preds = model.predict(_images(), score_threshold=0.0, max_instances=10)
    assert len(preds) == 2 and sum(len(p) for p in preds) > 0
    for p in preds:
        assert p.masks.dtype == torch.bool and p.masks.shape[1:] == (SIZE, SIZE)
        assert len(p) <= 10 and p.masks.flatten(1).any(1).all() and p.masks.sum(0).max() <= 1
        assert ((p.class_ids >= 0) & (p.class_ids < 3)).all()
        assert torch.all(p.scores[:-1] >= p.scores[1:])
    assert all(len(p) == 0 for p in model.predict(_images(), score_threshold=1.0))
    assert model.detector.roi_heads.box_predictor.test_score_thresh == pytest.approx(0.05)
    assert model.training  # predict restores the mode


@needs_d2
def test_save_load_round_trip_and_ema(model, tmp_path):
    from sskd.models import load_model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["name"] == "detectron2" and meta["config"]["size"] == "tiny"
    loaded = load_model(tmp_path / "m")
    model.eval(), loaded.eval()
    a, b = model(_images(), embeddings="both"), loaded(_images(), embeddings="both")
    assert torch.equal(a.class_logits, b.class_logits) and torch.equal(a.mask_logits, b.mask_logits)
    assert torch.equal(a.embed_strong, b.embed_strong)
    before = model.embed_strong.mlp[0].weight.clone()
    with torch.no_grad():
        model.embed_weak.mlp[0].weight.add_(1.0)
    model.after_optimizer_step()
    m = model.ema_momentum
    expected = m * before + (1 - m) * model.embed_weak.mlp[0].weight
    assert torch.allclose(model.embed_strong.mlp[0].weight, expected, atol=1e-6)
    assert not torch.allclose(model.embed_strong.mlp[0].weight, before)


@needs_d2
def test_builder_options_and_errors(d2, tmp_path):
    from sskd.models import build_model
    m = build_model("detectron2", 2, size="tiny", freeze_encoder=True,
                    overrides={"MODEL.FPN.OUT_CHANNELS": 16, "TEST.DETECTIONS_PER_IMAGE": 5})
    assert m.num_queries == 5 and m.embed_weak.mlp[0].in_channels == 16
    enc = [n for n, p in m.named_parameters() if m.is_encoder_parameter(n)]
    assert enc and not any(p.requires_grad for n, p in m.named_parameters() if m.is_encoder_parameter(n))
    groups = m.param_groups(1e-3, 0.1)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in m.parameters())
    cfg = d2.build_d2_config(size="tiny", num_classes=2)
    from_cfg = build_model("detectron2", 2, size="full", config=cfg)  # a CfgNode works too
    assert from_cfg.d2_cfg.MODEL.FPN.OUT_CHANNELS == 32
    with pytest.raises(ValueError, match="unknown detectron2 size"):
        build_model("detectron2", 2, size="huge")
    with pytest.raises(ValueError, match="bad detectron2 override"):
        build_model("detectron2", 2, overrides={"MODEL.NOPE": 1})
    with pytest.raises(FileNotFoundError, match="model-zoo config"):
        build_model("detectron2", 2, config="COCO-InstanceSegmentation/nope.yaml")
    with pytest.raises(ValueError, match="MASK_ON"):
        build_model("detectron2", 2, config="COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    with pytest.raises(ValueError, match="never downloads"):
        build_model("detectron2", 2, weights="detectron2://ImageNetPretrained/MSRA/R-50.pkl")
    # a local checkpoint loads (same architecture: every tensor matches)
    torch.save({"model": m.detector.state_dict()}, tmp_path / "w.pth")
    m2 = build_model("detectron2", 2, size="tiny", weights=str(tmp_path / "w.pth"),
                     overrides={"MODEL.FPN.OUT_CHANNELS": 16, "TEST.DETECTIONS_PER_IMAGE": 5})
    for (k, v), (k2, v2) in zip(m.detector.state_dict().items(), m2.detector.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


# --------------------------------------------------------------------------- 2-stage smoke


def _batch(ds: Dataset, idx: list[int]) -> tuple[torch.Tensor, list[dict]]:
    imgs, targets = [], []
    for i in idx:
        r = ds.records[i]
        imgs.append(torch.from_numpy(np.array(Image.open(r.file_name).convert("RGB"))).permute(2, 0, 1).float() / 255)
        targets.append({"masks": torch.from_numpy(r.masks()).float(),
                        "labels": torch.tensor([x.class_id for x in r.instances], dtype=torch.long)})
    return torch.stack(imgs), targets


@needs_d2
@pytest.mark.slow
def test_two_stage_smoke_mask_rcnn_student_from_teacher_pseudo_labels(d2, shapes, tmp_path):
    """Stage a: a tiny sskd teacher learns D_l and pseudo-labels D_u (jsonl, registered in
    detectron2). Stage b: a tiny Mask R-CNN student trains on D_l + pseudo D_u with
    J = L_sup + L_semi + 0.1 L_pxl (fused negatives from its own detections): loss falls."""
    from detectron2.data import DatasetCatalog
    from sskd.engine.inference import prediction_to_record
    from sskd.losses.pixel_contrastive import fused_pseudo_probabilities, pixel_contrastive_loss
    from sskd.models import build_model
    labeled = Dataset(shapes.records[:16], CLASSES, "labeled")
    unlabeled = Dataset([r.without_instances() for r in shapes.records[16:40]], CLASSES, "unlabeled")

    # stage a: teacher
    torch.manual_seed(0)
    teacher = build_model("mask2former", 3, size="tiny")
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    teacher.train()
    for _ in range(30):
        x, t = _batch(labeled, torch.randint(16, (8,), generator=g).tolist())
        loss = teacher.losses(x, t)["loss"]
        opt.zero_grad(), loss.backward(), opt.step()
    recs = []
    for start in range(0, len(unlabeled), 8):
        chunk = list(range(start, min(start + 8, len(unlabeled))))
        x, _ = _batch(unlabeled, chunk)
        for i, p in zip(chunk, teacher.predict(x, score_threshold=0.05, max_instances=3)):
            recs.append(prediction_to_record(p, unlabeled.records[i]))
    path = write_records_jsonl(recs, tmp_path / "pseudo_labels" / "teacher.jsonl")
    assert sum(len(r.instances) for r in recs) > 0, "the teacher produced no pseudo-labels"
    pl_cfg = PseudoLabelConfig(score_threshold=0.05, max_instances=3)
    name = d2.register_dataset("smoke_pseudo", path, kind="pseudo", classes=CLASSES, pseudo_label=pl_cfg)
    pseudo = Dataset([d2.dict_to_record(d) for d in DatasetCatalog.get(name)], CLASSES, "pseudo")
    assert len(pseudo) == len(unlabeled)

    # stage b: Mask R-CNN student, labeled + pseudo-labeled halves per batch
    torch.manual_seed(0)
    student = build_model("detectron2", 3, size="tiny")
    student.train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-3,
                            weight_decay=0.05)
    history = []
    for step in range(36):
        xl, tl = _batch(labeled, torch.randint(len(labeled), (4,), generator=g).tolist())
        xu, tu = _batch(pseudo, torch.randint(len(pseudo), (4,), generator=g).tolist())
        x = torch.cat([xl, xu])
        out = student(x, embeddings="weak")
        sup = student.compute_losses(out.select(slice(0, 4)), tl)["loss"]
        semi = student.compute_losses(out.select(slice(4, 8)), tu)["loss"]
        strong = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)  # photometric view
        with torch.no_grad():
            z_s = student(strong, embeddings="strong").embed_strong
        pm, pc = student.pixel_probabilities(out)
        pxl, _ = pixel_contrastive_loss(out.embed_weak, z_s, fused_pseudo_probabilities(pm, pc),
                                        num_anchors=16, num_negatives=8, temperature=0.07,
                                        sampler="fused", generator=g)
        total = sup + semi + 0.1 * pxl
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        student.after_optimizer_step()
        history.append([sup.item(), semi.item(), pxl.item()])
    h = np.array(history)
    first, last = h[:6].mean(0), h[-6:].mean(0)
    print(f"mean of first/last 6 steps: L_sup {first[0]:.3f} -> {last[0]:.3f}, L_semi {first[1]:.3f} "
          f"-> {last[1]:.3f}, L_pxl {first[2]:.3f} -> {last[2]:.3f}")
    assert np.isfinite(h).all()
    assert last[0] < 0.8 * first[0], f"L_sup did not fall: {first} -> {last}"
    assert last[0] + last[1] < 0.8 * (first[0] + first[1])
    preds = student.predict(_batch(labeled, [0, 1])[0], score_threshold=0.0)
    assert all(p.masks.shape[1:] == (SIZE, SIZE) for p in preds)


# --------------------------------------------------------------------------- the sskd engine


def _engine_keeps_extras() -> bool:
    import sskd.engine.trainer as trainer
    from sskd.models.base import SegmenterOutput
    if not hasattr(trainer, "_slice_output"):
        return True
    out = SegmenterOutput(torch.zeros(2, 1, 2), torch.zeros(2, 1, 1, 1), extras={"x": torch.zeros(2)})
    return "x" in trainer._slice_output(out, slice(0, 1)).extras


@needs_d2
@pytest.mark.slow
def test_engine_trains_and_predicts_with_the_detectron2_model(d2, shapes, tmp_path):
    from sskd.config import PseudoLabelConfig, TrainConfig
    from sskd.engine.inference import iter_predictions
    from sskd.engine.trainer import Objective, TrainPaths, read_log, train
    from sskd.models import build_model, load_model
    if not _engine_keeps_extras():
        pytest.skip("sskd.engine.trainer slices outputs without SegmenterOutput.extras "
                    "(_slice_output); it must use SegmenterOutput.select for this model")
    labeled = Dataset(shapes.records[:8], CLASSES)
    unlabeled = Dataset([ImageRecord(r.file_name, r.height, r.width, r.image_id,
                                     [Instance(i.class_id, i.segmentation, i.bbox, score=0.9) for i in r.instances])
                         for r in shapes.records[8:16]], CLASSES)
    model = build_model("detectron2", 3, size="tiny")
    paths = TrainPaths.in_dir(tmp_path, "student")
    summary = train(model, labeled, paths, TrainConfig(steps=4, batch_size=4, log_every=1),
                    Objective(l_semi=1.0, l_pxl=0.1), unlabeled=unlabeled, input_size=SIZE,
                    progress=False)
    log = read_log(paths.log)
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert all(np.isfinite([e["loss_sup"], e["loss_semi"], e["loss_pxl"]]).all() for e in log)
    assert summary["steps"] == 4
    loaded = load_model(paths.model_dir)
    recs = list(iter_predictions(loaded, Dataset(shapes.records[:3], CLASSES),
                                 PseudoLabelConfig(score_threshold=0.0), input_size=SIZE))
    assert [r.image_id for r in recs] == [r.image_id for r in shapes.records[:3]]
    assert all(i.score is not None and i.mask().shape == (SIZE, SIZE) for r in recs for i in r.instances)
