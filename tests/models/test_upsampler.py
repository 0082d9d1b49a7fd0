"""ConvexMaskUpsampler: starts as bilinear, stays convex, learns to follow image edges; and the
Mask2Former option that puts it in front of the query decoder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sskd.models import build_model
from sskd.models.upsampler import ConvexMaskUpsampler

K = 3


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _bilinear(features: torch.Tensor, f: int) -> torch.Tensor:
    return nn.functional.interpolate(features, scale_factor=f, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("factor,hw", [(4, (7, 9)), (2, (5, 4)), (4, (1, 3))])
def test_a_new_upsampler_is_bilinear_upsampling(factor, hw):
    torch.manual_seed(0)
    up = ConvexMaskUpsampler(5, channels=4, factor=factor)
    features = torch.randn(2, 5, *hw)
    images = torch.randn(2, 3, hw[0] * factor, hw[1] * factor)
    out = up(features, images)
    assert out.shape == (2, 5, hw[0] * factor, hw[1] * factor)
    assert torch.allclose(out, _bilinear(features, factor), atol=1e-5)  # borders included


def test_any_weights_give_a_convex_combination_of_the_neighbouring_cells():
    torch.manual_seed(0)
    up = ConvexMaskUpsampler(3, channels=4)
    with torch.no_grad():
        up.weights.weight.normal_(0, 3.0)
    features = torch.randn(1, 3, 6, 6)
    out = up(features, torch.randn(1, 3, 24, 24))
    assert not torch.allclose(out, _bilinear(features, 4), atol=1e-3)
    # each pixel lies within the range of the 3 x 3 cells around its own
    pad = nn.functional.pad(features, (1, 1, 1, 1), mode="replicate")
    lo = -nn.functional.max_pool2d(-pad, 3, stride=1)
    hi = nn.functional.max_pool2d(pad, 3, stride=1)
    near = lambda t: nn.functional.interpolate(t, scale_factor=4, mode="nearest")
    assert (out >= near(lo) - 1e-5).all() and (out <= near(hi) + 1e-5).all()


def _square_problem(n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A square of another colour at a random place and size (edges off the 4-pixel grid);
    target = its sharp mask, features = that mask area-pooled to stride 4 (what a stride-4
    head can know)."""
    S = 32
    y0, x0 = torch.randint(1, 18, (2, n), generator=generator)
    side = torch.randint(5, 13, (n,), generator=generator)
    r = torch.arange(S)
    inside = lambda z0: (r[None] >= z0[:, None]) & (r[None] < (z0 + side)[:, None])
    masks = (inside(y0)[:, :, None] & inside(x0)[:, None, :]).float()[:, None]
    images = torch.cat([masks * 1.5 - 0.75, -masks, masks * 0.5], 1)
    return nn.functional.avg_pool2d(masks, 4), images, masks


def test_it_learns_to_put_the_outline_on_the_image_edge():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    up = ConvexMaskUpsampler(1, channels=8)
    opt = torch.optim.Adam(up.parameters(), lr=1e-2)
    for _ in range(100):
        features, images, masks = _square_problem(8, g)
        # the features as mask logits (0.5 -> 0), trained with the mask BCE as in Mask2Former
        loss = nn.functional.binary_cross_entropy_with_logits(
            (up(features, images) - 0.5) * 20, masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    features, images, masks = _square_problem(32, g)   # new edge positions
    with torch.no_grad():
        learned = ((up(features, images) > 0.5) != masks.bool()).float().mean()
    bilinear = ((_bilinear(features, 4) > 0.5) != masks.bool()).float().mean()
    assert bilinear > 0.01          # the stride-4 blur rounds corners, shifts edges
    assert learned < 0.2 * bilinear, (learned.item(), bilinear.item())


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="channels >= 1"):
        ConvexMaskUpsampler(4, channels=0)
    up = ConvexMaskUpsampler(4, channels=2)
    with pytest.raises(ValueError, match=r"image \(30, 32\) is not 4 x the features' \(8, 8\)"):
        up(torch.zeros(1, 4, 8, 8), torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="mask_upsampler_channels must be >= 0"):
        build_model("mask2former", K, size="tiny", mask_upsampler_channels=-1)


def _tiny(**kw):
    torch.manual_seed(0)
    return build_model("mask2former", K, size="tiny", **kw)


def test_mask2former_option_gives_full_resolution_masks_that_start_bilinear():
    model = _tiny(mask_upsampler_channels=4)
    x = torch.rand(2, 3, 32, 40)
    out = model(x, embeddings="both")
    assert out.mask_logits.shape[-2:] == (32, 40)
    assert all(m.shape[-2:] == (32, 40) for _, m in out.aux)
    assert out.embed_weak.shape[-2:] == (8, 10)          # L_pxl still reads stride 4
    upsampler, model.mask_upsampler = model.mask_upsampler, None
    coarse = model(x)
    model.mask_upsampler = upsampler
    assert coarse.mask_logits.shape[-2:] == (8, 10)
    # the query-only prediction reads no attention mask: exactly the bilinear upsampling of the
    # stride-4 model's (later layers differ: their attention masks come from sharper logits)
    assert torch.allclose(out.aux[0][1], _bilinear(coarse.aux[0][1], 4), atol=1e-4)
    preds = model.predict(x, score_threshold=0.0, max_instances=4)
    assert all(p.masks.shape[1:] == (32, 40) for p in preds)


def test_the_silhouette_head_still_reads_the_stride4_grid():
    model = _tiny(mask_upsampler_channels=4, silhouette_channels=4)
    with torch.no_grad():
        model.silhouette_head.classify.weight.normal_()
    x = torch.rand(2, 3, 32, 32)
    targets = [{"masks": (torch.rand(2, 32, 32) > 0.5).float(), "labels": torch.tensor([0, 2])}] * 2
    out = model(x)
    assert model._silhouette_size(out.mask_logits) == (8, 8)
    with_up = model.compute_losses(out, targets)["loss_silhouette"]
    upsampler, model.mask_upsampler = model.mask_upsampler, None
    without = model.compute_losses(model(x), targets)["loss_silhouette"]
    model.mask_upsampler = upsampler
    # the head's loss reads the targets pooled to 8 x 8 in both models
    assert torch.allclose(with_up, without)
    # and it reads the full-resolution probabilities area-pooled to 8 x 8
    probs = nn.functional.avg_pool2d(out.mask_logits.sigmoid(), 4)
    assert torch.allclose(model._silhouette_input(out.mask_logits), probs, atol=1e-6)


def test_the_upsampler_trains_with_the_pixel_decoder_part():
    model = _tiny(mask_upsampler_channels=4)
    assert any(n.startswith("mask_upsampler.") for n in model.parts()["pixel_decoder"])
    model.set_trainable(["encoder", "decoder"])
    assert not any(p.requires_grad for p in model.mask_upsampler.parameters())
