"""sskd/data/cityscapes.py: gtFine instanceIds -> 8 thing classes, crowd regions, layout errors."""

import numpy as np
import pytest
from PIL import Image

from sskd.data.cityscapes import CLASSES, LABEL_IDS, instances_from_ids, read_cityscapes
from sskd.data.errors import DataError, SkipLog

H, W = 8, 12


def _ids_map():
    ids = np.full((H, W), 7, np.uint16)        # road (stuff, label 7)
    ids[0:3, 0:3] = 24000                      # person #0
    ids[0:3, 4:6] = 24001                      # person #1
    ids[4:8, 0:5] = 26003                      # car #3
    ids[4:6, 6:12] = 26                        # a crowd of cars (class-only pixels)
    ids[6:8, 6:8] = 33000                      # bicycle #0
    ids[6:8, 9:12] = 29000                     # caravan: has instances, not evaluated
    ids[0:2, 8:12] = 1                         # ego vehicle (label 1)
    ids[2:4, 8:10] = 24                        # a group of persons
    return ids


def _write_city(root, split, city, name, ids=None, with_gt=True):
    img = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(img)
    if with_gt:
        gt = root / "gtFine" / split / city / f"{name}_gtFine_instanceIds.png"
        gt.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_ids_map() if ids is None else ids).save(gt)
    return img


def test_classes_are_the_eight_official_things():
    assert CLASSES == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    assert LABEL_IDS == [24, 25, 26, 27, 28, 31, 32, 33]


def test_instances_from_ids_things_crowds_and_ignored_labels():
    ids = _ids_map().astype(np.int32)
    insts = instances_from_ids(ids)
    got = sorted((CLASSES[i.class_id], i.iscrowd, int(i.area)) for i in insts)
    assert got == [("bicycle", 0, 4), ("car", 0, 20), ("car", 1, 12),
                   ("person", 0, 6), ("person", 0, 9), ("person", 1, 4)]
    car = next(i for i in insts if CLASSES[i.class_id] == "car" and not i.iscrowd)
    np.testing.assert_array_equal(car.mask(), ids == 26003)
    assert car.bbox == [0.0, 4.0, 5.0, 4.0]


def test_read_cityscapes_layout_order_and_metadata(tmp_path):
    _write_city(tmp_path, "train", "zurich", "zurich_000001_000019")
    _write_city(tmp_path, "train", "aachen", "aachen_000000_000019")
    _write_city(tmp_path, "val", "lindau", "lindau_000000_000019")
    ds = read_cityscapes(tmp_path, "train")
    assert ds.name == "cityscapes_train" and ds.classes == CLASSES
    assert ds.category_ids == LABEL_IDS
    assert [r.file_name.split("/")[-1] for r in ds] == [
        "aachen_000000_000019_leftImg8bit.png", "zurich_000001_000019_leftImg8bit.png"]
    assert all((r.height, r.width) == (H, W) and len(r.instances) == 6 for r in ds)
    assert len({r.image_id for r in ds}) == 2
    # ids do not depend on which other images are present
    again = read_cityscapes(tmp_path, "train")
    assert [r.image_id for r in again] == [r.image_id for r in ds]
    assert len(read_cityscapes(tmp_path, "val")) == 1


def test_missing_gt_is_a_counted_skip(tmp_path):
    _write_city(tmp_path, "train", "aachen", "aachen_000000_000019")
    lone = _write_city(tmp_path, "train", "aachen", "aachen_000001_000019", with_gt=False)
    log = SkipLog()
    ds = read_cityscapes(tmp_path, "train", skip_log=log)
    assert len(ds) == 1 and log.reasons["missing annotation"] == [str(lone)]


def test_layout_errors_name_the_folder_and_fix(tmp_path):
    with pytest.raises(DataError, match=r"leftImg8bit/train: Cityscapes image folder not found"):
        read_cityscapes(tmp_path, "train")
    _write_city(tmp_path, "val", "lindau", "lindau_000000_000019", with_gt=False)
    with pytest.raises(DataError, match=r"splits present: \['val'\].*gtFine_trainvaltest"):
        read_cityscapes(tmp_path, "train")
    with pytest.raises(DataError, match="none of the 1 images has a"):
        read_cityscapes(tmp_path, "val")


def test_size_mismatch_between_image_and_gt_is_an_error(tmp_path):
    _write_city(tmp_path, "train", "aachen", "aachen_000000_000019",
                ids=np.zeros((H, W + 1), np.uint16))
    with pytest.raises(DataError, match=r"instanceIds\.png: id map is 8x13 but its image is 8x12"):
        read_cityscapes(tmp_path, "train")
