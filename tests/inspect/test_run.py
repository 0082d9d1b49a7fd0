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
    assert ds.name == "sskd-bare" and len(ds) == 10
    assert "embeddings teacher skipped" in caplog.text
    assert "embeddings student skipped" in caplog.text
    assert "emb_teacher" not in ds.get_field_schema() and ds.list_saved_views() == []
    ds.delete()
