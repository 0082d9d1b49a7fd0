"""sskd.inspect.run.export_run_dir: the files of a run dir -> the complete FiftyOne dataset."""

from __future__ import annotations

import logging
import shutil

import pytest


@pytest.fixture(scope="module")
def run_mod(mongod):
    import sskd.inspect.run as run_mod

    return run_mod


def test_run_fields_finds_every_jsonl(smoke_run, run_mod):
    assert run_mod.run_fields(smoke_run.root) == smoke_run.fields
    assert list(run_mod.run_fields(smoke_run.root)) == sorted(  # pseudo-labels, then predictions
        smoke_run.fields, key=lambda f: (not f.startswith("pl_"), f))


def test_export_run_dir_produces_fields_views_and_embeddings(exported, smoke_run):
    info = exported.info["sskd"]
    assert set(info["fields"]) == {"ground_truth", *smoke_run.fields}
    assert set(info["evaluations"]) == set(smoke_run.fields)
    assert "fp_pl_teacher_zero_shot" in exported.list_saved_views()
    assert {"emb_teacher", "emb_student"} <= set(exported.get_field_schema())
    assert info["run_dir"] == str(smoke_run.root.resolve())


def test_missing_checkpoints_and_bad_datasets_are_reported(smoke_run, run_mod, tmp_path, caplog):
    root = tmp_path / "bare"
    shutil.copytree(smoke_run.root, root, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(ValueError, match=r"datasets lacks \['unlabeled'\]"):
        run_mod.export_run_dir(root, datasets={"val": smoke_run.val, "labeled": smoke_run.labeled})
    with caplog.at_level(logging.INFO, logger="sskd.inspect"):
        ds = run_mod.export_run_dir(root, datasets=smoke_run.splits, views=False)
    assert ds.name.startswith("sskd-bare-") and len(ds) == 10
    assert "embeddings teacher skipped" in caplog.text
    assert "embeddings student skipped" in caplog.text
    assert "emb_teacher" not in ds.get_field_schema() and ds.list_saved_views() == []
    ds.delete()


def test_view_fields_narrow_evaluations_views_and_embeddings(smoke_run, run_mod, tmp_path, caplog):
    from sskd.config import read_config, save_config

    root = tmp_path / "narrow"
    shutil.copytree(smoke_run.root, root)
    keep = sorted(smoke_run.fields)[0]
    cfg = read_config(root / "config.yaml")
    cfg.inspect.view_fields = [keep, "pl_no_such_teacher"]
    cfg.inspect.mistakenness = False
    save_config(cfg, root / "config.yaml")
    with caplog.at_level(logging.WARNING, logger="sskd.inspect"):
        ds = run_mod.export_run_dir(root, datasets=smoke_run.splits, method="pca")
    assert "1 field(s) not in this run, skipped: ['pl_no_such_teacher']" in caplog.text
    info = ds.info["sskd"]
    assert set(info["fields"]) == {"ground_truth", *smoke_run.fields}  # all still exported
    assert set(info["evaluations"]) == {keep}
    assert {v.split("_", 1)[1] for v in ds.list_saved_views()} <= {keep}
    assert not any(v.startswith("mistaken_") for v in ds.list_saved_views())
    other = next(f for f in smoke_run.fields if f != keep)
    embedded = lambda f: ds.count(f"{f}.detections.emb_teacher")  # noqa: E731
    assert embedded(keep) > 0 and embedded("ground_truth") > 0 and embedded(other) == 0
    ds.delete()


def test_two_run_roots_with_a_run_of_the_same_name_keep_separate_datasets(smoke_run, run_mod,
                                                                             tmp_path):
    from sskd.inspect import app
    from sskd.inspect.fiftyone_export import dataset_name_for, fo

    a, b = tmp_path / "root_a" / "demo", tmp_path / "root_b" / "demo"
    for root in (a, b):
        shutil.copytree(smoke_run.root, root, ignore=shutil.ignore_patterns("checkpoints"))
    (b / "pseudo_labels" / "teacher_zero_shot.jsonl").unlink()   # b differs from a
    assert dataset_name_for(a) != dataset_name_for(b)
    assert dataset_name_for(a) == dataset_name_for(tmp_path / "root_a" / ".." / "root_a" / "demo")
    ds_a = run_mod.export_run_dir(a, datasets=smoke_run.splits, views=False, embeddings=False)
    ds_b = run_mod.export_run_dir(b, datasets=smoke_run.splits, views=False, embeddings=False)
    try:
        assert fo.dataset_exists(ds_a.name) and fo.dataset_exists(ds_b.name)
        # the second export did not overwrite the first: a keeps the field only it has
        assert "pl_teacher_zero_shot" in fo.load_dataset(ds_a.name).get_field_schema()
        assert "pl_teacher_zero_shot" not in fo.load_dataset(ds_b.name).get_field_schema()
        # sskd app / notebooks find each run's own dataset
        assert app._dataset_for(a, export=False).name == ds_a.name
        assert app._dataset_for(b, export=False).name == ds_b.name
    finally:
        ds_a.delete()
        ds_b.delete()
