"""Bad input: one error type that names the file, the problem and the fix, and a skip log.

Every reader in :mod:`sskd.data` either raises :class:`DataError` or records a counted, logged
skip in a :class:`SkipLog`. The rule of thumb: a problem that makes the *whole* input suspect
(wrong path, broken json, ids that clash, labels we cannot interpret) is an error, because
training on it silently would give wrong numbers; a problem confined to one image or one
annotation that a large real dataset is expected to contain a few of is a counted skip (or a
counted repair), so one bad file among 100k does not stop a run but is never hidden.

=====================================  =====================================================
case                                   what happens
=====================================  =====================================================
missing image file                     ``load_image`` / ``image_size``: DataError naming the
                                       file. Readers with ``check_images=True``: counted skip
                                       ``"missing image"`` (record dropped); if *every* image
                                       is missing: DataError (the image root is wrong).
                                       ``check_images=False``: not looked at until loaded.
corrupt / truncated image              ``load_image``: DataError naming the file (partial
                                       pixels are never returned). Readers with
                                       ``check_images=True`` and ``read_image_folder``:
                                       counted skip ``"corrupt image"``.
image size != json height/width        ``check_images=True``: counted skip ``"size
                                       mismatch"`` (its masks would not line up).
grayscale, palette, LA/RGBA, CMYK,     converted to ``H x W x 3`` uint8 RGB, no error. Alpha
16-bit, float images                   is composited over black; 16-bit is scaled by 255/65535
                                       (not clipped); float must lie in [0, 1].
EXIF-rotated JPEG                      rotated upright (as viewers and detectron2 show it);
                                       ``image_size`` reports the upright size.
malformed json                         DataError naming the file, line and column.
json without "images"/"categories"     DataError naming the file and the missing key.
duplicate image ids                    DataError naming the id and the file (annotations
                                       could not be attributed to one image).
duplicate category ids                 DataError naming the id and the file.
annotation of an unknown image id      DataError naming the annotation id and the file.
unknown category id in an annotation   DataError naming the annotation id, the category id
                                       and the file. Not a skip: dropping a class's labels
                                       silently changes the class set and biases AP; the fix
                                       (add the category, or filter the annotations) is the
                                       user's decision.
mask size != image size                DataError naming the annotation (the annotation file
                                       was made for other images).
box outside the image                  clipped to the image, counted repair ``"bbox
                                       clipped"``; a box empty after clipping or missing is
                                       replaced by the mask's tight box.
empty mask (area 0, no valid polygon)  annotation skipped, counted ``"empty mask"``.
annotation without segmentation        annotation skipped, counted ``"no segmentation"``
                                       (box-only labels cannot train a mask head).
string image ids (ADE20K conversion)   mapped to ints: trailing digits when unique
                                       (``ADE_train_00000001`` -> 1), else file order.
Cityscapes image without gtFine file   counted skip ``"missing annotation"``; if every image
                                       lacks one: DataError (gtFine not unpacked).
image folder: non-image files          ignored (not images); hidden files/dirs ignored.
image folder: unreadable image file    counted skip ``"corrupt image"``.
empty image folder / missing root      DataError naming the folder and the accepted suffixes.
records jsonl: truncated last line     tolerated (a killed writer), see ``records.py``.
records jsonl: corrupt middle line     ValueError naming the file and line.
=====================================  =====================================================
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("sskd.data")

#: per reason, the first this-many events are logged at WARNING, the rest at DEBUG
LOG_FIRST = 5


class DataError(ValueError):
    """Bad input data. ``str(e)`` is ``"<path>: <problem>. Fix: <fix>"``.

    ``path``, ``problem`` and ``fix`` stay available as attributes, and the exception pickles
    (the args are kept), so it survives DataLoader worker processes.
    """

    def __init__(self, path: str | Path, problem: str = "", fix: str = "") -> None:
        super().__init__(str(path), problem, fix)
        self.path, self.problem, self.fix = str(path), problem, fix

    def __str__(self) -> str:
        msg = f"{self.path}: {self.problem}" if self.problem else self.path
        return f"{msg}. Fix: {self.fix}" if self.fix else msg


class SkipLog:
    """Counts and logs skipped items (and repaired ones) by reason.

    ``skip(reason, item)`` records an item that was left out; ``fix(reason, item)`` records one
    that was kept after a repair (e.g. a clipped box). ``reasons``/``fixes`` map a reason to
    the list of items (files, or ``"file: annotation id"``); ``count`` is the number of skips.
    Pass one ``SkipLog`` to several readers to collect everything in one place.
    """

    def __init__(self, name: str = "data") -> None:
        self.name = name
        self.reasons: dict[str, list[str]] = defaultdict(list)
        self.fixes: dict[str, list[str]] = defaultdict(list)

    def _record(self, table: dict, verb: str, reason: str, item: str, detail: str) -> None:
        table[reason].append(str(item))
        level = logging.WARNING if len(table[reason]) <= LOG_FIRST else logging.DEBUG
        log.log(level, "%s: %s %s (%s)%s", self.name, verb, item, reason,
                f": {detail}" if detail else "")

    def skip(self, reason: str, item: str | Path, detail: str = "") -> None:
        """Record that ``item`` was left out because of ``reason``."""
        self._record(self.reasons, "skipped", reason, str(item), detail)

    def fix(self, reason: str, item: str | Path, detail: str = "") -> None:
        """Record that ``item`` was kept after the repair ``reason``."""
        self._record(self.fixes, "repaired", reason, str(item), detail)

    @property
    def count(self) -> int:
        """Number of skipped items (repairs are not counted here, see ``fix_count``)."""
        return sum(len(v) for v in self.reasons.values())

    @property
    def fix_count(self) -> int:
        return sum(len(v) for v in self.fixes.values())

    def summary(self) -> str:
        """One line per reason, e.g. ``"data: 3 skipped (empty mask: 2, missing image: 1)"``."""
        def part(table: dict) -> str:
            return ", ".join(f"{r}: {len(v)}" for r, v in sorted(table.items()))

        s = f"{self.name}: {self.count} skipped"
        if self.count:
            s += f" ({part(self.reasons)})"
        if self.fix_count:
            s += f"; {self.fix_count} repaired ({part(self.fixes)})"
        return s

    def log_summary(self) -> None:
        """Log :meth:`summary` (WARNING when anything was skipped or repaired, else INFO)."""
        log.log(logging.WARNING if self.count or self.fix_count else logging.INFO,
                "%s", self.summary())

    def __repr__(self) -> str:
        return f"SkipLog({self.summary()!r})"
