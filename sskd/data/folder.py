"""An unlabeled image folder (recursive) -> a :class:`~sskd.data.records.Dataset` without
instances (the unlabeled set D_u, or extra unlabeled images)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

from sskd.data.errors import DataError, SkipLog
from sskd.data.images import IMAGE_SUFFIXES, image_size, is_image_file, load_image
from sskd.data.records import Dataset, ImageRecord

# Ids stay below 2**53 so they survive JSON readers that use doubles (JavaScript, FiftyOne app).
_ID_BITS = 52


def stable_image_id(key: str) -> int:
    """A positive int id derived from ``key`` (e.g. a relative path) alone.

    Unlike a running index, it does not change when files are added to or removed from the
    folder, so split files that store ids keep pointing at the same images, and ids of an
    extra unlabeled folder practically never clash with the small ids of a COCO json.
    """
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (2**_ID_BITS - 1) + 1


def assign_stable_ids(keys: Sequence[str]) -> list[int]:
    """:func:`stable_image_id` of each key; a (rare) clash moves the later key to the next free id.

    ``keys`` must be given in a deterministic order (sorted) so the result is reproducible.
    """
    used: set[int] = set()
    ids = []
    for k in keys:
        i = stable_image_id(k)
        while i in used:
            i = i % (2**_ID_BITS - 1) + 1
        used.add(i)
        ids.append(i)
    return ids


def list_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, symlinks followed once, hidden entries skipped),
    sorted by their path relative to ``root``."""
    root = Path(root)
    found: list[Path] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and is_image_file(f))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_image_folder(root: str | Path, *, classes: Iterable[str] = (),
                      skip_log: SkipLog | None = None, check_images: bool = False,
                      name: str | None = None) -> Dataset:
    """All images under ``root`` as records without instances (the unlabeled set D_u).

    Args:
        root: folder, searched recursively for jpg/jpeg/png/bmp/tif/tiff/webp (any case).
        classes: the class names to attach (those of the labeled set the folder goes with).
        skip_log: collects files that cannot be read (counted skip "corrupt image").
        check_images: decode every image (catches truncated files; slow), not just its header.
        name: ``Dataset.name`` (default: the folder name).

    Returns:
        Dataset sorted by relative path; ``image_id`` = :func:`stable_image_id` of that path,
        ``file_name`` absolute, ``height``/``width`` from the file headers (no pixel decode).
    """
    root = Path(os.path.abspath(Path(root).expanduser()))
    if not root.is_dir():
        raise DataError(root, "image folder not found" if not root.exists() else "not a folder",
                        "check the path (e.g. the data.unlabeled_dir setting)")
    log = skip_log if skip_log is not None else SkipLog(root.name)
    paths = list_images(root)
    if not paths:
        raise DataError(root, f"no image files found (looked for {', '.join(IMAGE_SUFFIXES)}, "
                        "recursively)", "put the images there or fix the path")
    ids = assign_stable_ids([p.relative_to(root).as_posix() for p in paths])
    records = []
    for path, image_id in zip(paths, ids):
        try:
            h, w = load_image(path).shape[:2] if check_images else image_size(path)
        except DataError as e:
            log.skip("corrupt image", path, e.problem)
            continue
        records.append(ImageRecord(str(path), h, w, image_id))
    if not records:
        raise DataError(root, f"none of the {len(paths)} image files could be read",
                        "see the logged reasons; replace or delete the broken files")
    if log.count:
        log.log_summary()
    return Dataset(records, list(classes), name=root.name if name is None else name)
