"""Fixtures: a real mongod on a free loopback port (temp dbpath, stopped by PID) and a crafted run.

FiftyOne reads FIFTYONE_DATABASE_URI when it is first imported, so test modules here import
``fiftyone`` and ``sskd.inspect.fiftyone_export`` (and modules importing it) only inside tests
or fixtures that depend on ``mongod``. Test modules reach the shape helpers through the ``kit``
fixture, never ``import conftest`` (works under any pytest import mode).

The crafted run (48 x 48 images of red circles and green squares on grey):

* val ids 1..4 and train ids 1..6 overlap on purpose (as in the synthetic benchmark), so the
  export must match by file path; labeled = train 1, 2; unlabeled = train 3..6 (with held-out
  ground truth);
* ``pl_teacher_zero_shot`` has a known false positive (a square at x 36..44, y 2..10 of train
  image 3, confidence 0.95), a class error (train 4: square called circle), a miss (train 5:
  the small circle) and a shifted box (train 6, IoU 0.62);
* ``pred_student_refined`` disagrees with ``pred_teacher_adapted`` on val 3 (both squares
  called circles) and val 4 (the teacher misses the square).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sskd.config import Config, save_config
from sskd.data.records import Dataset, ImageRecord, Instance, write_records_jsonl
from sskd.models.base import (Segmenter, SegmenterOutput, build_model, register_model,
                              unregister_model)
from sskd.rundir import RunDir

SIZE = 48
CLASSES = ["circle", "square"]
COLOURS = {"circle": (230, 20, 20), "square": (20, 220, 20)}
BACKGROUND = (50, 50, 50)


# --------------------------------------------------------------------------- crafted images


def circle(cx: int, cy: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return ((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r


def square(x0: int, y0: int, s: int) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    m[y0:y0 + s, x0:x0 + s] = True
    return m


SHAPES = {"circle": circle, "square": square}

VAL = {1: [("circle", (12, 12, 6)), ("square", (28, 28, 10))],
       2: [("circle", (30, 14, 7))],
       3: [("square", (4, 4, 12)), ("square", (30, 30, 12))],
       4: [("circle", (24, 22, 9)), ("square", (2, 36, 8))]}
TRAIN = {1: [("circle", (20, 20, 8))],
         2: [("square", (10, 10, 14))],
         3: [("circle", (14, 14, 7)), ("square", (28, 26, 12))],
         4: [("square", (8, 30, 10))],
         5: [("circle", (30, 30, 8)), ("circle", (10, 10, 5))],
         6: [("square", (20, 4, 12))]}
LABELED, UNLABELED = [1, 2], [3, 4, 5, 6]
KNOWN_FP_BOX = (36, 2, 8)   # square x0, y0, side of the zero-shot false positive on train 3


def inst(kind: str, args: tuple, score: float | None = None,
         as_kind: str | None = None) -> Instance:
    return Instance.from_mask(SHAPES[kind](*args), CLASSES.index(as_kind or kind), score)


def draw(path: Path, objects: list[tuple[str, tuple]]) -> None:
    img = np.zeros((SIZE, SIZE, 3), np.uint8) + np.array(BACKGROUND, np.uint8)
    for kind, args in objects:
        img[SHAPES[kind](*args)] = COLOURS[kind]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def records(root: Path, split_dir: str, spec: dict[int, list]) -> list[ImageRecord]:
    out = []
    for i, objects in spec.items():
        path = root / split_dir / "images" / f"{i:06d}.png"
        draw(path, objects)
        out.append(ImageRecord(str(path), SIZE, SIZE, i, [inst(k, a) for k, a in objects]))
    return out


def with_instances(rec: ImageRecord, instances: list[Instance]) -> ImageRecord:
    return ImageRecord(rec.file_name, rec.height, rec.width, rec.image_id, instances)


@dataclass
class SmokeRun:
    root: Path
    val: Dataset
    labeled: Dataset
    unlabeled: Dataset          # carries held-out ground truth
    fields: dict[str, Path]

    @property
    def gt(self) -> Dataset:
        return Dataset(self.val.records + self.labeled.records + self.unlabeled.records,
                       CLASSES, "gt")

    @property
    def splits(self) -> dict[str, Dataset]:
        return {"val": self.val, "labeled": self.labeled, "unlabeled": self.unlabeled}

    @property
    def n_images(self) -> int:
        return len(self.val) + len(self.labeled) + len(self.unlabeled)

    def path(self, split: str, image_id: int) -> str:
        d = {"val": self.val, "labeled": self.labeled, "unlabeled": self.unlabeled}[split]
        return str(Path(d.by_id()[image_id].file_name).resolve())


def build_smoke_run(root: Path) -> SmokeRun:
    """Write the crafted run dir under ``root`` (images, splits, jsonl fields, metrics)."""
    rd = RunDir(root)
    val = Dataset(records(root / "data", "val", VAL), CLASSES, "val")
    train = records(root / "data", "train", TRAIN)
    labeled = Dataset([r for r in train if r.image_id in LABELED], CLASSES, "labeled")
    unlabeled = Dataset([r for r in train if r.image_id in UNLABELED], CLASSES, "unlabeled")
    for name, ds in (("val", val), ("labeled", labeled), ("unlabeled", unlabeled)):
        rd.split(name).parent.mkdir(parents=True, exist_ok=True)
        rd.split(name).write_text(json.dumps({"name": name, "image_ids": [r.image_id for r in ds]}))
    u = unlabeled.by_id()
    zero_shot = [
        with_instances(u[3], [inst("circle", (14, 14, 7), 0.9), inst("square", (28, 26, 12), 0.8),
                              inst("square", KNOWN_FP_BOX, 0.95)]),
        with_instances(u[4], [inst("square", (8, 30, 10), 0.6, as_kind="circle")]),
        with_instances(u[5], [inst("circle", (30, 30, 8), 0.7)]),
        with_instances(u[6], [inst("square", (22, 5, 12), 0.5)]),
    ]
    adapted = [
        with_instances(u[3], [inst("circle", (14, 14, 7), 0.9), inst("square", (28, 26, 12), 0.9)]),
        with_instances(u[4], [inst("square", (8, 30, 10), 0.9)]),
        with_instances(u[5], [inst("circle", (30, 30, 8), 0.9), inst("circle", (10, 10, 5), 0.97)]),
        with_instances(u[6], [inst("square", (21, 4, 12), 0.85)]),
    ]
    v = val.by_id()
    teacher_val = [with_instances(v[i], [inst(k, a, 0.9) for k, a in VAL[i]]) for i in (1, 2, 3)]
    teacher_val.append(with_instances(v[4], [inst("circle", (24, 22, 9), 0.9)]))
    student_val = [with_instances(v[i], [inst(k, a, 0.8) for k, a in VAL[i]]) for i in (1, 2, 4)]
    student_val.insert(2, with_instances(v[3], [inst("square", a, 0.7, as_kind="circle")
                                                for _, a in VAL[3]]))
    write_records_jsonl(zero_shot, rd.pseudo_labels("teacher_zero_shot"))
    write_records_jsonl(adapted, rd.pseudo_labels("teacher_adapted"))
    write_records_jsonl(teacher_val, rd.predictions("teacher_adapted"))
    write_records_jsonl(student_val, rd.predictions("student_refined"))
    rd.metrics.write_text(json.dumps({"models": {"teacher_adapted": {"AP": 1.0, "AP50": 2.0}}}))
    cfg = Config(run_name=root.name, runs_root=str(root.parent))
    cfg.data.input_size = SIZE
    save_config(cfg, rd.config)
    # Embedding models: the teacher pools on a 12 x 12 grid, the student on a 24 x 24 one.
    for tag, stride in (("teacher_adapted", 4), ("student_refined", 2)):
        build_model("inspect_colour_embedder", len(CLASSES), stride=stride).save(rd.model_dir(tag))
    fields = {"pl_teacher_zero_shot": rd.pseudo_labels("teacher_zero_shot"),
              "pl_teacher_adapted": rd.pseudo_labels("teacher_adapted"),
              "pred_teacher_adapted": rd.predictions("teacher_adapted"),
              "pred_student_refined": rd.predictions("student_refined")}
    return SmokeRun(root, val, labeled, unlabeled, fields)


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The crafted run's constants and shape helpers."""
    return SimpleNamespace(CLASSES=CLASSES, SIZE=SIZE, VAL=VAL, TRAIN=TRAIN, circle=circle,
                           square=square, KNOWN_FP_BOX=KNOWN_FP_BOX, COLOURS=COLOURS)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    return build_smoke_run(tmp_path_factory.mktemp("runs") / "smoke")


