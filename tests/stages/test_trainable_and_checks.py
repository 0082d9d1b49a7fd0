"""What trains in each stage (teacher.trainable / student.trainable), and the checks a stage runs
before it trains: a real-data teacher without pretrained weights stops the run."""

import dataclasses

import pytest

import sskd.stages.common as common
import sskd.stages.pipeline as pipeline
from sskd.config import ConfigError, load_config
from sskd.stages import (adapt_teacher, load_datasets, open_run, prepare_data, refine,
                         transfer, zero_shot)
from sskd.stages.checks import check_teacher_weights

M2F_PARTS = ["encoder", "neck", "pixel_decoder", "decoder", "class_head", "projection_head"]
GSAM_DEFAULT = ["class_head", "box_head", "decoder", "mask_decoder", "projection_head"]


@pytest.fixture
def trained(monkeypatch):
    """Replace the training loop: record {desc: {part: n_params}} and save the model untouched."""
    seen = {}

    def fake_train(model, dataset, paths, tc, objective, **kw):
        params = dict(model.named_parameters())
        counts = {}
        for n, p in params.items():
            if p.requires_grad:
                part = model.part_of(n)
                counts[part] = counts.get(part, 0) + p.numel()
        seen[kw.get("desc", "?")] = counts
        model.save(paths.model_dir)
        return model

    monkeypatch.setattr(common, "train", fake_train)
    monkeypatch.setattr(pipeline, "evaluate_model", lambda *a, **k: {})  # not what is tested
    return seen


def _run_all(tmp_path, **overrides):
    ov = {"cache_dir": str(tmp_path / "cache"), "data.root": str(tmp_path / "data"),
          "workers": 1, **overrides}  # one process: the side jobs would not see the fake loop
    run = open_run("r", preset="smoke", runs_root=str(tmp_path / "runs"), overrides=ov)
    prepare_data(run)
    for stage in (zero_shot, adapt_teacher, transfer, refine):
        stage(run, progress=False)
    return run


@pytest.mark.slow
def test_trainable_parts_per_stage_mask2former(tmp_path, trained):
    """smoke: teacher all but the encoder, student everything; stand-ins pretrain everything."""
    _run_all(tmp_path)
    student = {"encoder": 33888, "neck": 22704, "pixel_decoder": 67688, "decoder": 48320,
               "class_head": 132, "projection_head": 1584}      # tiny, 3 classes
    teacher = {k: v for k, v in student.items() if k != "encoder"}
    assert trained == {
        "teacher pretrain (corpus)": student, "student pretrain (corpus)": student,
        "teacher_1a": teacher, "teacher_adapted": teacher, "teacher_supervised": teacher,
        "student_supervised": student, "student_transfer": student, "student_refined": student}


@pytest.mark.slow
def test_trainable_parts_per_stage_grounded_sam(tmp_path, trained):
    """A tiny Grounding DINO + SAM2 teacher adapts its documented default parts only."""
    _run_all(tmp_path, **{"teacher.name": "grounded_sam", "teacher.size": "tiny",
                          "teacher.trainable": ["default"],
                          "data.input_size": 64, "data.synthetic.image_size": 64})
    teacher = {"class_head": 4, "box_head": 2244, "decoder": 36704, "mask_decoder": 34304,
               "projection_head": 5280}
    assert list(teacher) == GSAM_DEFAULT
    for stage in ("teacher_1a", "teacher_adapted", "teacher_supervised"):
        assert trained[stage] == teacher, stage
    assert "teacher pretrain (source)" not in trained   # a foundation teacher is not pretrained
    for stage in ("student_supervised", "student_transfer", "student_refined"):
        assert list(trained[stage]) == M2F_PARTS, stage


def test_selected_parts_change_the_stage_and_its_fingerprint(tmp_path, trained):
    ov = {"cache_dir": str(tmp_path / "cache"), "data.root": str(tmp_path / "data"),
          "teacher.name": "grounded_sam", "data.input_size": 64, "data.synthetic.image_size": 64}
    run = open_run("r", preset="smoke", runs_root=str(tmp_path / "runs"), overrides=ov)
    prepare_data(run)
    lab = load_datasets(run)["labeled"]
    teacher = common.build_from_config(run.cfg.teacher, lab.classes)
    common.train_stage(run, "teacher_1a", teacher, lab, None, run.cfg.stages.adapt_1a,
                       ["default", "image_encoder"], progress=False)
    assert set(trained["teacher_1a"]) == set(GSAM_DEFAULT) | {"image_encoder"}
    assert trained["teacher_1a"]["image_encoder"] == 301520
    fp = (run.dir.checkpoint_dir("teacher_1a") / "fingerprint.json").read_text()
    assert '"trainable"' in fp
    with pytest.raises(ConfigError, match=r"teacher.trainable.*unknown part\(s\) \['neck'\]"):
        common.train_stage(run, "teacher_1a", teacher, lab, None, run.cfg.stages.adapt_1a,
                           run.cfg.student.trainable + ["neck"], progress=False)


