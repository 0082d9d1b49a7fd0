"""Bad input (issue 2 item 8): every case of the table in sskd/data/errors.py, one test each."""

import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

import sskd.data.errors as errors_module
from sskd.data.ade20k import read_ade20k_instances
from sskd.data.coco import from_coco_dict, read_coco
from sskd.data.errors import DataError, SkipLog
from sskd.data.images import load_image
from sskd.data.records import encode_mask

H, W = 10, 12


def _square(y0=2, y1=6, x0=3, x1=8):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def make_coco(tmp_path, n_images=3, anns=None):
    """``n_images`` good PNGs and a json with one square annotation on each image."""
    root = tmp_path / "img"
    root.mkdir(exist_ok=True)
    images = []
    for i in range(1, n_images + 1):
        Image.fromarray(np.full((H, W, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": H, "width": W})
    if anns is None:
        anns = [{"id": 100 + i, "image_id": i, "category_id": 4, "bbox": [3, 2, 5, 4],
                 "segmentation": encode_mask(_square())} for i in range(1, n_images + 1)]
    d = {"images": images, "annotations": anns, "categories": [{"id": 4, "name": "thing"}]}
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(d))
    return p, root, d


def _rewrite(p, d):
    p.write_text(json.dumps(d))
    return p


# ----------------------------------------------------------------------------- error type, log


def test_data_error_names_file_problem_fix_and_pickles():
    e = DataError("/x/a.json", "malformed json at line 3, column 9", "re-export it")
    assert str(e) == "/x/a.json: malformed json at line 3, column 9. Fix: re-export it"
    assert isinstance(e, ValueError)
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and e2.path == "/x/a.json" and e2.fix == "re-export it"


def test_skip_log_counts_logs_and_summarises(caplog):
    log = SkipLog("toy")
    with caplog.at_level(logging.DEBUG, logger="sskd.data"):
        for i in range(7):
            log.skip("empty mask", f"f{i}.json")
        log.skip("missing image", "a.png", "not found")
        log.fix("bbox clipped", "b.png")
    assert log.count == 8 and log.fix_count == 1
    assert log.reasons["empty mask"] == [f"f{i}.json" for i in range(7)]
    assert log.fixes == {"bbox clipped": ["b.png"]}
    assert log.summary() == ("toy: 8 skipped (empty mask: 7, missing image: 1); "
                             "1 repaired (bbox clipped: 1)")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 5 + 1 + 1  # the first 5 per reason, then DEBUG
    assert "a.png" in caplog.text and "not found" in caplog.text
    empty = SkipLog()
    assert empty.count == 0 and empty.summary() == "data: 0 skipped"


def test_docstring_table_lists_every_case():
    doc = errors_module.__doc__
    for case in ("missing image", "corrupt / truncated", "16-bit", "malformed json",
                 "unknown category id", "box outside the image", "empty mask",
                 "duplicate image ids"):
        assert case in doc, case


# ----------------------------------------------------------------------------- images


def test_missing_image_error_or_counted_skip(tmp_path):
    p, root, _ = make_coco(tmp_path)
    (root / "2.png").unlink()
    with pytest.raises(DataError, match=r"2\.png: image file not found"):
        load_image(root / "2.png")
    # without check_images the record is kept (found at load time, with the error above)
    assert len(read_coco(p, root)) == 3
    log = SkipLog()
    ds = read_coco(p, root, check_images=True, skip_log=log)
    assert [r.image_id for r in ds] == [1, 3]
    assert log.reasons == {"missing image": [str(root / "2.png")]}


def test_all_images_missing_means_wrong_root(tmp_path):
    p, root, _ = make_coco(tmp_path)
    with pytest.raises(DataError, match=r"none of the 3 images.*image_root is probably wrong"):
        read_coco(p, tmp_path / "elsewhere", check_images=True)


def test_corrupt_and_truncated_images_counted_skips(tmp_path):
    p, root, _ = make_coco(tmp_path)
    (root / "1.png").write_bytes(b"garbage")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(root / "2.png")
    data = (root / "2.png").read_bytes()
    (root / "2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"1\.png: not a readable image"):
        load_image(root / "1.png")
    log = SkipLog()
    ds = read_coco(p, root, check_images=True, skip_log=log)
    assert [r.image_id for r in ds] == [3]
    assert sorted(log.reasons["corrupt image"]) == [str(root / "1.png"), str(root / "2.png")]


def test_image_size_mismatch_is_counted_skip(tmp_path):
    p, root, _ = make_coco(tmp_path)
    Image.fromarray(np.zeros((H + 2, W, 3), np.uint8)).save(root / "3.png")
    log = SkipLog()
    ds = read_coco(p, root, check_images=True, skip_log=log)
    assert [r.image_id for r in ds] == [1, 2] and list(log.reasons) == ["size mismatch"]


def test_gray_rgba_sixteen_bit_images_are_converted_not_skipped(tmp_path):
    p, root, _ = make_coco(tmp_path)
    Image.fromarray(np.full((H, W), 77, np.uint8)).save(root / "1.png")
    Image.fromarray(np.full((H, W, 4), 200, np.uint8), "RGBA").save(root / "2.png")
    Image.fromarray(np.full((H, W), 65535, np.uint16)).save(root / "3.png")
    log = SkipLog()
    ds = read_coco(p, root, check_images=True, skip_log=log)
    assert len(ds) == 3 and log.count == 0
    loaded = [load_image(r.file_name) for r in ds]
    assert all(a.shape == (H, W, 3) and a.dtype == np.uint8 for a in loaded)
    assert [int(a[0, 0, 0]) for a in loaded] == [77, 157, 255]  # 200 * 200/255 composited


# ----------------------------------------------------------------------------- json structure


def test_malformed_json_names_file_line_and_column(tmp_path):
    p, root, _ = make_coco(tmp_path)
    p.write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match=r"ann\.json: malformed json at line 2, column 12"):
        read_coco(p, root)
    p.write_text(p.read_text()[:5])  # truncated download
    with pytest.raises(DataError, match=r"ann\.json: malformed json at line 1"):
        read_ade20k_instances(p, root)


def test_not_coco_json_names_the_missing_key(tmp_path):
    p, root, d = make_coco(tmp_path)
    _rewrite(p, [1, 2])
    with pytest.raises(DataError, match="top level is a list"):
        read_coco(p, root)
    _rewrite(p, {k: v for k, v in d.items() if k != "categories"})
    with pytest.raises(DataError, match=r"ann\.json: the json has no 'categories' key"):
        read_coco(p, root)
    _rewrite(p, {k: v for k, v in d.items() if k != "images"})
    with pytest.raises(DataError, match="has no 'images' key"):
        read_coco(p, root)


def test_duplicate_image_ids_name_the_id_and_file(tmp_path):
    p, root, d = make_coco(tmp_path)
    d["images"][2]["id"] = 1
    _rewrite(p, d)
    with pytest.raises(DataError, match=r"ann\.json: duplicate image id 1\b"):
        read_coco(p, root)


def test_duplicate_category_ids(tmp_path):
    p, root, d = make_coco(tmp_path)
    d["categories"].append({"id": 4, "name": "again"})
    with pytest.raises(DataError, match=r"ann\.json: duplicate category id 4"):
        read_coco(_rewrite(p, d), root)


def test_unknown_category_id_names_annotation_and_file(tmp_path):
    p, root, d = make_coco(tmp_path)
    d["annotations"][1]["category_id"] = 99
    with pytest.raises(DataError, match=r"ann\.json: annotation 102 has category id 99.*"
                                        r"Fix: add that category"):
        read_coco(_rewrite(p, d), root)


def test_annotation_of_unknown_image(tmp_path):
    p, root, d = make_coco(tmp_path)
    d["annotations"][0]["image_id"] = 42
    with pytest.raises(DataError, match="annotation 101 refers to image id 42"):
        read_coco(_rewrite(p, d), root)


def test_mask_size_differs_from_image(tmp_path):
    p, root, d = make_coco(tmp_path)
    d["annotations"][0]["segmentation"] = encode_mask(np.ones((H * 2, W * 2), np.uint8))
    with pytest.raises(DataError, match=r"annotation 101 \(image 1\.png\): mask size \[20, 24\]"):
        read_coco(_rewrite(p, d), root)


# ----------------------------------------------------------------------------- annotations


def test_box_outside_image_is_clipped_and_counted(tmp_path):
    p, root, d = make_coco(tmp_path)
    d["annotations"][0]["bbox"] = [-3, 2, 20, 4]        # sticks out left and right
    d["annotations"][1]["bbox"] = [50, 50, 5, 5]        # entirely outside: use the mask box
    d["annotations"][2]["bbox"] = [3, 2, 5, 4.0000001]  # float noise: not counted
    log = SkipLog()
    ds = read_coco(_rewrite(p, d), root, skip_log=log)
    boxes = [r.instances[0].bbox for r in ds]
    assert boxes[0] == [0.0, 2.0, float(W), 4.0]
    assert boxes[1] == [3.0, 2.0, 5.0, 4.0]
    assert boxes[2] == pytest.approx([3.0, 2.0, 5.0, 4.0])
    assert log.count == 0 and log.fix_count == 2
    assert len(log.fixes["bbox clipped"]) == 2 and "annotation 101" in log.fixes["bbox clipped"][0]


def test_empty_masks_are_skipped_and_counted(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 4, "segmentation": encode_mask(np.zeros((H, W)))},
        {"id": 2, "image_id": 1, "category_id": 4, "segmentation": [[1, 1, 5, 1]]},  # 2 points
        {"id": 3, "image_id": 1, "category_id": 4, "segmentation": [[2, 2, 2, 2, 2, 2]]},  # a dot
        {"id": 4, "image_id": 2, "category_id": 4, "segmentation": encode_mask(_square())},
        {"id": 5, "image_id": 2, "category_id": 4, "bbox": [1, 1, 3, 3]},  # box only
        {"id": 6, "image_id": 2, "category_id": 4, "segmentation": []},
    ]
    p, root, _ = make_coco(tmp_path, n_images=2, anns=anns)
    log = SkipLog()
    ds = read_coco(p, root, skip_log=log)
    assert [len(r.instances) for r in ds] == [0, 1]  # the image itself stays (a negative)
    assert len(log.reasons["empty mask"]) == 3 and len(log.reasons["no segmentation"]) == 2
    assert any("annotation 2 " in s for s in log.reasons["empty mask"])


def test_unknown_segmentation_form(tmp_path):
    p, root, d = make_coco(tmp_path)
    d["annotations"][0]["segmentation"] = {"polygon": [1, 2, 3]}
    with pytest.raises(DataError, match=r"annotation 101 .*segmentation of unknown form"):
        from_coco_dict(d, root, source=str(p))


def test_one_skip_log_collects_several_readers(tmp_path):
    p, root, d = make_coco(tmp_path)
    d["annotations"][0]["segmentation"] = []
    _rewrite(p, d)
    log = SkipLog("all")
    read_coco(p, root, skip_log=log)
    read_coco(p, root, skip_log=log)
    assert log.count == 2 and log.summary() == "all: 2 skipped (no segmentation: 2)"
