"""The negative sampler draws exactly P(q) ∝ s_deb without replacement, in O(N R) memory."""

import itertools

import pytest
import torch
from scipy.stats import chisquare
from torch.utils._python_dispatch import TorchDispatchMode

from sskd.losses.negative_sampling import FusedNegativeSampler, _first_occurrence
from sskd.losses.pixel_contrastive import pixel_contrastive_loss

METHODS = ["gumbel", "rejection"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Many small ops: thread hand-offs on a shared 2-core machine cost more than they save."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _scene(n_cand=12, M=4, seed=0, zero=True):
    """Pixel 0 (image 0) is the anchor; ``n_cand`` candidates in image 1 with varied weights."""
    g = _gen(seed)
    y = torch.rand(n_cand + 1, M, generator=g) ** 3
    if zero:
        y[1] = y[0]                       # a candidate identical to the anchor: weight 0
    y = torch.nn.functional.normalize(y, dim=1)
    image = torch.tensor([0] + [1] * n_cand)
    w = (1 - y[1:] @ y[0]).clamp(min=0)   # s_deb of each candidate
    return y, image, w


def _no_gumbel(sampler, monkeypatch):
    """Make sure the rejection path alone produces the sample."""
    def boom(*a, **k):
        raise AssertionError("Gumbel fallback used")
    monkeypatch.setattr(sampler, "_gumbel", boom)


@pytest.mark.parametrize("method", METHODS)
def test_single_draw_frequencies_match_normalised_s_deb(method, monkeypatch):
    y, image, w = _scene()
    s = FusedNegativeSampler("fused", 1, _gen(1), method=method)
    if method == "rejection":
        _no_gumbel(s, monkeypatch)
    n = 20000
    idx = s.sample(y, image, torch.zeros(n, dtype=torch.long)).index[:, 0]
    counts = torch.bincount(idx - 1, minlength=len(w)).double()
    assert counts[0] == 0                                     # zero-weight candidate never drawn
    exp = w.double() / w.double().sum() * n   # float64 throughout: chisquare checks the sums match
    keep = exp > 0
    assert chisquare(counts[keep].numpy(), exp[keep].numpy()).pvalue > 1e-3
    # The test has power: the same counts are far from uniform.
    uni = torch.full_like(exp[keep], n / int(keep.sum()))
    assert chisquare(counts[keep].numpy(), uni.numpy()).pvalue < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_ordered_pairs_follow_successive_sampling_without_replacement(method, monkeypatch):
    """R=2: P(first=i, second=j) = w_i / W * w_j / (W - w_i), never i == j."""
    y, image, w = _scene(n_cand=8, M=3, seed=3, zero=False)
    s = FusedNegativeSampler("fused", 2, _gen(2), method=method)
    if method == "rejection":
        _no_gumbel(s, monkeypatch)
    n = 30000
    idx = s.sample(y, image, torch.zeros(n, dtype=torch.long)).index - 1
    assert (idx[:, 0] != idx[:, 1]).all()
    W = float(w.sum())
    pairs = list(itertools.permutations(range(len(w)), 2))
    exp = torch.tensor([float(w[i]) / W * float(w[j]) / (W - float(w[i])) for i, j in pairs]) * n
    code = idx[:, 0] * len(w) + idx[:, 1]
    counts = torch.bincount(code, minlength=len(w) ** 2).double()
    obs = torch.tensor([float(counts[i * len(w) + j]) for i, j in pairs])
    assert float(obs.sum()) == n
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_rejection_continued_by_gumbel_stays_exact(monkeypatch):
    """Rejection rounds stop after one draw; Gumbel top-k must continue the successive sample."""
    y, image, w = _scene(n_cand=8, M=3, seed=3, zero=False)
    s = FusedNegativeSampler("fused", 2, _gen(4), method="rejection")
    rounds = s._rounds

    def half(*a, **k):
        out, filled = rounds(*a, **k)
        out[:, 1:] = -1
        return out, filled.clamp(max=1)
    monkeypatch.setattr(s, "_rounds", half)
    n = 30000
    idx = s.sample(y, image, torch.zeros(n, dtype=torch.long)).index - 1
    assert (idx >= 0).all() and (idx[:, 0] != idx[:, 1]).all()
    W = float(w.sum())
    pairs = list(itertools.permutations(range(len(w)), 2))
    exp = torch.tensor([float(w[i]) / W * float(w[j]) / (W - float(w[i])) for i, j in pairs]) * n
    counts = torch.bincount(idx[:, 0] * len(w) + idx[:, 1], minlength=len(w) ** 2).double()
    obs = torch.tensor([float(counts[i * len(w) + j]) for i, j in pairs])
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_uniform_mode_is_uniform_over_allowed_candidates(method):
    image = torch.tensor([0] * 3 + [1] * 5 + [2] * 4)
    valid = torch.ones(12, dtype=torch.bool)
    valid[11] = False
    s = FusedNegativeSampler("uniform", 1, _gen(5), method=method)
    n = 16000
    idx = s.sample(None, image, torch.zeros(n, dtype=torch.long), valid).index[:, 0]
    counts = torch.bincount(idx, minlength=12).double()
    assert counts[:3].sum() == 0 and counts[11] == 0        # own image and invalid pixel
    assert chisquare(counts[3:11].numpy()).pvalue > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("candidates", ["other_images", "batch"])
def test_no_duplicates_and_candidate_set(method, candidates):
    B, hw, M, R = 4, 64, 6, 40
    y = torch.nn.functional.normalize(torch.rand(B * hw, M, generator=_gen(6)) ** 4, dim=1)
    image = torch.arange(B).repeat_interleave(hw)
    anchors = torch.randperm(B * hw, generator=_gen(7))[:100]
    s = FusedNegativeSampler("fused", R, _gen(8), candidates=candidates, method=method)
    idx = s.sample(y, image, anchors).index
    assert idx.shape == (100, R) and (idx >= 0).all()
    assert (idx.sort(1).values.diff(dim=1) != 0).all()       # without replacement
    assert (idx != anchors[:, None]).all()                   # the positive is never a negative
    own = image[idx] == image[anchors][:, None]
    if candidates == "other_images":
        assert not own.any()
    else:
        assert own.any()


@pytest.mark.parametrize("method", METHODS)
def test_fewer_candidates_than_r_pads_with_minus_one(method):
    image = torch.tensor([0] * 4 + [1] * 3)
    s = FusedNegativeSampler("uniform", 5, _gen(), method=method)
    idx = s.sample(None, image, torch.tensor([0, 1, 5])).index
    assert torch.equal(idx[:2, 3:], torch.full((2, 2), -1))
    assert set(idx[0, :3].tolist()) == {4, 5, 6}
    assert set(idx[2, :4].tolist()) == {0, 1, 2, 3} and idx[2, 4] == -1


def test_all_zero_weights_fall_back_to_uniform():
    y = torch.nn.functional.normalize(torch.ones(9, 3), dim=1)   # every y identical
    image = torch.tensor([0] + [1] * 8)
    for method in METHODS:
        s = FusedNegativeSampler("fused", 1, _gen(9), method=method)
        out = s.sample(y, image, torch.zeros(8000, dtype=torch.long))
        assert out.fallback_uniform == 8000
        counts = torch.bincount(out.index[:, 0] - 1, minlength=8).double()
        assert chisquare(counts.numpy()).pvalue > 1e-3


def test_allowed_mass_is_the_sum_of_weights():
    B, hw, M = 3, 10, 5
    y = torch.nn.functional.normalize(torch.rand(B * hw, M, generator=_gen(10)), dim=1)
    image = torch.arange(B).repeat_interleave(hw)
    valid = torch.rand(B * hw, generator=_gen(11)) > 0.2
    anchors = torch.tensor([0, 7, 15, 29])
    w = 1 - y[anchors] @ y.T
    for cand in ("other_images", "batch"):
        s = FusedNegativeSampler("fused", 3, candidates=cand)
        allowed = valid[None].expand(4, -1).clone()
        if cand == "other_images":
            allowed &= image[None] != image[anchors][:, None]
        else:
            allowed[torch.arange(4), anchors] = False
        ref = (w * allowed).sum(1)
        assert torch.allclose(s._allowed_mass(y, image, anchors, valid), ref, atol=1e-5)


def test_first_occurrence():
    seq = torch.tensor([[5, 3, 5, 3, 7, 5], [1, 1, 2, 2, -1, 1]])
    ok = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    got = _first_occurrence(seq, ok)
    assert got.tolist() == [[False, True, True, False, True, False],
                            [False, True, True, False, False, False]]


def test_bad_settings_get_clear_errors():
    with pytest.raises(ValueError, match="pixel_contrast.sampler"):
        FusedNegativeSampler("random")
    with pytest.raises(ValueError, match="candidates"):
        FusedNegativeSampler("fused", candidates="all")
    with pytest.raises(ValueError, match="num_negatives"):
        FusedNegativeSampler("fused", 0)
    with pytest.raises(ValueError, match="needs the pseudo-probabilities"):
        FusedNegativeSampler("fused", 2).sample(None, torch.zeros(3, dtype=torch.long),
                                                torch.tensor([0]))


# --------------------------------------------------------------------------- memory


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", METHODS)
def test_largest_intermediate_is_o_n_r_not_n_by_p(method):
    """4 images of 64x64: an N x P similarity would hold 512 x 16384 = 8.4M elements."""
    B, D, h, w, Q, C = 4, 8, 64, 64, 6, 3
    N, R, P = B * 128, 64, B * h * w
    g = _gen(12)
    zw, zs = torch.randn(B, D, h, w, generator=g), torch.randn(B, D, h, w, generator=g)
    y = torch.nn.functional.normalize(torch.rand(B, Q + C + 1, h, w, generator=g), dim=1)
    budget = 2 * N * R                          # chunk budget O(N R): 65536 elements
    sampler = FusedNegativeSampler("fused", R, _gen(13), method=method, chunk_elements=budget)
    with _LargestTensor() as trace:
        loss, d = pixel_contrastive_loss(zw, zs, y, num_anchors=128, num_negatives=R,
                                         temperature=0.1, sampler=sampler)
    assert d["num_anchors"] == N and torch.isfinite(loss)
    inputs = max(zw.numel(), y.numel())         # copies of the inputs (normalise, permute)
    assert trace.largest <= max(inputs, 4 * budget)
    assert trace.largest * 20 < N * P
