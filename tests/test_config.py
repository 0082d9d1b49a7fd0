"""Config validation: every bad value fails when the config is loaded or read, naming key,
value and allowed range; shipped presets validate; save/read round-trips."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from sskd import config_checks
from sskd.config import (Config, ConfigError, list_presets, load_config, read_config,
                         save_config, to_dict)
from sskd.models import sizes

# (dotted key, bad value, text of the allowed range the error must show)
BAD = [
    ("stages.refine.train.steps", -5, ">= 1"),
    ("stages.transfer.train.steps", 0, "stages.transfer.enabled: false"),
    ("stages.teacher_pretrain.steps", -1, ">= 0"),
    ("stages.student_pretrain.steps", -3, ">= 0"),
    ("stages.adapt_1a.train.log_every", 0, ">= 1"),
    ("stages.adapt_1b.train.checkpoint_every", 0, ">= 1"),
    ("stages.teacher_pretrain.log_every", -2, ">= 1"),
    ("stages.transfer.train.batch_size", 0, ">= 1"),
    ("stages.transfer.train.unlabeled_ratio", 7, "in [0, 1]"),
    ("stages.transfer.train.unlabeled_ratio", -0.1, "in [0, 1]"),
    ("stages.refine.train.lr", 0, "> 0"),
    ("stages.refine.train.lr", -1e-3, "> 0"),
    ("stages.refine.train.lr", float("nan"), "> 0"),
    ("stages.refine.train.weight_decay", -0.1, ">= 0"),
    ("stages.refine.train.backbone_lr_mult", -1, ">= 0"),
    ("stages.refine.train.grad_clip", -1, ">= 0"),
    ("stages.refine.train.warmup_steps", -1, ">= 0"),
    ("stages.refine.train.seed", -1, ">= 0"),
    ("stages.transfer.l_semi", -1, ">= 0"),
    ("stages.transfer.l_pxl", -0.5, ">= 0"),
    ("pseudo_label.score_threshold", 1.5, "in [0, 1]"),
    ("pseudo_label.mask_threshold", -0.1, "in [0, 1]"),
    ("pseudo_label.max_instances", 0, ">= 1"),
    ("evaluation.score_threshold", 2, "in [0, 1]"),
    ("evaluation.seed_noise_ap", -1, ">= 0"),
    ("data.labeled_fraction", 0, "in (0, 1]"),
    ("data.labeled_fraction", 1.5, "in (0, 1]"),
    ("data.kind", "imagenet", "synthetic | coco | cityscapes | ade20k"),
    ("data.max_val", -1, ">= 0"),
    ("data.input_size", 0, ">= 1"),
    ("data.synthetic.n_train", 0, ">= 1"),
    ("data.synthetic.target.background", "plaid", "must be one of"),
    ("data.synthetic.corpus_palettes", ["neon"], "a list of primary"),
    ("data.synthetic.corpus_backgrounds", [], "corpus_palettes must both be set"),
    ("data.train_crop", [512], "[h, w] in px"),
    ("data.scale_range", [2.0, 1.0], "0 < lo <= hi"),
    ("data.num_workers", -1, ">= 0"),
    ("teacher.trainable", [], "a non-empty list of part names"),
    ("data.synthetic.source.occlusion", 2, "[0, 1]"),
    ("pixel_contrast.temperature", 0, "> 0"),
    ("pixel_contrast.temperature", -0.07, "> 0"),
    ("pixel_contrast.num_anchors", 0, ">= 1"),
    ("pixel_contrast.num_negatives", 0, ">= 1"),
    ("pixel_contrast.sampler", "unifrom", "fused | uniform | mask_only | class_only"),
    ("pixel_contrast.candidates", "all", "batch | other_images"),
    ("teacher.name", "mask2formr", "one of"),
    ("teacher.size", "teacher_dmo", "teacher_demo"),
    ("student.size", "paper", "student_paper"),
    ("student.options", {"hidden_dimm": 8}, "hidden_dimm"),
    ("device", "gpu", "auto | cpu | cuda | cuda:N"),
    ("device", "cuda:x", "auto | cpu | cuda | cuda:N"),
    ("workers", 0, ">= 1"),
    ("seed", -1, ">= 0"),
    ("inspect.view_fields", ["teacher_adapted"], "pl_<tag>"),
    ("stages.refine.soft_classes", True, "false where stages.refine.l_semi is 0"),
    ("pseudo_label.class_prior", "balanced", "none | labeled | uniform"),
    ("stages.transfer.train.ema_decay", 1.0, "in [0, 1)"),
    ("pseudo_label.mask_refine", "crf", "none | guided"),
    ("pseudo_label.refine_radius", 0, ">= 1 (pixels)"),
    ("pseudo_label.refine_eps", 0, "> 0"),
]


@pytest.mark.parametrize("key,value,allowed", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
def test_bad_value_fails_at_load_naming_key_value_and_range(key, value, allowed):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", {key: value})
    msg = str(e.value)
    assert key in msg and str(value) in msg and allowed in msg


@pytest.mark.parametrize("key,value,allowed", BAD[:12] + BAD[-6:],
                         ids=[f"{k}={v}" for k, v, _ in BAD[:12] + BAD[-6:]])
def test_bad_value_fails_when_a_saved_config_is_read(tmp_path, key, value, allowed):
    path = tmp_path / "config.yaml"
    data = to_dict(load_config("smoke"))
    node = data
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        read_config(path)
    assert str(path) in str(e.value) and key in str(e.value) and allowed in str(e.value)


def test_soft_classes_need_a_teacher_with_class_distributions():
    with pytest.raises(ConfigError, match=r"stages.transfer.soft_classes = True: must be false "
                                          r"with teacher.name grounded_sam"):
        load_config("smoke", {"teacher.name": "grounded_sam", "teacher.size": "tiny",
                              "stages.transfer.soft_classes": True})
    assert load_config("smoke", {"stages.transfer.soft_classes": True}).stages.transfer.soft_classes


def test_class_prior_needs_a_teacher_with_class_distributions():
    with pytest.raises(ConfigError, match=r"pseudo_label.class_prior = 'labeled': must be none "
                                          r"with teacher.name grounded_sam"):
        load_config("smoke", {"teacher.name": "grounded_sam", "teacher.size": "tiny",
                              "pseudo_label.class_prior": "labeled"})
    assert load_config("smoke", {"pseudo_label.class_prior": "uniform"}).pseudo_label.class_prior \
        == "uniform"


def test_every_error_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config("smoke", {"stages.refine.train.steps": -5, "device": "gpu",
                              "stages.transfer.train.unlabeled_ratio": 7})
    msg = str(e.value)
    assert "stages.refine.train.steps = -5" in msg and "device = 'gpu'" in msg
    assert "stages.transfer.train.unlabeled_ratio = 7.0" in msg


def test_zero_steps_switches_pretraining_off_but_not_a_stage():
    assert load_config("smoke", {"stages.student_pretrain.steps": 0}).stages.student_pretrain.steps == 0
    assert load_config("smoke", {"stages.teacher_pretrain.steps": 0}).stages.teacher_pretrain.steps == 0
    with pytest.raises(ConfigError, match="stages.refine.train.steps = 0"):
        load_config("smoke", {"stages.refine.train.steps": 0})


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_devices(device):
    assert load_config("smoke", {"device": device}).device == device


@pytest.mark.parametrize("overrides,expected", [
    ({"pixel_contrast.sampler": "unifrm"}, "ablations.bad.pixel_contrast.sampler = 'unifrm'"),
    ({"pixel_contrast": {"sampler": "unifrm"}}, "ablations.bad.pixel_contrast.sampler = 'unifrm'"),
    ({"stages.refine.train.steps": -1}, "ablations.bad.stages.refine.train.steps = -1"),
    ({"stages": {"refine": {"trian": {}}}}, "unknown config key 'ablations.bad.stages.refine.trian'"),
    ({"pixel_contrast.num_anchors": "many"}, "'ablations.bad.pixel_contrast.num_anchors' must be a number"),
    ({"student.size": "huge"}, "ablations.bad.student.size = 'huge'"),
    ({"ablations": {"x": {}}}, "ablations.bad.ablations: an ablation cannot define"),
    ("sampler=uniform", "ablations.bad = 'sampler=uniform': must be a mapping"),
])
def test_bad_ablation_fails_at_load_naming_the_ablation(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config("smoke", {"ablations": {"ok": {"pixel_contrast.sampler": "uniform"},
                                            "bad": overrides}})
    assert expected in str(e.value)
    assert "ablations.ok" not in str(e.value)


def test_ablation_name_must_be_a_directory_name():
    with pytest.raises(ConfigError, match="ablations.a/b: the name"):
        load_config("smoke", {"ablations": {"a/b": {"seed": 1}}})


def test_good_ablations_pass():
    cfg = load_config("smoke", {"ablations": {
        "uniform": {"pixel_contrast.sampler": "uniform"},
        "no_pxl": {"stages": {"transfer": {"l_pxl": 0.0}}}}})
    assert set(cfg.ablations) == {"uniform", "no_pxl"}


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_validates_and_round_trips(tmp_path, preset):
    cfg = load_config(preset, run_name="r", runs_root=str(tmp_path))
    path = save_config(cfg, tmp_path / "r" / "config.yaml")
    assert read_config(path) == cfg


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = Config()
    assert config_checks.problems(cfg) == []
    assert read_config(save_config(cfg, tmp_path / "c.yaml")) == cfg


def test_open_run_rejects_an_edited_bad_config(tmp_path):
    from sskd.stages.run import open_run
    run = open_run("r", preset="smoke", runs_root=tmp_path)
    text = run.dir.config.read_text().replace("log_every: 1", "log_every: 0", 1)
    run.dir.config.write_text(text)
    with pytest.raises(ConfigError, match=r"log_every = 0: must be >= 1"):
        open_run("r", preset="smoke", runs_root=tmp_path)
    with pytest.raises(ConfigError, match="not valid YAML"):
        run.dir.config.write_text("seed: [1,\n")
        read_config(run.dir.config)


def test_open_run_overrides_on_an_existing_run_are_checked(tmp_path):
    from sskd.stages.run import open_run
    open_run("r", preset="smoke", runs_root=tmp_path)
    with pytest.raises(ConfigError, match="unlabeled_ratio = 7"):
        open_run("r", runs_root=tmp_path, overrides={"stages.transfer.train.unlabeled_ratio": 7})


def test_model_size_tables_match_the_model_modules():
    assert config_checks.MODEL_SIZES["mask2former"]() == list(sizes.SIZES)
    from sskd.models import grounded_sam_configs
    assert config_checks.MODEL_SIZES["grounded_sam"]() == list(grounded_sam_configs.SIZES)
    try:
        from sskd.integrations import detectron2_model
    except ImportError:
        return  # detectron2 is optional
    assert sorted(config_checks.MODEL_SIZES["detectron2"]()) == sorted(detectron2_model.SIZES)


def test_registered_models_are_accepted():
    from sskd.models.base import register_model, unregister_model
    register_model("cfg_test_double")(lambda num_classes, **kw: None)
    try:
        cfg = load_config("smoke", {"teacher.name": "cfg_test_double", "teacher.size": "any"})
        assert cfg.teacher.name == "cfg_test_double"
    finally:
        unregister_model("cfg_test_double")


def test_validation_does_not_import_torch():
    code = ("import sys; from sskd.config import load_config; load_config('demo'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
