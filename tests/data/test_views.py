"""Weak/strong views share their geometry; only the strong one changes photometrically."""

import pytest
import torch

from sskd.data.views import eval_view, make_views

NO_PHOTO = dict(jitter=(0.0, 0.0, 0.0, 0.0), gray_p=0.0, blur_p=0.0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _marker_scene(H=48, W=40):
    """Black image with a white 6x6 square at a known place, plus its mask and a full mask."""
    img = torch.zeros(3, H, W)
    img[:, 10:16, 24:30] = 1.0
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, 10:16, 24:30] = True
    masks[1] = True
    return img, masks


def _centroid(weight: torch.Tensor) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(weight.shape[0]), torch.arange(weight.shape[1]),
                            indexing="ij")
    w = weight.clamp(min=0)
    return torch.stack([(w * ii).sum(), (w * jj).sum()]) / w.sum()


@pytest.mark.parametrize("seed", range(12))
def test_geometry_identical_when_photometric_ops_are_off(seed):
    img = torch.rand(3, 30, 50)
    v = make_views(img, None, _gen(seed), out_size=24, **NO_PHOTO)
    assert v.weak.shape == v.strong.shape == (3, 24, 24)
    assert torch.equal(v.weak, v.strong)
    assert v.masks is None and v.keep is None


def test_same_geometry_with_and_without_photometric_ops():
    """Photometric settings do not change the random stream of the geometry."""
    img = torch.rand(3, 32, 32)
    for seed in range(8):
        a = make_views(img, None, _gen(seed), out_size=32, **NO_PHOTO)
        b = make_views(img, None, _gen(seed), out_size=32)
        assert torch.equal(a.weak, b.weak) and torch.equal(a.valid, b.valid)


def test_flip_and_unit_scale_is_flipped_eval_view():
    img = torch.rand(3, 20, 36)
    v = make_views(img, None, _gen(0), out_size=16, scale_range=(1.0, 1.0), flip_p=1.0, **NO_PHOTO)
    assert torch.allclose(v.weak, eval_view(img, 16).flip(-1))
    assert v.valid.all()
    v = make_views(img, None, _gen(0), out_size=16, scale_range=(1.0, 1.0), flip_p=0.0, **NO_PHOTO)
    assert torch.allclose(v.weak, eval_view(img, 16))


def test_downscale_pads_with_zeros_and_marks_padding_invalid():
    img = torch.rand(3, 32, 32) * 0.5 + 0.5   # strictly positive content
    v = make_views(img, torch.ones(1, 32, 32, dtype=torch.bool), _gen(3), out_size=32,
                   scale_range=(0.5, 0.5), flip_p=0.0, **NO_PHOTO)
    assert int(v.valid.sum()) == 16 * 16
    assert (v.weak[:, ~v.valid] == 0).all() and (v.weak[:, v.valid] > 0).all()
    assert torch.equal(v.masks[0], v.valid)   # a full-image mask covers exactly the content


@pytest.mark.parametrize("seed", range(10))
def test_marker_lands_on_the_same_pixel_in_both_views_and_mask(seed):
    img, masks = _marker_scene()
    v = make_views(img, masks, _gen(seed), out_size=40, scale_range=(0.9, 1.2), blur_p=1.0)
    assert 0 in v.keep.tolist() and 1 in v.keep.tolist()  # the marker is inside any crop here
    m = v.masks[v.keep.tolist().index(0)]
    c_mask = _centroid(m.float())
    c_weak = _centroid(v.weak.sum(0))
    bright = v.strong.sum(0)
    c_strong = _centroid(bright - bright.median())  # contrast may lift the black background
    assert torch.allclose(c_weak, c_mask, atol=0.75), (c_weak, c_mask)
    assert torch.allclose(c_strong, c_mask, atol=1.0), (c_strong, c_mask)


def test_masks_follow_flip():
    img, masks = _marker_scene(40, 40)
    v = make_views(img, masks, _gen(0), out_size=40, scale_range=(1.0, 1.0), flip_p=1.0, **NO_PHOTO)
    assert torch.equal(v.masks[0], masks[0].flip(-1))


def test_empty_masks_are_dropped_and_keep_indexes_the_survivors():
    img = torch.rand(3, 40, 40)
    masks = torch.zeros(3, 40, 40, dtype=torch.bool)
    masks[0] = True                    # never empty
    masks[1, :2, :2] = True            # tiny corner: cropped away by some zoomed-in crops
    masks[2, 18:22, 18:22] = True      # centre: always kept
    seen = set()
    for seed in range(40):
        v = make_views(img, masks, _gen(seed), out_size=40, scale_range=(1.2, 1.6))
        assert v.masks.shape[0] == v.keep.numel()
        assert v.masks.flatten(1).any(1).all()
        assert {0, 2} <= set(v.keep.tolist())
        seen.add(1 in v.keep.tolist())
    assert seen == {True, False}


def test_deterministic_in_the_generator():
    img, masks = _marker_scene()
    a = make_views(img, masks, _gen(7), out_size=32)
    b = make_views(img, masks, _gen(7), out_size=32)
    c = make_views(img, masks, _gen(8), out_size=32)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)  # ignore is None: no crowd given
    assert not torch.equal(a.strong, c.strong)


def test_strong_view_differs_photometrically():
    img = torch.rand(3, 32, 32)
    diffs = [float((v.strong - v.weak).abs().mean())
             for v in (make_views(img, None, _gen(s), out_size=32) for s in range(10))]
    assert min(diffs) > 1e-3
    v = make_views(img, None, _gen(0), out_size=32, jitter=(0, 0, 0, 0), gray_p=1.0, blur_p=0.0)
    assert torch.allclose(v.strong[0], v.strong[1]) and torch.allclose(v.strong[1], v.strong[2])
    assert not torch.allclose(v.weak[0], v.weak[1])
    assert 0.0 <= float(v.strong.min()) and float(v.strong.max()) <= 1.0


def test_eval_view_resizes_only():
    img = torch.rand(3, 20, 30)
    out = eval_view(img, 10)
    assert out.shape == (3, 10, 10)
    assert torch.allclose(eval_view(img[:, :10, :10], 10), img[:, :10, :10])


@pytest.mark.parametrize("bad, msg", [
    (torch.rand(32, 32, 3), "permute"),
    ((torch.rand(3, 8, 8) * 255).to(torch.uint8), "divide"),
])
def test_bad_images_get_clear_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        make_views(bad, None, _gen(0), out_size=8)


def test_bad_masks_and_settings_get_clear_errors():
    with pytest.raises(ValueError, match="H x W"):
        make_views(torch.rand(3, 8, 8), torch.zeros(1, 4, 4, dtype=torch.bool), _gen(0), out_size=8)
    with pytest.raises(ValueError, match="scale_range"):
        make_views(torch.rand(3, 8, 8), None, _gen(0), out_size=8, scale_range=(1.5, 1.0))
