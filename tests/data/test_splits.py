"""Tests of seeded labeled/unlabeled splits (sskd.data.splits)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sskd.data.records import Dataset, ImageRecord
from sskd.data.splits import make_splits, read_split, read_split_file, write_split, write_splits
from sskd.rundir import RunDir


def _dataset(ids) -> Dataset:
    return Dataset([ImageRecord(f"{i}.png", 8, 8, i) for i in ids], ["a", "b", "c"], "toy")


def test_make_splits_partitions_and_matches_the_documented_recipe():
    ids = [40, 3, 17, 8, 99, 1, 23, 5, 61, 12]
    s = make_splits(ids, 0.3, seed=7)
    assert len(s["labeled"]) == 3 and len(s["unlabeled"]) == 7
    assert s["labeled"] == sorted(s["labeled"]) and s["unlabeled"] == sorted(s["unlabeled"])
    assert sorted(s["labeled"] + s["unlabeled"]) == sorted(ids)
    # recipe: sorted ids, Generator(PCG64(seed)).permutation, first round(f*n) labeled
    perm = np.random.Generator(np.random.PCG64(7)).permutation(10)
    assert s["labeled"] == sorted(np.array(sorted(ids))[perm[:3]].tolist())


def test_make_splits_is_deterministic_and_order_independent():
    ids = list(range(100, 150))
    a = make_splits(ids, 0.1, 0)
    assert a == make_splits(list(reversed(ids)), 0.1, 0) == make_splits(_dataset(ids), 0.1, 0)
    assert a != make_splits(ids, 0.1, 1)
    assert len(a["labeled"]) == 5


@pytest.mark.parametrize("n,f,expected", [(10, 0.01, 1), (1, 0.5, 1), (4, 0.125, 1), (4, 0.375, 2),
                                          (7, 1.0, 7), (20, 0.05, 1), (30, 0.1, 3)])
def test_labeled_count_rounds_half_up_with_at_least_one(n, f, expected):
    s = make_splits(range(n), f, 3)
    assert len(s["labeled"]) == expected and len(s["unlabeled"]) == n - expected


def test_make_splits_rejects_bad_input():
    with pytest.raises(ValueError, match="labeled_fraction"):
        make_splits([1, 2], 0.0, 0)
    with pytest.raises(ValueError, match="labeled_fraction"):
        make_splits([1, 2], 1.5, 0)
    with pytest.raises(ValueError, match="empty"):
        make_splits([], 0.5, 0)
    with pytest.raises(ValueError, match="duplicates"):
        make_splits([1, 2, 2], 0.5, 0)


def test_write_read_roundtrip_and_format(tmp_path):
    p = write_split(tmp_path / "s" / "labeled.json", [9, 2, 5], dataset="train", seed=4,
                    fraction=0.25, name="labeled")
    assert read_split(p) == [2, 5, 9]
    text = p.read_text()
    assert text.endswith("}\n")
    obj = json.loads(text)
    assert list(obj) == sorted(obj)
    assert obj == {"dataset": "train", "fraction": 0.25, "image_ids": [2, 5, 9], "name": "labeled",
                   "num_images": 3, "seed": 4}
    assert read_split_file(p)["seed"] == 4
    assert [f.name for f in p.parent.iterdir()] == ["labeled.json"], "no temp files left behind"


def test_same_seed_gives_byte_identical_files(tmp_path):
    paths = []
    for d in ("a", "b", "c"):
        seed = 1 if d == "c" else 0
        paths.append(write_splits(RunDir(tmp_path / d), _dataset(range(1, 41)), [7, 3, 5],
                                  labeled_fraction=0.2, seed=seed))
    for name in ("labeled", "unlabeled", "val"):
        assert paths[0][name] == tmp_path / "a" / "splits" / f"{name}.json"
        assert paths[0][name].read_bytes() == paths[1][name].read_bytes()
    assert paths[0]["labeled"].read_bytes() != paths[2]["labeled"].read_bytes()
    assert read_split(paths[0]["val"]) == [3, 5, 7]
    assert json.loads(paths[0]["val"].read_text())["fraction"] is None
    lab, unl = read_split(paths[0]["labeled"]), read_split(paths[0]["unlabeled"])
    assert len(lab) == 8 and sorted(lab + unl) == list(range(1, 41))


def test_two_processes_write_the_same_bytes(tmp_path):
    code = ("import sys; from sskd.data.splits import write_splits; "
            "write_splits(sys.argv[1], range(1, 201), [1, 2], labeled_fraction=0.1, seed=42)")
    for d in ("p1", "p2"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / d)], check=True)
    write_splits(tmp_path / "here", range(1, 201), [1, 2], labeled_fraction=0.1, seed=42)
    for name in ("labeled", "unlabeled", "val"):
        b1 = (tmp_path / "p1" / "splits" / f"{name}.json").read_bytes()
        assert b1 == (tmp_path / "p2" / "splits" / f"{name}.json").read_bytes()
        assert b1 == (tmp_path / "here" / "splits" / f"{name}.json").read_bytes()


def test_read_split_errors_name_the_file_and_fix(tmp_path):
    missing = tmp_path / "splits" / "labeled.json"
    with pytest.raises(FileNotFoundError, match="labeled.json.*data stage"):
        read_split(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"image_ids": [1, 2')
    with pytest.raises(ValueError, match="bad.json is corrupt.*delete it"):
        read_split(bad)
    bad.write_text('{"image_ids": ["1", 2], "num_images": 2}')
    with pytest.raises(ValueError, match="list of integers"):
        read_split(bad)
    bad.write_text('{"image_ids": [1, 2], "num_images": 3}')
    with pytest.raises(ValueError, match="num_images=3"):
        read_split(bad)
    bad.write_text('[1, 2]')
    with pytest.raises(ValueError, match="corrupt"):
        read_split(bad)