@pytest.fixture(scope="session")
def exported(mongod, smoke_run):
    """The smoke run through the whole pipeline: export, evaluations, views, embeddings (PCA)."""
    from sskd.inspect.run import export_run_dir

    return export_run_dir(smoke_run.root, datasets=smoke_run.splits, method="pca")


# --------------------------------------------------------------------------- a tiny embedder


@pytest.fixture(scope="session", autouse=True)
def _colour_embedder_registered():
    """Registered while these tests run only: the model-interface tests parametrised over
    ``list_models()`` at collection must not see this test double."""
    register_model("inspect_colour_embedder")(_build_colour_embedder)
    yield
    unregister_model("inspect_colour_embedder")


def _build_colour_embedder(num_classes: int, stride: int = 4, **_: object) -> "ColourEmbedder":
    return ColourEmbedder(num_classes, stride=stride)


class ColourEmbedder(Segmenter):
    """A deterministic segmenter whose weak pixel embedding is the pixel colour.

    ``embed_weak``: ``B x 4 x H/stride x W/stride``, L2-normalised ``[r, g, b, 0.05]`` averaged
    over ``stride x stride`` cells, so a red circle and a green square pool to clearly
    different vectors and a misaligned mask shows up as a grey (background) component.
    """

    def __init__(self, num_classes: int, stride: int = 4) -> None:
        super().__init__(num_classes, stride=stride)
        self.stride = stride
        self.scale = torch.nn.Parameter(torch.ones(()))  # something to save/load

    def forward(self, images: torch.Tensor, embeddings: str = "none") -> SegmenterOutput:
        b, _, h, w = images.shape
        cells = F.avg_pool2d(images, self.stride)
        emb = F.normalize(torch.cat([cells, cells.new_full(cells[:, :1].shape, 0.05)], 1), dim=1)
        q, hs, ws = 2, h // self.stride, w // self.stride
        weak = emb * self.scale if embeddings in ("weak", "both") else None
        return SegmenterOutput(class_logits=images.new_zeros(b, q, self.num_classes + 1),
                               mask_logits=images.new_zeros(b, q, hs, ws), embed_weak=weak)

    def compute_losses(self, outputs: SegmenterOutput, targets: list[dict]) -> dict:
        loss = outputs.class_logits.sum() * 0 + self.scale * 0
        return {"loss": loss}
