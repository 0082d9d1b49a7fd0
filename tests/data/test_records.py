"""sskd/data/records.py: RLE helpers, Instance/ImageRecord/Dataset, COCO dict and jsonl I/O."""

import json

import numpy as np
import pytest

from sskd.data.records import (Dataset, ImageRecord, Instance, decode_mask, encode_mask,
                               iter_records_jsonl, mask_area, mask_bbox, mask_iou, polygons_to_rle,
                               to_coco, write_json_atomic, write_records_jsonl)
from sskd.safe_load import CorruptFileError


def _random_mask(rng, h=23, w=31):
    return (rng.random((h, w)) > 0.6).astype(np.uint8)


def test_encode_decode_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = _random_mask(rng)
        rle = encode_mask(m)
        assert isinstance(rle["counts"], str) and rle["size"] == [23, 31]
        np.testing.assert_array_equal(decode_mask(rle), m)
        assert mask_area(rle) == m.sum()


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="H x W"):
        encode_mask(np.zeros((2, 3, 4), np.uint8))


def _uncompressed_runs(m: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts of ``m``: column-major runs, starting with zeros."""
    runs, cur, n = [], 0, 0
    for v in m.flatten(order="F"):
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    return runs + [n]


def test_decode_uncompressed_rle_equals_compressed():
    m = np.zeros((4, 5), np.uint8)
    m[1:3, 2:4] = 1
    # column-major runs: 2 columns of zeros (8 px) + 1 px, then 2 on, 2 off, 2 on, then rest
    np.testing.assert_array_equal(decode_mask({"size": [4, 5], "counts": _uncompressed_runs(m)}), m)


def test_mask_bbox_and_polygons_to_rle():
    # square polygon covering x in [2, 6), y in [1, 4)
    rle = polygons_to_rle([[2, 1, 6, 1, 6, 4, 2, 4]], height=8, width=10)
    m = decode_mask(rle)
    assert m.shape == (8, 10)
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (2, 5, 1, 3)
    assert mask_bbox(rle) == [2.0, 1.0, 4.0, 3.0]
    # two polygons are merged into one mask
    two = polygons_to_rle([[0, 0, 2, 0, 2, 2, 0, 2], [5, 5, 7, 5, 7, 7, 5, 7]], 8, 10)
    assert mask_area(two) == 8


def test_instance_from_mask_tight_bbox():
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 3:9] = 1
    inst = Instance.from_mask(m, class_id=2, score=0.75)
    assert inst.bbox == [3.0, 2.0, 6.0, 3.0]
    assert inst.area == 18 and inst.class_id == 2 and inst.score == 0.75
    np.testing.assert_array_equal(inst.mask(), m)
    # bbox is filled in from the mask when not given
    assert Instance(class_id=0, segmentation=encode_mask(m)).bbox == [3.0, 2.0, 6.0, 3.0]


def _dataset():
    rng = np.random.default_rng(1)
    recs = []
    for i in range(3):
        insts = [Instance.from_mask(_random_mask(rng, 16, 20), class_id=k % 2,
                                    score=None if i == 0 else 0.5 + 0.1 * k) for k in range(i)]
        recs.append(ImageRecord(f"/imgs/img{i}.png", 16, 20, image_id=10 + i, instances=insts))
    return Dataset(recs, ["cat", "dog"], name="toy", category_ids=[3, 9])


def test_record_dict_round_trip_and_masks_stack():
    ds = _dataset()
    for r in ds:
        r2 = ImageRecord.from_dict(json.loads(json.dumps(r.to_dict())))
        assert (r2.file_name, r2.height, r2.width, r2.image_id) == (
            r.file_name, r.height, r.width, r.image_id)
        np.testing.assert_array_equal(r2.masks(), r.masks())
    assert ds.records[0].masks().shape == (0, 16, 20)
    assert ds.records[2].masks().shape == (2, 16, 20)


def test_to_coco_uses_original_category_ids_and_relative_paths(tmp_path):
    ds = _dataset()
    coco = to_coco(ds, image_root="/imgs", include_scores=True)
    assert [c["id"] for c in coco["categories"]] == [3, 9]
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert [im["file_name"] for im in coco["images"]] == ["img0.png", "img1.png", "img2.png"]
    anns = coco["annotations"]
    assert len(anns) == 3 and len({a["id"] for a in anns}) == 3
    assert [a["category_id"] for a in anns] == [3, 3, 9]
    assert all("score" in a for a in anns)
    # pycocotools can index it (areas, boxes, masks are consistent)
    from pycocotools.coco import COCO
    p = write_json_atomic(coco, tmp_path / "a.json")
    c = COCO(str(p))
    assert sorted(c.getImgIds()) == [10, 11, 12]
    m = c.annToMask(c.loadAnns(c.getAnnIds(imgIds=[12]))[1])
    np.testing.assert_array_equal(m, ds.records[2].instances[1].mask())


def test_jsonl_round_trip(tmp_path):
    ds = _dataset()
    p = write_records_jsonl(ds.records, tmp_path / "r.jsonl")
    back = list(iter_records_jsonl(p))
    assert [r.to_dict() for r in back] == [r.to_dict() for r in ds.records]
    assert not (tmp_path / "r.jsonl.tmp").exists()


def test_jsonl_truncated_last_line_is_an_error(tmp_path):
    # finished jsonl files are written atomically, so a torn last line means a damaged copy:
    # dropping it silently would lose an image's labels
    ds = _dataset()
    p = write_records_jsonl(ds.records, tmp_path / "r.jsonl")
    text = p.read_text()
    p.write_text(text[: len(text) - 25])
    with pytest.raises(CorruptFileError, match=r"r\.jsonl is corrupt .*line 3 .*re-run the stage"):
        list(iter_records_jsonl(p))


def test_jsonl_corrupt_middle_line_raises(tmp_path):
    ds = _dataset()
    p = write_records_jsonl(ds.records, tmp_path / "r.jsonl")
    lines = p.read_text().splitlines()
    lines[1] = lines[1][:30]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl is corrupt or unreadable \(line 2 "):
        list(iter_records_jsonl(p))


def test_subset_keeps_order_and_reports_missing():
    ds = _dataset()
    sub = ds.subset([12, 10])
    assert [r.image_id for r in sub] == [12, 10] and sub.classes == ["cat", "dog"]
    assert sub.category_ids == [3, 9]
    with pytest.raises(KeyError, match="99"):
        ds.subset([10, 99])


def test_mask_iou_of_compressed_and_uncompressed_rles():
    a = np.zeros((10, 10), np.uint8)
    a[0:4, 0:5] = 1                       # 20 px
    b = np.zeros((10, 10), np.uint8)
    b[2:6, 0:5] = 1                       # 20 px, 10 shared -> IoU 10 / 30
    ia, ib = Instance.from_mask(a, 0), Instance.from_mask(b, 1)
    # the same mask as an uncompressed (COCO iscrowd-style) RLE
    ib_list = Instance(class_id=1, segmentation={"size": [10, 10], "counts": _uncompressed_runs(b)})
    iou = mask_iou([ia, ib], [ib, ib_list])
    assert iou.shape == (2, 2)
    np.testing.assert_allclose(iou, [[1 / 3, 1 / 3], [1.0, 1.0]])
    assert mask_iou([], [ia]).shape == (0, 1)
