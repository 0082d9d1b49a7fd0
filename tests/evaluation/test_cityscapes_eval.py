"""The official Cityscapes AP (cityscapesscripts) on a tiny Cityscapes-layout fixture."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sskd.data.cityscapes import read_cityscapes
from sskd.data.records import Dataset, ImageRecord, Instance
from sskd.evaluation.cityscapes_eval import (INSTALL_HINT, cityscapes_available,
                                             evaluate_cityscapes, gt_file)

pytestmark = pytest.mark.skipif(not cityscapes_available(),
                                 reason=f"needs cityscapesscripts: {INSTALL_HINT}")
H, W = 64, 128


def _ids(shift: int = 0) -> np.ndarray:
    """Two persons, two cars (each >= 100 px, the benchmark's minimum), a crowd of cars."""
    ids = np.full((H, W), 7, np.uint16)          # road
    ids[4:24, 4 + shift:24 + shift] = 24000       # person #0, 400 px
    ids[30:50, 4:20] = 24001                      # person #1, 320 px
    ids[10:40, 40:70] = 26000                     # car #0, 900 px
    ids[44:60, 80:120] = 26001                    # car #1, 640 px
    ids[4:20, 90:124] = 26                        # a crowd of cars (class-only pixels)
    return ids


def _fixture(root: Path) -> Dataset:
    for city, name, shift in (("aachen", "aachen_000000_000019", 0),
                              ("bremen", "bremen_000001_000019", 6)):
        img = root / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png"
        gt = root / "gtFine" / "val" / city / f"{name}_gtFine_instanceIds.png"
        img.parent.mkdir(parents=True), gt.parent.mkdir(parents=True)
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(img)
        Image.fromarray(_ids(shift)).save(gt)
    return read_cityscapes(root, "val")


def _perfect(gt: Dataset, drop: tuple[int, int] | None = None) -> list[ImageRecord]:
    """Every non-crowd instance predicted exactly (score 0.9); ``drop``: (image, instance) left out."""
    out = []
    for i, r in enumerate(gt.records):
        things = [x for x in r.instances if not x.iscrowd]
        insts = [Instance(x.class_id, x.segmentation, score=0.9) for k, x in enumerate(things)
                 if drop != (i, k)]
        out.append(ImageRecord(r.file_name, r.height, r.width, r.image_id, insts))
    return out


def test_gt_file_maps_the_layout(tmp_path):
    gt = _fixture(tmp_path)
    f = gt_file(gt.records[0])
    assert f == tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_instanceIds.png"
    with pytest.raises(ValueError, match="Cityscapes layout"):
        gt_file(ImageRecord(str(tmp_path / "x.png"), H, W, 1))


def test_perfect_predictions_score_100(tmp_path):
    gt = _fixture(tmp_path)
    res = evaluate_cityscapes(gt, _perfect(gt))
    assert res["AP"] == pytest.approx(100.0) and res["AP50"] == pytest.approx(100.0)
    assert res["per_class"]["car"] == pytest.approx(100.0)
    assert np.isnan(res["per_class"]["bus"])  # no ground truth, no prediction
    assert res["num_images"] == 2


def test_a_missing_instance_lowers_its_class_only(tmp_path):
    gt = _fixture(tmp_path)
    # one of the 4 cars is missed: car recall 3/4 at precision 1. The official AP integrates the
    # precision over recall with its step interpolation: 0.75 for car, person stays 1, so the
    # mean over the 2 classes with ground truth is (1 + 0.75) / 2.
    car = next(k for k, x in enumerate(i for i in gt.records[0].instances if not i.iscrowd)
               if gt.classes[x.class_id] == "car")
    res = evaluate_cityscapes(gt, _perfect(gt, drop=(0, car)))
    assert res["per_class"]["person"] == pytest.approx(100.0)
    assert res["per_class"]["car"] == pytest.approx(75.0)
    assert res["AP"] == pytest.approx(87.5) and res["AP50"] == pytest.approx(87.5)


def test_only_the_given_images_are_evaluated(tmp_path):
    gt = _fixture(tmp_path)
    one = Dataset(gt.records[:1], gt.classes, "one", gt.category_ids)
    assert evaluate_cityscapes(one, _perfect(one))["num_images"] == 1
    assert evaluate_cityscapes(one, _perfect(one))["AP"] == pytest.approx(100.0)


def test_wrong_mask_size_and_non_cityscapes_classes_are_explained(tmp_path):
    gt = _fixture(tmp_path)
    r = gt.records[0]
    small = ImageRecord(r.file_name, r.height, r.width, r.image_id,
                        [Instance.from_mask(np.ones((8, 8), np.uint8), 0, score=0.5)])
    with pytest.raises(ValueError, match="original resolution"):
        evaluate_cityscapes(Dataset(gt.records[:1], gt.classes), [small])
    with pytest.raises(ValueError, match="not Cityscapes label names"):
        evaluate_cityscapes(Dataset(gt.records, ["circle"] * 8), [])


def test_stages_record_it_beside_coco_ap_or_say_how_to_install(tmp_path, monkeypatch, caplog):
    import sskd.evaluation.cityscapes_eval as cs
    from sskd.stages.common import _cityscapes_ap
    gt = _fixture(tmp_path)
    res = _cityscapes_ap(gt, _perfect(gt, drop=(0, 2)), "student_refined")
    assert res["cityscapes_AP"] == pytest.approx(87.5)
    assert res["cityscapes_AP50"] == pytest.approx(87.5)
    monkeypatch.setattr(cs, "cityscapes_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert _cityscapes_ap(gt, [], "student_refined") == {}
    assert "pip install 'sskd[cityscapes]'" in caplog.text
