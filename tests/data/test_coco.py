"""sskd/data/coco.py: COCO json -> Dataset (polygons, RLE in every form), and back."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from sskd.data.coco import from_coco_dict, load_json, read_coco, write_coco
from sskd.data.errors import DataError, SkipLog
from sskd.data.records import encode_mask

H, W = 12, 16


def _mask(y0, y1, x0, x1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def _uncompressed(m):
    """Column-major run lengths starting with a zero run (the iscrowd RLE form)."""
    flat = np.asarray(m).flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    return runs + [n]


def coco_fixture(tmp_path, write_images=True):
    """Two images, category ids 11/2/5 listed out of order, one annotation per mask form."""
    imgs = tmp_path / "images"
    (imgs / "sub").mkdir(parents=True)
    if write_images:
        for name in ("a.png", "sub/b.jpg"):
            Image.fromarray(np.full((H, W, 3), 128, np.uint8)).save(imgs / name)
    m_rle, m_unc = _mask(6, 10, 8, 14), _mask(0, 3, 0, 16)
    d = {
        "images": [{"id": 7, "file_name": "a.png", "height": H, "width": W},
                   {"id": 3, "file_name": "sub/b.jpg", "height": H, "width": W}],
        "categories": [{"id": 11, "name": "truck"}, {"id": 2, "name": "person"},
                       {"id": 5, "name": "car"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "iscrowd": 0, "bbox": [2, 1, 4, 3],
             "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]},
            {"id": 2, "image_id": 7, "category_id": 11, "iscrowd": 0, "bbox": [8, 6, 6, 4],
             "segmentation": encode_mask(m_rle)},
            {"id": 3, "image_id": 3, "category_id": 2, "iscrowd": 1, "bbox": [0, 0, 16, 3],
             "segmentation": {"size": [H, W], "counts": _uncompressed(m_unc)}},
        ],
    }
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(d))
    return p, imgs, d, {"rle": m_rle, "unc": m_unc}


def test_read_coco_all_mask_forms_and_category_mapping(tmp_path):
    p, imgs, _, masks = coco_fixture(tmp_path)
    log = SkipLog()
    ds = read_coco(p, imgs, skip_log=log)
    assert ds.classes == ["person", "car", "truck"]      # sorted by original id 2, 5, 11
    assert ds.category_ids == [2, 5, 11]
    assert ds.name == "ann" and log.count == 0 and log.fix_count == 0
    assert [r.image_id for r in ds] == [7, 3]             # json order, ids kept
    a, b = ds.records
    assert a.file_name == str((imgs / "a.png").resolve())
    assert b.file_name == str((imgs / "sub" / "b.jpg").resolve())
    assert (a.height, a.width) == (H, W)
    poly, rle = a.instances
    assert poly.class_id == 1 and rle.class_id == 2
    ys, xs = np.nonzero(poly.mask())
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 5, 1, 3)
    assert poly.bbox == [2.0, 1.0, 4.0, 3.0]
    np.testing.assert_array_equal(rle.mask(), masks["rle"])
    (crowd,) = b.instances
    assert crowd.iscrowd == 1 and crowd.class_id == 0
    np.testing.assert_array_equal(crowd.mask(), masks["unc"])
    # every stored RLE is compressed with str counts, as records.py promises
    assert all(isinstance(i.segmentation["counts"], str) for r in ds for i in r.instances)


def test_bytes_counts_accepted_from_dict(tmp_path):
    _, imgs, d, masks = coco_fixture(tmp_path)
    rle = mask_utils.encode(np.asfortranarray(masks["rle"]))  # counts is bytes here
    assert isinstance(rle["counts"], bytes)
    d["annotations"] = [{"id": 9, "image_id": 7, "category_id": 2, "segmentation": rle,
                         "bbox": [8, 6, 6, 4]}]
    ds = from_coco_dict(d, imgs)
    inst = ds.records[0].instances[0]
    assert isinstance(inst.segmentation["counts"], str)
    np.testing.assert_array_equal(inst.mask(), masks["rle"])


def test_flat_polygon_and_missing_bbox(tmp_path):
    _, imgs, d, _ = coco_fixture(tmp_path)
    d["annotations"] = [{"id": 1, "image_id": 3, "category_id": 2,
                         "segmentation": [1, 1, 5, 1, 5, 5, 1, 5]}]
    inst = from_coco_dict(d, imgs).by_id()[3].instances[0]
    assert inst.bbox == [1.0, 1.0, 4.0, 4.0] and inst.area == 16


def test_write_read_round_trip(tmp_path):
    p, imgs, _, _ = coco_fixture(tmp_path)
    ds = read_coco(p, imgs)
    out = write_coco(ds, tmp_path / "out" / "round.json", image_root=imgs)
    assert not out.with_name("round.json.tmp").exists()
    raw = json.loads(out.read_text())
    assert sorted(c["id"] for c in raw["categories"]) == [2, 5, 11]
    assert {im["file_name"] for im in raw["images"]} == {"a.png", "sub/b.jpg"}
    back = read_coco(out, imgs)
    assert back.classes == ds.classes and back.category_ids == ds.category_ids
    assert [r.to_dict() for r in back] == [r.to_dict() for r in ds]


def test_written_json_is_evaluable_by_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    p, imgs, _, _ = coco_fixture(tmp_path)
    ds = read_coco(p, imgs)
    gt_path = write_coco(ds, tmp_path / "gt.json", image_root=imgs)
    gt = COCO(str(gt_path))
    dets = [dict(a, score=1.0) for a in json.loads(gt_path.read_text())["annotations"]
            if not a["iscrowd"]]
    ev = COCOeval(gt, gt.loadRes(dets), "segm")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # ground truth scored against itself


def test_images_without_annotations_kept_and_missing_annotations_key(tmp_path):
    _, imgs, d, _ = coco_fixture(tmp_path)
    del d["annotations"]  # COCO test-set jsons have no annotations
    ds = from_coco_dict(d, imgs)
    assert len(ds) == 2 and all(not r.instances for r in ds)


def test_missing_image_size_read_from_header(tmp_path):
    _, imgs, d, _ = coco_fixture(tmp_path)
    for im in d["images"]:
        del im["height"], im["width"]
    ds = from_coco_dict(d, imgs)
    assert all((r.height, r.width) == (H, W) for r in ds)


def test_string_image_ids_become_ints(tmp_path):
    _, imgs, d, _ = coco_fixture(tmp_path)
    d["images"][0]["id"], d["images"][1]["id"] = "ADE_train_00000012", "ADE_train_00000004"
    for a in d["annotations"]:
        a["image_id"] = "ADE_train_00000012" if a["image_id"] == 7 else "ADE_train_00000004"
    ds = from_coco_dict(d, imgs)
    assert [r.image_id for r in ds] == [12, 4]
    assert [len(r.instances) for r in ds] == [2, 1]
    # ids without a unique trailing number fall back to the file order
    d["images"][0]["id"], d["images"][1]["id"] = "x_1", "y_1"
    for a in d["annotations"]:
        a["image_id"] = "x_1" if a["image_id"] == "ADE_train_00000012" else "y_1"
    assert [r.image_id for r in from_coco_dict(d, imgs)] == [1, 2]


def test_check_images_passes_on_good_images(tmp_path):
    p, imgs, _, _ = coco_fixture(tmp_path)
    log = SkipLog()
    assert len(read_coco(p, imgs, check_images=True, skip_log=log)) == 2 and log.count == 0


def test_load_json_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: annotation file not found"):
        load_json(tmp_path / "nope.json")
