"""Pieces every stage shares: building/loading models, training a stage once, predicting, evaluating."""

from __future__ import annotations

import time
from pathlib import Path

from sskd.config import ModelConfig, StageConfig, config_hash, to_dict
from sskd.data.records import Dataset, iter_records_jsonl
from sskd.engine.inference import predict_to_jsonl
from sskd.engine.trainer import Objective, TrainPaths, train
from sskd.metrics import read_metrics, update_metrics
from sskd.models.base import Segmenter, build_model, load_model
from sskd.stages.run import Run, log

STANDIN_VERSION = 1  # bump when the stand-in teacher's recipe changes (invalidates caches)


def build_from_config(mc: ModelConfig, classes: list[str]) -> Segmenter:
    kwargs = dict(mc.options)
    if mc.name == "grounded_sam":
        kwargs.setdefault("classes", list(classes))
    elif mc.weights:
        kwargs["encoder_weights"] = mc.weights
    return build_model(mc.name, num_classes=len(classes), size=mc.size, **kwargs)


def set_encoder_trainable(model: Segmenter, trainable: bool) -> Segmenter:
    """Freeze/unfreeze the encoder (the stand-in foundation teacher adapts with a frozen one)."""
    for name, p in model.named_parameters():
        if model.is_encoder_parameter(name):
            p.requires_grad_(trainable)
    return model


def is_standin(run: Run) -> bool:
    t = run.cfg.teacher
    return t.name == "mask2former" and not t.weights and run.cfg.data.kind == "synthetic"


def standin_dir(run: Run) -> Path:
    key = config_hash({"v": STANDIN_VERSION, "teacher": to_dict(run.cfg.teacher),
                       "synthetic": to_dict(run.cfg.data.synthetic),
                       "input_size": run.cfg.data.input_size,
                       "pretrain": to_dict(run.cfg.stages.teacher_pretrain)})
    return run.cache_dir / "standin_teacher" / key


def pretrained_teacher(run: Run, datasets: dict[str, Dataset], progress: bool = True) -> Segmenter:
    """theta_T0: the foundation teacher before adaptation.

    Offline default: the stand-in, pretrained by the kit on the synthetic source domain and
    cached by config hash (built once per machine; a killed pretraining resumes).
    """
    classes = datasets["labeled"].classes
    if not is_standin(run):
        return build_from_config(run.cfg.teacher, classes)
    root = standin_dir(run)
    paths = TrainPaths.in_dir(root, "pretrain")
    if not paths.model_dir.is_dir():
        if "source" not in datasets:
            raise ValueError("stand-in teacher pretraining needs the source domain: "
                             "call load_datasets(run, with_source=True)")
        log.info("pretraining the stand-in teacher on the source domain -> %s", root)
        model = build_from_config(run.cfg.teacher, classes)
        t0 = time.perf_counter()
        train(model, datasets["source"], paths, run.cfg.stages.teacher_pretrain, Objective(),
              input_size=run.cfg.data.input_size, device=run.device, progress=progress,
              desc="teacher pretrain (source)")
        update_metrics(run.dir.metrics, "stages", "teacher_pretrain",
                       {"seconds": round(time.perf_counter() - t0, 1), "done": True, "cached": False})
    elif "teacher_pretrain" not in read_metrics(run.dir.metrics)["stages"]:
        update_metrics(run.dir.metrics, "stages", "teacher_pretrain",
                       {"seconds": 0.0, "done": True, "cached": True, "cache": str(root)})
    return load_model(paths.model_dir)


def train_stage(run: Run, stage: str, model: Segmenter, labeled: Dataset,
                unlabeled: Dataset | None, sc: StageConfig, freeze_encoder: bool = False,
                progress: bool = True) -> Segmenter:
    """Train ``model`` for one stage unless the stage's final weights exist (then load them)."""
    paths = TrainPaths.in_dir(run.dir.root, stage)
    if paths.model_dir.is_dir():
        log.info("%s: already trained, loading %s", stage, paths.model_dir)
        return load_model(paths.model_dir)
    set_encoder_trainable(model, not freeze_encoder)
    obj = Objective(l_semi=sc.l_semi, l_pxl=sc.l_pxl, pixel_contrast=run.cfg.pixel_contrast,
                    pseudo_label=run.cfg.pseudo_label)
    train(model, labeled, paths, sc.train, obj,
          unlabeled=unlabeled if sc.l_semi > 0 or (unlabeled is not None and sc.l_pxl > 0) else None,
          input_size=run.cfg.data.input_size, device=run.device, progress=progress, desc=stage)
    return load_model(paths.model_dir)


def evaluate_model(run: Run, model: Segmenter, tag: str, val: Dataset) -> dict:
    """Predict val -> ``predictions/<tag>.jsonl``, mask AP -> ``metrics.json`` models[tag]."""
    from sskd.evaluation.coco_eval import evaluate_masks
    path = predict_to_jsonl(model, val, run.dir.predictions(tag), run.cfg.pseudo_label,
                            input_size=run.cfg.data.input_size, device=run.device, desc=f"eval {tag}")
    preds = list(iter_records_jsonl(path))
    res = evaluate_masks(val, preds)
    res["params"] = model.num_parameters()
    update_metrics(run.dir.metrics, "models", tag, res)
    log.info("%s: AP %.1f AP50 %.1f", tag, res["AP"], res["AP50"])
    return res


def pseudo_label(run: Run, model: Segmenter, tag: str, unlabeled: Dataset) -> Dataset:
    """Teacher pseudo-labels of D_u -> ``pseudo_labels/<tag>.jsonl`` (streamed, resumable).

    When D_u carries hidden ground truth (synthetic data), the pseudo-labels' own mask AP is
    recorded under ``metrics["pseudo_labels"][tag]`` (never used for training).
    """
    path = predict_to_jsonl(model, unlabeled, run.dir.pseudo_labels(tag), run.cfg.pseudo_label,
                            input_size=run.cfg.data.input_size, device=run.device,
                            desc=f"pseudo-label {tag}")
    records = list(iter_records_jsonl(path))
    if any(r.instances for r in unlabeled.records):
        from sskd.evaluation.coco_eval import evaluate_masks
        res = evaluate_masks(unlabeled, records)
        update_metrics(run.dir.metrics, "pseudo_labels", tag,
                       {k: res[k] for k in ("AP", "AP50", "AP75", "per_class")})
    return Dataset(records, list(unlabeled.classes), f"pseudo_{tag}")


def load_pseudo_labels(run: Run, tag: str, classes: list[str]) -> Dataset:
    path = run.dir.pseudo_labels(tag)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes pseudo-labels "
                                f"'{tag}' first (see notebooks/ or `sskd run`)")
    return Dataset(list(iter_records_jsonl(path)), list(classes), f"pseudo_{tag}")


class StageTimer:
    """Records a stage's wall time in ``metrics.json`` under ``stages``."""

    def __init__(self, run: Run, stage: str) -> None:
        self.run, self.stage = run, stage

    def __enter__(self) -> "StageTimer":
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            prev = read_metrics(self.run.dir.metrics)["stages"].get(self.stage, {})
            secs = round(time.perf_counter() - self.t0, 1)
            update_metrics(self.run.dir.metrics, "stages", self.stage,
                           {"seconds": secs, "done": True,
                            "first_seconds": prev.get("first_seconds", secs)})
