"""sskd/data/ade20k.py: the ADE20K-instance COCO json of the standard (Mask2Former) conversion."""

import json

import numpy as np
import pytest
from PIL import Image

from sskd.data.ade20k import (ADE20K_INSTANCE_CATEGORIES, default_image_root,
                              read_ade20k_instances)
from sskd.data.errors import DataError
from sskd.data.records import encode_mask

H, W = 10, 14


def _ann(ann_id, image_id, cat, mask):
    ys, xs = np.nonzero(mask)
    rle = encode_mask(mask)
    return {"id": ann_id, "image_id": image_id, "iscrowd": 0, "category_id": cat,
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                     int(ys.max() - ys.min() + 1)],
            "segmentation": rle, "area": int(mask.sum())}


def ade_fixture(root, split="train", categories=None):
    """The ADEChallengeData2016 layout with a json shaped like the conversion's output."""
    ade = root / "ADEChallengeData2016"
    img_dir = ade / "images" / ("training" if split == "train" else "validation")
    img_dir.mkdir(parents=True)
    images, anns = [], []
    for n in (1, 2):
        stem = f"ADE_{split}_{n:08d}"
        Image.fromarray(np.full((H, W, 3), 60 * n, np.uint8)).save(img_dir / f"{stem}.jpg")
        images.append({"id": stem, "file_name": f"{stem}.jpg", "width": W, "height": H})
    m1 = np.zeros((H, W), np.uint8)
    m1[1:4, 2:7] = 1
    m2 = np.zeros((H, W), np.uint8)
    m2[5:9, 0:3] = 1
    anns = [_ann(1, "ADE_%s_00000001" % split, 12, m1),   # person
            _ann(2, "ADE_%s_00000001" % split, 7, m2),    # bed
            _ann(3, "ADE_%s_00000002" % split, 149, m1)]  # flag
    cats = categories if categories is not None else [
        {"id": i, "name": n} for i, n in ADE20K_INSTANCE_CATEGORIES]
    d = {"images": images, "categories": cats, "annotations": anns}
    p = ade / f"ade20k_instance_{split}.json"
    p.write_text(json.dumps(d))
    return p, img_dir, {"person": m1, "bed": m2}


def test_category_table_matches_the_conversion():
    ids = [i for i, _ in ADE20K_INSTANCE_CATEGORIES]
    names = [n for _, n in ADE20K_INSTANCE_CATEGORIES]
    assert len(ids) == len(set(ids)) == 100 and ids == sorted(ids)
    assert ids[0] == 7 and ids[-1] == 149 and len(set(names)) == 100
    # spot checks against the SceneParse150 order (index = id): 12 person, 20 car, 127 bicycle
    lookup = dict(ADE20K_INSTANCE_CATEGORIES)
    assert (lookup[12], lookup[20], lookup[127], lookup[80]) == ("person", "car", "bicycle", "bus")


def test_reads_conversion_json_with_default_image_root(tmp_path):
    p, img_dir, masks = ade_fixture(tmp_path)
    ds = read_ade20k_instances(p)
    assert len(ds.classes) == 100 and ds.category_ids[:3] == [7, 8, 10]
    assert ds.name == "ade20k_instance_train"
    assert [r.image_id for r in ds] == [1, 2]
    assert ds.records[0].file_name == str(img_dir / "ADE_train_00000001.jpg")
    person, bed = ds.records[0].instances
    assert ds.classes[person.class_id] == "person" and ds.category_ids[person.class_id] == 12
    assert ds.classes[bed.class_id] == "bed" and bed.class_id == 0
    np.testing.assert_array_equal(person.mask(), masks["person"])
    assert person.bbox == [2.0, 1.0, 5.0, 3.0]
    (flag,) = ds.records[1].instances
    assert ds.classes[flag.class_id] == "flag" and flag.class_id == 99


def test_validation_split_and_explicit_image_root(tmp_path):
    p, img_dir, _ = ade_fixture(tmp_path, split="val")
    assert default_image_root(p) == img_dir
    ds = read_ade20k_instances(p, img_dir, check_images=True)
    assert [r.image_id for r in ds] == [1, 2] and sum(len(r.instances) for r in ds) == 3


def test_synonyms_stripped_and_missing_categories_filled(tmp_path):
    cats = [{"id": 7, "name": "bed "}, {"id": 12, "name": "person, individual, someone"},
            {"id": 149, "name": "flag"}]
    p, _, _ = ade_fixture(tmp_path, categories=cats)
    ds = read_ade20k_instances(p)
    assert ds.classes == ["bed", "person", "flag"] and ds.category_ids == [7, 12, 149]
    d = json.loads(p.read_text())
    d["categories"] = []
    p.write_text(json.dumps(d))
    assert len(read_ade20k_instances(p).classes) == 100


def test_unknown_split_name_needs_image_root(tmp_path):
    p, img_dir, _ = ade_fixture(tmp_path)
    other = p.with_name("my_subset.json")
    other.write_text(p.read_text())
    with pytest.raises(DataError, match=r"my_subset\.json: cannot tell the split.*image_root"):
        read_ade20k_instances(other)
    assert len(read_ade20k_instances(other, img_dir)) == 2
