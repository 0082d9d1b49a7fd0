"""Tests of the synthetic domain-shift generator (sskd.data.synthetic)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sskd.config import ConfigError, SyntheticConfig, config_hash
from sskd.data import synthetic
from sskd.data.synthetic import (MARKER, PALETTES, _rasterize, _rng, _shape_geometry,
                                 generate_benchmark, generate_domain, render_image)

CLASSES = ["circle", "rectangle", "triangle"]
SOURCE = SyntheticConfig().source
TARGET = SyntheticConfig().target


def _render(dom, n, size=48, classes=CLASSES, seed=0):
    return [render_image(dom, size, classes, np.random.default_rng([seed, i])) for i in range(n)]


@pytest.mark.parametrize("dom", [SOURCE, TARGET], ids=["source", "target"])
def test_render_outputs_disjoint_visible_masks(dom):
    counts = []
    for img, insts in _render(dom, 30):
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        assert len(insts) <= dom.max_objects
        counts.append(len(insts))
        total = np.zeros((48, 48), dtype=int)
        for class_id, m in insts:
            assert m.shape == (48, 48) and m.dtype == bool
            assert 0 <= class_id < len(CLASSES)
            assert m.sum() >= dom.min_visible_pixels
            total += m
        assert total.max() <= 1, "visible masks must not overlap"
    assert min(counts) >= dom.min_objects and max(counts) > min(counts)


def test_render_is_deterministic_in_rng():
    a = _render(TARGET, 5, seed=3)
    b = _render(TARGET, 5, seed=3)
    c = _render(TARGET, 5, seed=4)
    for (ia, ma), (ib, mb) in zip(a, b):
        assert np.array_equal(ia, ib)
        assert [k for k, _ in ma] == [k for k, _ in mb]
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(ma, mb))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_source_masks_are_exactly_the_painted_pixels():
    # Source: flat background, no noise, no jitter, no clutter -> each mask is one palette
    # colour and everything outside the masks is the one background colour.
    obj = {tuple(c) for c in PALETTES["primary"]["objects"]}
    bgs = {tuple(c) for c in PALETTES["primary"]["background"]}
    for img, insts in _render(SOURCE, 20, size=64):
        fg = np.zeros((64, 64), dtype=bool)
        for _, m in insts:
            colours = np.unique(img[m], axis=0)
            assert len(colours) == 1 and tuple(colours[0]) in obj
            fg |= m
        bg = np.unique(img[~fg], axis=0)
        assert len(bg) == 1 and tuple(bg[0]) in bgs


def test_occluded_instances_keep_only_their_visible_part():
    dom = dataclasses.replace(SOURCE, occlusion=1.0, min_objects=5, max_objects=5,
                              min_visible_fraction=0.4)
    touching = 0
    for img, insts in _render(dom, 20, size=64):
        for i, (_, mi) in enumerate(insts):
            assert mi.sum() >= dom.min_visible_pixels
            grown = mi | np.roll(mi, 1, 0) | np.roll(mi, -1, 0) | np.roll(mi, 1, 1) | np.roll(mi, -1, 1)
            touching += any((grown & mj).any() for j, (_, mj) in enumerate(insts) if j != i)
    # with occlusion=1 instances pile up on each other: most of them border another one
    assert touching > 50


def test_occlusion_rate_controls_overlap():
    def contacts(occ):
        dom = dataclasses.replace(SOURCE, occlusion=occ, min_objects=3, max_objects=3,
                                  scale_min=0.15, scale_max=0.25)
        n = 0
        for _, insts in _render(dom, 30, size=64):
            masks = [m for _, m in insts]
            for i, m in enumerate(masks):
                g = m | np.roll(m, 1, 0) | np.roll(m, 1, 1) | np.roll(m, -1, 0) | np.roll(m, -1, 1)
                n += sum((g & masks[j]).any() for j in range(i + 1, len(masks)))
        return n

    assert contacts(1.0) > 3 * max(contacts(0.0), 1)


def test_shape_rasterisation_has_expected_area_and_fill():
    def area_fill(kind, size, aspect=1.0, theta=0.0):
        radius, geom = _shape_geometry(kind, size, aspect)
        ys, xs, m = _rasterize(geom, 50.0, 50.0, theta, radius, 100)
        rows, cols = np.nonzero(m)
        box = (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        return m.sum(), m.sum() / box

    a, fill = area_fill("circle", 40)
    assert a == pytest.approx(np.pi * 20 ** 2, rel=0.02) and fill == pytest.approx(np.pi / 4, abs=0.02)
    a, fill = area_fill("rectangle", 40, aspect=0.5)
    assert a == pytest.approx(40 * 20, rel=0.06) and fill == pytest.approx(1.0, abs=0.01)
    a, fill = area_fill("triangle", 40, aspect=1.0)
    assert a == pytest.approx(40 * 40 / 2, rel=0.06) and fill == pytest.approx(0.5, abs=0.05)
    a_rot, _ = area_fill("rectangle", 40, aspect=0.5, theta=0.7)
    assert a_rot == pytest.approx(800, rel=0.06)  # rotation keeps the area
    a_star, _ = area_fill("star", 40)
    a_cross, _ = area_fill("cross", 40)
    a_ell, _ = area_fill("ellipse", 40, aspect=0.5)
    assert a_star < 0.5 * np.pi * 400 and a_cross < 0.7 * 1600
    assert a_ell == pytest.approx(np.pi * 20 * 10, rel=0.04)


def test_colours_are_independent_of_class():
    seen: dict[int, set] = {k: set() for k in range(3)}
    for img, insts in _render(SOURCE, 150):
        for k, m in insts:
            seen[k].add(tuple(img[m][0]))
    for k, colours in seen.items():
        assert len(colours) >= 5, f"class {CLASSES[k]} uses only colours {colours}"
    shared = seen[0] & seen[1] & seen[2]
    assert len(shared) >= 4


def test_more_classes_are_supported():
    classes = list(synthetic.SHAPES)
    kinds = {k for _, insts in _render(SOURCE, 40, classes=classes) for k, _ in insts}
    assert kinds == set(range(len(classes)))


def test_target_clutter_is_background_not_instances():
    dom = dataclasses.replace(TARGET, noise_std=0.0, color_jitter=0.0, clutter=4)
    obj = np.asarray(PALETTES["muted"]["objects"])
    with_clutter = 0
    bg_std = []
    for img, insts in _render(dom, 20, size=64):
        fg = np.zeros((64, 64), dtype=bool)
        for _, m in insts:
            fg |= m
        rest = img[~fg].astype(int)
        # distractors are painted in object colours, the mottled background never is exactly
        is_obj_colour = (rest[:, None, :] == obj[None]).all(-1).any(-1)
        with_clutter += is_obj_colour.sum() > 10
        bg_std.append(rest.std(0).mean())
    assert with_clutter >= 15
    assert np.mean(bg_std) > 5  # textured, unlike the flat source background


def test_invalid_domain_config_names_the_key():
    with pytest.raises(ConfigError, match="classes"):
        render_image(SOURCE, 32, ["circle", "hexagram"], np.random.default_rng(0))
    with pytest.raises(ConfigError, match="palette"):
        render_image(dataclasses.replace(SOURCE, palette="neon"), 32, CLASSES, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="scale_min"):
        render_image(dataclasses.replace(SOURCE, scale_min=0.5, scale_max=0.2), 32, CLASSES,
                     np.random.default_rng(0))
    with pytest.raises(ConfigError, match="clutter"):
        render_image(dataclasses.replace(SOURCE, background="clutter", clutter=0), 32, CLASSES,
                     np.random.default_rng(0))
    with pytest.raises(ConfigError, match="data.synthetic.target.occlusion"):
        generate_benchmark(SyntheticConfig(target=dataclasses.replace(TARGET, occlusion=2.0)), "/nonexistent")


def test_generate_domain_writes_valid_coco(tmp_path):
    ann_path = generate_domain(TARGET, 8, 40, CLASSES, [7, 1], tmp_path / "d")
    assert ann_path == tmp_path / "d" / "annotations.json"
    coco = COCO(str(ann_path))
    assert sorted(coco.getImgIds()) == list(range(1, 9))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    n_ann = 0
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        assert info["file_name"] == f"images/{img_id:06d}.png"  # relative to the json's folder
        png = np.asarray(Image.open(tmp_path / "d" / info["file_name"]))
        img, insts = render_image(TARGET, 40, CLASSES, _rng([7, 1], img_id))
        assert np.array_equal(png, img), "PNG must hold exactly the rendered pixels"
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert len(anns) == len(insts)
        for ann, (class_id, m) in zip(anns, insts):
            decoded = coco.annToMask(ann).astype(bool)
            assert np.array_equal(decoded, m)
            assert ann["category_id"] == class_id + 1 and ann["iscrowd"] == 0
            assert ann["area"] == m.sum()
            rows, cols = np.nonzero(m)
            assert ann["bbox"] == [cols.min(), rows.min(), np.ptp(cols) + 1, np.ptp(rows) + 1]
            assert list(mask_utils.toBbox(ann["segmentation"])) == ann["bbox"]
            n_ann += 1
    assert n_ann >= 8
    info = json.loads(ann_path.read_text())["info"]
    assert info["seed"] == [7, 1] and info["domain"]["palette"] == "muted"


def test_generate_domain_is_byte_identical(tmp_path):
    a = generate_domain(TARGET, 5, 32, CLASSES, 11, tmp_path / "a").parent
    b = generate_domain(TARGET, 5, 32, CLASSES, 11, tmp_path / "b").parent
    c = generate_domain(TARGET, 3, 32, CLASSES, 12, tmp_path / "c").parent
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 6
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "images/000001.png").read_bytes() != (c / "images/000001.png").read_bytes()
    # image i does not depend on n
    d = generate_domain(TARGET, 2, 32, CLASSES, 11, tmp_path / "d").parent
    assert (d / "images/000002.png").read_bytes() == (a / "images/000002.png").read_bytes()


def test_generate_domain_same_bytes_in_another_process(tmp_path):
    code = ("import sys; from sskd.config import SyntheticConfig; "
            "from sskd.data.synthetic import generate_domain; "
            "generate_domain(SyntheticConfig().target, 3, 32, ['circle','rectangle','triangle'], 5, sys.argv[1])")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], check=True)
    generate_domain(TARGET, 3, 32, CLASSES, 5, tmp_path / "q")
    for f in ["annotations.json", "images/000001.png", "images/000003.png"]:
        assert (tmp_path / "p" / f).read_bytes() == (tmp_path / "q" / f).read_bytes()


def _tiny_cfg(**kw) -> SyntheticConfig:
    return SyntheticConfig(**{"image_size": 32, "n_source": 4, "n_train": 5, "n_val": 3, **kw})


def test_generate_benchmark_layout_and_cache(tmp_path, monkeypatch):
    cfg = _tiny_cfg(seed=2)
    paths = generate_benchmark(cfg, tmp_path)
    root = tmp_path / config_hash(cfg)
    assert paths == {k: root / k / "annotations.json" for k in ("source", "train", "val")}
    assert (root / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [root.name], "temp dirs must be cleaned up"
    sizes = {k: len(json.loads(p.read_text())["images"]) for k, p in paths.items()}
    assert sizes == {"source": 4, "train": 5, "val": 3}
    src = json.loads(paths["source"].read_text())["info"]["domain"]
    assert src["background"] == "flat"
    # train and val are different draws of the same target domain
    assert (root / "train/images/000001.png").read_bytes() != (root / "val/images/000001.png").read_bytes()

    def boom(*a, **k):
        raise AssertionError("complete benchmark must not be regenerated")

    before = paths["train"].stat().st_mtime_ns
    monkeypatch.setattr(synthetic, "generate_domain", boom)
    assert generate_benchmark(cfg, tmp_path) == paths
    assert paths["train"].stat().st_mtime_ns == before

    monkeypatch.undo()
    cfg2 = _tiny_cfg(seed=3)
    assert generate_benchmark(cfg2, tmp_path)["val"].parent.parent.name == config_hash(cfg2) != root.name


def test_generate_benchmark_replaces_incomplete_copy(tmp_path):
    cfg = _tiny_cfg()
    root = tmp_path / config_hash(cfg)
    (root / "source").mkdir(parents=True)
    (root / "source" / "junk.png").write_bytes(b"half written")
    paths = generate_benchmark(cfg, tmp_path)
    assert not (root / "source" / "junk.png").exists()
    assert (root / MARKER).is_file() and paths["val"].is_file()
    # a marker of an older generator version counts as incomplete too
    marker = json.loads((root / MARKER).read_text())
    (root / MARKER).write_text(json.dumps({**marker, "generator_version": -1}))
    generate_benchmark(cfg, tmp_path)
    assert json.loads((root / MARKER).read_text())["generator_version"] == synthetic.GENERATOR_VERSION


def test_generated_json_reads_back_with_the_kit_coco_reader(tmp_path):
    from sskd.data.coco import read_coco

    path = generate_domain(SOURCE, 4, 32, CLASSES, 0, tmp_path / "s")
    ds = read_coco(path, path.parent)
    assert ds.classes == CLASSES and len(ds) == 4
    for rec in ds.records:
        img, insts = render_image(SOURCE, 32, CLASSES, _rng(0, rec.image_id))
        assert Path(rec.file_name).is_file()
        assert [i.class_id for i in rec.instances] == [k for k, _ in insts]
        assert all(np.array_equal(i.mask().astype(bool), m) for i, (_, m) in zip(rec.instances, insts))


def test_the_foundation_corpus_holds_out_the_targets_appearance(tmp_path):
    from sskd.data.synthetic import corpus_domains
    cfg = _tiny_cfg(n_source=6, corpus_backgrounds=["flat", "noise", "clutter"],
                    corpus_palettes=["primary", "pastel"])
    cfg.target.background, cfg.target.palette = "noise", "pastel"
    doms = corpus_domains(cfg)
    pairs = [(d.background, d.palette) for d in doms]
    assert pairs == [("flat", "primary"), ("flat", "pastel"), ("noise", "primary"),
                     ("clutter", "primary"), ("clutter", "pastel")]
    assert [d.clutter for d in doms] == [0, 0, 0, 2, 2]     # a clutter background needs blobs
    assert all(d.scale_min == cfg.source.scale_min for d in doms)
    info = json.loads(generate_benchmark(cfg, tmp_path)["source"].read_text())["info"]
    assert [(d["background"], d["palette"]) for d in info["domain"]] == pairs
    # image i is drawn from domain (i - 1) mod 5: image 6 is from the first domain again
    assert corpus_domains(_tiny_cfg()) == [_tiny_cfg().source]        # no corpus: one domain
    with pytest.raises(ConfigError, match="corpus_backgrounds and corpus_palettes"):
        corpus_domains(_tiny_cfg(corpus_backgrounds=["flat"]))
    only = _tiny_cfg(corpus_backgrounds=["noise"], corpus_palettes=["pastel"])
    only.target.background, only.target.palette = "noise", "pastel"
    with pytest.raises(ConfigError, match="only the target's own combination"):
        corpus_domains(only)


def test_corpus_images_follow_their_domains(tmp_path):
    from sskd.data.synthetic import generate_domain
    dark = SyntheticConfig().source
    dark = dataclasses.replace(dark, palette="pastel")
    light = SyntheticConfig().source
    path = generate_domain([light, dark], 4, 32, ["circle", "rectangle"], 3, tmp_path)
    means = [np.asarray(Image.open(path.parent / f"images/{i:06d}.png")).mean() for i in (1, 2, 3, 4)]
    # primary backgrounds are near-white, pastel backgrounds are dark grey
    assert means[0] > 180 and means[2] > 180 and means[1] < 150 and means[3] < 150


def test_distractors_are_painted_but_never_annotated():
    from sskd.config import SyntheticDomainConfig
    from sskd.data.synthetic import render_image, validate_domain
    classes = ["circle", "rectangle", "triangle"]
    dom = SyntheticDomainConfig(background="flat", distractors=3, distractor_shapes=["star", "cross"],
                                min_objects=1, max_objects=1, occlusion=0.0)
    plain = dataclasses.replace(dom, distractors=0)
    painted = 0
    for i in range(8):
        img, inst = render_image(dom, 64, classes, _rng(5, i))
        bg = np.asarray(PALETTES["primary"]["background"], dtype=np.float32)
        is_bg = (np.abs(img[..., None, :].astype(np.float32) - bg).sum(-1) < 1).any(-1)
        masked = np.zeros_like(is_bg)
        for _, m in inst:
            masked |= m
        painted += int((~is_bg & ~masked).sum())          # object-coloured, but in no mask
        assert len(inst) == 1
    assert painted > 8 * 30
    for i in range(4):                                    # without distractors: none of that
        img, inst = render_image(plain, 64, classes, _rng(5, i))
        is_bg = (np.abs(img[..., None, :].astype(np.float32) - bg).sum(-1) < 1).any(-1)
        assert not (~is_bg & ~inst[0][1]).any()
    with pytest.raises(ConfigError, match="distractor_shapes"):
        validate_domain(dataclasses.replace(dom, distractor_shapes=["circle"]), classes, 64)
    with pytest.raises(ConfigError, match="distractors"):
        validate_domain(dataclasses.replace(dom, distractor_shapes=[]), classes, 64)


def test_striped_instances_keep_their_masks_and_the_flat_rendering():
    """``object_texture: stripes`` repaints inside the masks only (two shades per instance),
    after every other draw, so shapes, masks and background match the flat rendering."""
    from sskd.config import SyntheticDomainConfig
    from sskd.data.synthetic import validate_domain
    flat = SyntheticDomainConfig(background="flat", palette="primary", min_objects=2, max_objects=3)
    striped = dataclasses.replace(flat, object_texture="stripes")
    for i in range(6):
        img_f, inst_f = render_image(flat, 64, CLASSES, _rng(3, i))
        img_s, inst_s = render_image(striped, 64, CLASSES, _rng(3, i))
        assert len(inst_f) == len(inst_s) >= 2
        fg = np.zeros((64, 64), bool)
        for (c_f, m_f), (c_s, m_s) in zip(inst_f, inst_s):
            assert c_f == c_s and np.array_equal(m_f, m_s)      # same shapes, same masks
            fg |= m_s
            colours = np.unique(img_s[m_s].reshape(-1, 3), axis=0)
            flat_colour = img_f[m_f][0].astype(np.float32)
            assert len(np.unique(img_f[m_f].reshape(-1, 3), axis=0)) == 1
            if m_s.sum() >= 40:                                  # big enough to hold both bands
                assert len(colours) == 2
                dark = colours[np.argmin(colours.sum(1))].astype(np.float32)
                assert np.allclose(dark, np.rint(flat_colour * 0.55), atol=1)
        assert np.array_equal(img_s[~fg], img_f[~fg])           # background untouched
        assert not np.array_equal(img_s[fg], img_f[fg])
    with pytest.raises(ConfigError, match="object_texture"):
        validate_domain(dataclasses.replace(flat, object_texture="dots"), CLASSES, 64)
