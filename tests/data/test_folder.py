"""sskd/data/folder.py: recursive unlabeled image folder -> Dataset with stable ids."""

import os

import numpy as np
import pytest
from PIL import Image

from sskd.data.errors import DataError, SkipLog
from sskd.data.folder import assign_stable_ids, list_images, read_image_folder, stable_image_id


def _img(path, h=5, w=7, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".webp": "WEBP",
           ".bmp": "BMP", ".png": "PNG"}[path.suffix.lower()]
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path, format=fmt)


def folder_fixture(root):
    names = ["b.PNG", "a.jpg", "sub/z.jpeg", "sub/deeper/c.bmp", "t.TIFF", "w.webp", "u.tif"]
    for i, n in enumerate(names):
        _img(root / n, h=5 + i, w=7)
    (root / "notes.txt").write_text("not an image")
    (root / "labels.json").write_text("{}")
    _img(root / ".hidden.png")
    _img(root / ".ipynb_checkpoints" / "x.png")
    return names


def test_reads_all_extensions_recursively_in_sorted_order(tmp_path):
    folder_fixture(tmp_path)
    ds = read_image_folder(tmp_path, classes=["cat", "dog"])
    rel = [os.path.relpath(r.file_name, tmp_path) for r in ds]
    assert rel == ["a.jpg", "b.PNG", "sub/deeper/c.bmp", "sub/z.jpeg", "t.TIFF", "u.tif", "w.webp"]
    assert ds.classes == ["cat", "dog"] and ds.name == tmp_path.name
    assert all(not r.instances for r in ds)
    assert all(os.path.isabs(r.file_name) for r in ds)
    sizes = {os.path.relpath(r.file_name, tmp_path): (r.height, r.width) for r in ds}
    assert sizes["b.PNG"] == (5, 7) and sizes["a.jpg"] == (6, 7) and sizes["u.tif"] == (11, 7)


def test_ids_are_stable_when_files_are_added(tmp_path):
    folder_fixture(tmp_path)
    before = {r.file_name: r.image_id for r in read_image_folder(tmp_path)}
    assert len(set(before.values())) == len(before)
    assert all(0 < i < 2**53 for i in before.values())
    _img(tmp_path / "0first.png")  # sorts before every other file
    after = {r.file_name: r.image_id for r in read_image_folder(tmp_path)}
    assert len(after) == len(before) + 1
    assert all(after[f] == i for f, i in before.items())
    # independent of where the folder lives: ids hash the path relative to the root
    assert read_image_folder(tmp_path).records[1].image_id == stable_image_id("a.jpg")


def test_id_clash_is_resolved_deterministically():
    assert assign_stable_ids(["x", "x", "y"]) == assign_stable_ids(["x", "x", "y"])
    ids = assign_stable_ids(["x", "x", "y"])
    assert len(set(ids)) == 3 and ids[0] == stable_image_id("x") and ids[1] == ids[0] + 1


def test_unreadable_image_is_a_counted_skip(tmp_path):
    folder_fixture(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    log = SkipLog()
    ds = read_image_folder(tmp_path, skip_log=log)
    assert len(ds) == 7 and log.count == 1
    assert log.reasons["corrupt image"] == [str(tmp_path / "broken.png")]


def test_check_images_catches_truncated_file(tmp_path):
    _img(tmp_path / "ok.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    assert len(read_image_folder(tmp_path)) == 2          # header-only: not detected
    log = SkipLog()
    ds = read_image_folder(tmp_path, check_images=True, skip_log=log)
    assert [os.path.basename(r.file_name) for r in ds] == ["ok.png"]
    assert log.reasons["corrupt image"] == [str(tmp_path / "t.png")]


def test_symlink_loop_does_not_hang(tmp_path):
    _img(tmp_path / "d" / "a.png")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]


def test_missing_or_empty_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"nope: image folder not found"):
        read_image_folder(tmp_path / "nope")
    (tmp_path / "only.txt").write_text("x")
    with pytest.raises(DataError, match=r"no image files found.*\.jpg"):
        read_image_folder(tmp_path)
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 1 image files could be read"):
        read_image_folder(tmp_path)
