"""A crafted run -> its FiftyOne dataset: samples, fields, tags, exact masks, re-export."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from sskd.data.records import Dataset, Instance


@pytest.fixture(scope="module")
def fx(mongod):
    """The export module, imported only once the test database is configured."""
    import sskd.inspect.fiftyone_export as fx

    return fx


def test_export_counts_fields_splits_and_tags(exported, smoke_run, fx, kit):
    ds = exported
    assert ds.name == fx.dataset_name_for(smoke_run.root) and ds.persistent
    assert re.fullmatch(r"sskd-smoke-[0-9a-f]{8}", ds.name)
    assert len(ds) == smoke_run.n_images == 10
    assert fx.split_counts(ds) == {"val": 4, "labeled": 2, "unlabeled": 4}
    assert fx.field_counts(ds) == {
        "ground_truth": {"samples": 10, "instances": 15},
        "pl_teacher_zero_shot": {"samples": 4, "instances": 6},
        "pl_teacher_adapted": {"samples": 4, "instances": 6},
        "pred_teacher_adapted": {"samples": 4, "instances": 6},
        "pred_student_refined": {"samples": 4, "instances": 7},
    }
    # Pseudo-labels live on the unlabeled images, predictions on val (ids overlap: 3 is both).
    assert set(ds.exists("pl_teacher_zero_shot").values("split")) == {"unlabeled"}
    assert set(ds.exists("pred_student_refined").values("split")) == {"val"}
    s = ds[smoke_run.path("unlabeled", 3)]
    assert s.image_id == 3 and s.split == "unlabeled"
    assert sorted(s.tags) == ["stage:stage1b", "stage:zero_shot", "unlabeled"]
    v = ds[smoke_run.path("val", 3)]
    assert sorted(v.tags) == ["stage:stage1b", "stage:stage3", "val"]
    assert ds.count_sample_tags()["labeled"] == 2
    assert (v.metadata.width, v.metadata.height) == (kit.SIZE, kit.SIZE)
    info = ds.info["sskd"]
    assert info["classes"] == kit.CLASSES and ds.default_classes == kit.CLASSES
    assert info["fields"]["pl_teacher_adapted"] == {
        "kind": "pseudo_labels", "tag": "teacher_adapted", "stage": "stage1b",
        "source": str(smoke_run.fields["pl_teacher_adapted"]), "samples": 4}
    assert info["metrics"]["models"]["teacher_adapted"]["AP50"] == 2.0


def test_masks_round_trip_exactly(exported, smoke_run, kit):
    """Each exported Detection (box + cropped mask) rebuilds the original full-image mask."""
    from sskd.inspect.embeddings import _full_mask

    s = exported[smoke_run.path("val", 4)]
    dets = s.ground_truth.detections
    assert [d.label for d in dets] == [k for k, _ in kit.VAL[4]]
    expected = [kit.circle(24, 22, 9), kit.square(2, 36, 8)]
    for det, mask in zip(dets, expected):
        assert np.array_equal(_full_mask(det, kit.SIZE, kit.SIZE), mask)
        assert det.class_id == kit.CLASSES.index(det.label)
    pl = exported[smoke_run.path("unlabeled", 3)].pl_teacher_zero_shot.detections
    assert [round(d.confidence, 2) for d in pl] == [0.9, 0.8, 0.95]
    assert np.allclose(np.array(pl[2].bounding_box) * kit.SIZE, [36, 2, 8, 8])


def test_instance_to_detection_resizes_and_drops_empty(fx, kit):
    half = Instance.from_mask(kit.square(2, 2, 10)[::2, ::2], 1, 0.5)  # 24 x 24 mask, 48 image
    det = fx.instance_to_detection(half, kit.CLASSES, kit.SIZE, kit.SIZE)
    assert det.label == "square" and det.confidence == 0.5
    assert det.mask.shape == (10, 10) and det.mask.all()
    empty = Instance(class_id=0, segmentation=Instance.from_mask(np.zeros((4, 4)), 0).segmentation)
    assert fx.instance_to_detection(empty, kit.CLASSES, 4, 4) is None


def test_reexport_updates_in_place(smoke_run, fx, caplog, kit):
    name = "sskd-test-reexport"
    args = (smoke_run.root, smoke_run.gt, smoke_run.unlabeled, smoke_run.splits, smoke_run.fields)
    ds = fx.export_run(*args, dataset_name=name, overwrite=True)
    ids = dict(zip(*ds.values(["filepath", "id"])))
    first = fx.field_counts(ds)
    user = smoke_run.path("val", 1)
    sample = ds[user]
    sample.tags.append("reviewed")
    sample.save()
    from sskd.inspect.views import evaluate_field

    assert evaluate_field(ds, "pl_teacher_zero_shot")["samples"] == 4

    # Second export: one field file missing -> that field is skipped (logged), rest identical.
    fields = dict(smoke_run.fields)
    fields["pl_teacher_1a"] = smoke_run.root / "pseudo_labels" / "teacher_1a.jsonl"
    with caplog.at_level(logging.INFO, logger="sskd.inspect"):
        ds = fx.export_run(*args[:4], fields, dataset_name=name)
    assert "field pl_teacher_1a skipped" in caplog.text
    assert len(ds) == 10 and len(set(ds.values("filepath"))) == 10
    assert dict(zip(*ds.values(["filepath", "id"]))) == ids      # same samples, not re-added
    assert fx.field_counts(ds) == first
    assert sorted(ds[user].tags) == ["reviewed", "stage:stage1b", "stage:stage3", "val"]
    # results tied to the old label ids are cleared, not left dangling
    assert ds.list_evaluations() == [] and "evaluations" not in ds.info["sskd"]
    assert not ds.has_sample_field("eval_pl_teacher_zero_shot_tp")

    # Third export without the val split's images: they are removed, nothing else changes.
    gt = Dataset(smoke_run.labeled.records + smoke_run.unlabeled.records, kit.CLASSES)
    splits = {k: v for k, v in smoke_run.splits.items() if k != "val"}
    ds = fx.export_run(smoke_run.root, gt, smoke_run.unlabeled, splits, smoke_run.fields,
                       dataset_name=name)
    assert len(ds) == 6 and fx.split_counts(ds) == {"labeled": 2, "unlabeled": 4}
    assert ds.count("pl_teacher_zero_shot") == 4 and ds.count("pred_student_refined") == 0
    ds.delete()


def test_id_list_splits_work_when_unique_and_fail_clearly_when_ambiguous(smoke_run, fx, kit):
    unl = smoke_run.unlabeled
    ds = fx.export_run(smoke_run.root, Dataset(unl.records, kit.CLASSES), None,
                       {"unlabeled": [3, 4, 5, 6]}, {}, dataset_name="sskd-test-ids",
                       overwrite=True)
    assert fx.split_counts(ds) == {"unlabeled": 4}
    ds.delete()
    with pytest.raises(ValueError, match="pass each split as its Dataset"):
        fx.export_run(smoke_run.root, smoke_run.gt, None, {"val": [1, 2], "labeled": [1, 2]}, {},
                      dataset_name="sskd-test-ambiguous")


def test_bad_instances_are_counted_skips(smoke_run, fx, tmp_path, kit):
    from sskd.data.records import ImageRecord, write_records_jsonl

    rec = smoke_run.val.records[0]
    bad = ImageRecord(rec.file_name, rec.height, rec.width, rec.image_id,
                      [Instance.from_mask(kit.circle(10, 10, 4), 7, 0.9),     # class 7 of 2
                       Instance.from_mask(kit.circle(10, 10, 4), 0, 0.9)])
    missing = ImageRecord(str(tmp_path / "nope.png"), kit.SIZE, kit.SIZE, 99, [])
    moved = ImageRecord(str(tmp_path / "moved.png"), kit.SIZE, kit.SIZE, 2,   # val id 2, moved
                        [Instance.from_mask(kit.circle(30, 14, 7), 0, 0.8)])
    path = write_records_jsonl([bad, missing, moved], tmp_path / "pl.jsonl")
    ds = fx.export_run(smoke_run.root, smoke_run.val, None, {"val": smoke_run.val},
                       {"pl_x": path}, dataset_name="sskd-test-skips", overwrite=True)
    assert ds.info["sskd"]["notes"] == {
        "pl_x: class_id outside 0..1": 1,
        "pl_x: record for an image not in the run (skipped)": 1,
        "pl_x: matched by image_id (file_name not found)": 1}
    assert ds.count("pl_x.detections") == 2
    assert ds[smoke_run.path("val", 2)].pl_x.detections[0].label == "circle"
    ds.delete()
