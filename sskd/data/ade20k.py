"""ADE20K instance segmentation (100 thing classes) from the standard COCO-style conversion.

Mask2Former's ``datasets/prepare_ade20k_ins_seg.py`` writes
``ADEChallengeData2016/ade20k_instance_{train,val}.json`` in COCO format with a few quirks that
this reader handles on top of :func:`sskd.data.coco.from_coco_dict`:

* image ids are strings (the file stem, ``"ADE_train_00000001"``); they become the int of the
  trailing digits (``1``), unique within a split;
* category ids are the SceneParse150 index minus one (7 = bed, ..., 149 = flag): 100 ids out of
  0..149, not contiguous; they map to ``class_id`` 0..99 in sorted order and are kept in
  ``Dataset.category_ids``;
* masks are compressed RLE with ``str`` counts, boxes are integer ``[x, y, w, h]``, iscrowd 0;
* category names may carry WordNet synonyms (``"windowpane, window"``) in other conversions; the
  first name is kept, since names become the text prompt of open-vocabulary teachers.
"""

from __future__ import annotations

from pathlib import Path

from sskd.data.coco import from_coco_dict, load_json
from sskd.data.errors import DataError, SkipLog
from sskd.data.records import Dataset

#: (category id, name) of the 100 thing classes as written by the standard conversion
ADE20K_INSTANCE_CATEGORIES = (
    (7, "bed"), (8, "windowpane"), (10, "cabinet"), (12, "person"), (14, "door"), (15, "table"),
    (18, "curtain"), (19, "chair"), (20, "car"), (22, "painting"), (23, "sofa"), (24, "shelf"),
    (27, "mirror"), (30, "armchair"), (31, "seat"), (32, "fence"), (33, "desk"), (35, "wardrobe"),
    (36, "lamp"), (37, "bathtub"), (38, "railing"), (39, "cushion"), (41, "box"), (42, "column"),
    (43, "signboard"), (44, "chest of drawers"), (45, "counter"), (47, "sink"), (49, "fireplace"),
    (50, "refrigerator"), (53, "stairs"), (55, "case"), (56, "pool table"), (57, "pillow"),
    (58, "screen door"), (62, "bookcase"), (64, "coffee table"), (65, "toilet"), (66, "flower"),
    (67, "book"), (69, "bench"), (70, "countertop"), (71, "stove"), (72, "palm"),
    (73, "kitchen island"), (74, "computer"), (75, "swivel chair"), (76, "boat"),
    (78, "arcade machine"), (80, "bus"), (81, "towel"), (82, "light"), (83, "truck"),
    (85, "chandelier"), (86, "awning"), (87, "streetlight"), (88, "booth"),
    (89, "television receiver"), (90, "airplane"), (92, "apparel"), (93, "pole"),
    (95, "bannister"), (97, "ottoman"), (98, "bottle"), (102, "van"), (103, "ship"),
    (104, "fountain"), (107, "washer"), (108, "plaything"), (110, "stool"), (111, "barrel"),
    (112, "basket"), (115, "bag"), (116, "minibike"), (118, "oven"), (119, "ball"), (120, "food"),
    (121, "step"), (123, "trade name"), (124, "microwave"), (125, "pot"), (126, "animal"),
    (127, "bicycle"), (129, "dishwasher"), (130, "screen"), (132, "sculpture"), (133, "hood"),
    (134, "sconce"), (135, "vase"), (136, "traffic light"), (137, "tray"), (138, "ashcan"),
    (139, "fan"), (142, "plate"), (143, "monitor"), (144, "bulletin board"), (146, "radiator"),
    (147, "glass"), (148, "clock"), (149, "flag"),
)

# json file -> its image folder in the standard ADEChallengeData2016 layout
_SPLIT_DIRS = {"train": "training", "val": "validation"}


def default_image_root(json_path: str | Path) -> Path:
    """``<ade>/ade20k_instance_<split>.json`` -> ``<ade>/images/<training|validation>``."""
    json_path = Path(json_path)
    split = json_path.stem.rsplit("_", 1)[-1]
    if split not in _SPLIT_DIRS:
        raise DataError(json_path, "cannot tell the split from the file name (expected "
                        "ade20k_instance_train.json or ade20k_instance_val.json)",
                        "pass image_root explicitly")
    return json_path.parent / "images" / _SPLIT_DIRS[split]


def read_ade20k_instances(json_path: str | Path, image_root: str | Path | None = None, *,
                          skip_log: SkipLog | None = None, check_images: bool = False,
                          name: str | None = None) -> Dataset:
    """Read ``ade20k_instance_<split>.json`` (see the module docstring for what differs from COCO).

    Args:
        json_path: the converted annotation file.
        image_root: folder of the images; default: ``images/training`` or ``images/validation``
            beside the json (the standard ADEChallengeData2016 layout).
        skip_log, check_images: as in :func:`sskd.data.coco.read_coco`.
        name: ``Dataset.name`` (default: the json stem).

    Returns:
        Dataset with the (up to) 100 thing classes, ``category_ids`` as in the json.
    """
    json_path = Path(json_path)
    d = load_json(json_path)
    if not isinstance(d, dict):
        raise DataError(json_path, f"top level is a {type(d).__name__}, not a COCO dict",
                        "pass the ade20k_instance_<split>.json written by the conversion")
    if not d.get("categories"):
        # The conversion always writes them; a hand-made subset may not: use the standard table.
        d["categories"] = [{"id": i, "name": n} for i, n in ADE20K_INSTANCE_CATEGORIES]
    for c in d["categories"]:
        c["name"] = str(c.get("name", c.get("id"))).split(",")[0].strip()
    root = default_image_root(json_path) if image_root is None else image_root
    return from_coco_dict(d, root, source=str(json_path), skip_log=skip_log,
                          check_images=check_images,
                          name=json_path.stem if name is None else name)