def test_freeze_encoder_is_replaced_by_trainable(tmp_path):
    assert load_config("demo").teacher.trainable == ["all"]
    assert load_config("smoke", overrides=["teacher.freeze_encoder=false"]).teacher.trainable \
        == ["neck", "pixel_decoder", "decoder", "class_head", "projection_head"]
    with pytest.raises(ConfigError, match="teacher.freeze_encoder was replaced by "
                                          "teacher.trainable"):
        load_config("smoke", overrides=["teacher.freeze_encoder=true"])
    with pytest.raises(ConfigError, match=r"student.trainable = \[\]: must be a non-empty list"):
        load_config("smoke", overrides=["student.trainable=[]"])


# --------------------------------------------------------------------------- teacher weights


def _coco_cfg(**over):
    ov = {"data.kind": "coco", "teacher.name": "grounded_sam", "teacher.size": "paper", **over}
    return load_config("coco_custom", overrides=ov)


def test_real_data_teacher_without_weights_is_an_error_naming_the_setting():
    no_weights = {"teacher.options.detector_weights": "", "teacher.options.sam_weights": ""}
    with pytest.raises(ConfigError) as e:
        check_teacher_weights(_coco_cfg(**no_weights))
    msg = str(e.value)
    for part in ("teacher.options.detector_weights and teacher.options.sam_weights are empty",
                 "random weights on your coco data", "weights/mm_grounding_dino_large_all",
                 "weights/sam2.1-hiera-large", "teacher.allow_random_init: true"):
        assert part in msg
    with pytest.raises(ConfigError, match=r"^teacher.options.sam_weights is empty"):
        check_teacher_weights(_coco_cfg(**{"teacher.options.sam_weights": ""}))
    m2f = _coco_cfg()
    m2f.teacher = dataclasses.replace(m2f.teacher, name="mask2former", size="teacher_paper",
                                      options={})           # grounded_sam's options do not apply
    with pytest.raises(ConfigError, match=r"^teacher.weights is empty: the mask2former teacher"):
        check_teacher_weights(m2f)
    check_teacher_weights(_coco_cfg())                                    # the preset's weights
    check_teacher_weights(_coco_cfg(**no_weights, **{"teacher.allow_random_init": True}))
    check_teacher_weights(load_config("smoke"))           # synthetic: the kit's stand-in teacher


def test_the_stages_stop_before_anything_trains(tmp_path, trained):
    ov = {"data.root": str(tmp_path / "nothing-here"), "workers": 1,
          "teacher.options.detector_weights": "", "teacher.options.sam_weights": ""}
    run = open_run("mine", preset="coco_custom", overrides=ov, runs_root=str(tmp_path / "runs"))
    for stage in (zero_shot, adapt_teacher):
        with pytest.raises(ConfigError, match="teacher.options.detector_weights"):
            stage(run, progress=False)
    assert trained == {}
    assert not run.dir.metrics.is_file() or "zero_shot" not in run.dir.metrics.read_text()


@pytest.mark.parametrize("preset", ["cityscapes_10pct", "ade20k_10pct", "coco_custom"])
def test_paper_presets_name_the_papers_teacher(preset):
    cfg = load_config(preset)
    assert cfg.teacher.name == "grounded_sam" and cfg.teacher.options["mask_model"] == "sam2"
    assert cfg.teacher.options["detector_weights"] == "weights/mm_grounding_dino_large_all"
    assert cfg.teacher.options["sam_weights"] == "weights/sam2.1-hiera-large"
    assert cfg.teacher.trainable == ["default"] and cfg.student.weights == "weights/dinov2-small"
    check_teacher_weights(cfg)
    from sskd.config import PRESET_DIR
    assert "# detector_weights: weights/grounding-dino-base" in \
        (PRESET_DIR / f"{preset}.yaml").read_text()                  # the cheaper variant


def test_demo_preset_keeps_the_papers_size_ratio():
    """The demo's model options (outline class heads) are part of its sizes: the teacher must stay
    >= 10x the student (the paper: 10.9x), as the README's params column says (6.43M / 0.636M, 10.1x)."""
    cfg = load_config("demo")
    classes = ["circle", "rectangle", "triangle"]
    teacher = common.build_from_config(cfg.teacher, classes)
    student = common.build_from_config(cfg.student, classes)
    assert teacher.silhouette_head is not None and student.silhouette_head is not None
    t, s = teacher.num_parameters(), student.num_parameters()
    assert round(t / 1e6, 2) == 6.43 and round(s / 1e6, 3) == 0.636
    assert t / s >= 10
