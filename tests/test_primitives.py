"""Transposable masks, the S-STE soft threshold, MVUE24 and the flip rate, against their definitions."""

from __future__ import annotations

import functools
import itertools
import re

import pytest
import torch

from sparsedist.sparsity import (
    TRANSPOSABLE_PATTERNS,
    flip_rate,
    mvue24,
    mvue24_inclusion_probabilities,
    nm_mask,
    soft_threshold,
    soft_threshold_scale,
    soft_threshold_scale_terms,
    transposable_mask,
)

# --- transposable masks ------------------------------------------------------------------


@functools.cache
def doubly_two_of_four() -> list[tuple[int, ...]]:
    """Every 4×4 0/1 matrix (row-major, 16 bits) with two ones per row and per column, found
    among all 2^16 and listed in decreasing bit-string order: the documented tie order."""
    return [
        bits for bits in itertools.product((1, 0), repeat=16)
        if all(sum(bits[4 * r: 4 * r + 4]) == 2 for r in range(4)) and all(sum(bits[c::4]) == 2 for c in range(4))
    ]


def brute_force_transposable(weight: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Per block the first pattern with the highest Σ|w|, by scoring each one in Python; and the best scores."""
    out = torch.zeros(weight.shape, dtype=torch.bool)
    best_scores = []
    for r0, c0 in itertools.product(range(0, weight.shape[0], 4), range(0, weight.shape[1], 4)):
        block = [abs(float(weight[r0 + k // 4, c0 + k % 4])) for k in range(16)]
        best, best_score = None, -1.0
        for bits in doubly_two_of_four():
            score = sum(v for v, b in zip(block, bits, strict=True) if b)
            if score > best_score:
                best, best_score = bits, score
        for k, b in enumerate(best):
            out[r0 + k // 4, c0 + k % 4] = bool(b)
        best_scores.append(best_score)
    return out, best_scores


def is_two_of_four_along_rows(mask: torch.Tensor) -> bool:
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


def test_the_90_patterns_in_their_documented_order():
    assert len(doubly_two_of_four()) == 90
    assert TRANSPOSABLE_PATTERNS.shape == (90, 4, 4) and TRANSPOSABLE_PATTERNS.dtype == torch.bool
    assert [tuple(p.flatten().int().tolist()) for p in TRANSPOSABLE_PATTERNS] == doubly_two_of_four()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(8, 12), (12, 8), (16, 16)])
def test_transposable_mask_is_the_best_pattern_per_block(shape, dtype):
    weight = torch.randn(shape).to(dtype)
    mask = transposable_mask(weight)
    expected, best_scores = brute_force_transposable(weight)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert torch.equal(mask, expected)
    assert is_two_of_four_along_rows(mask) and is_two_of_four_along_rows(mask.T)
    # optimality: no pattern scores higher than the chosen one in any block
    chosen = (weight.double().abs() * mask).reshape(shape[0] // 4, 4, shape[1] // 4, 4).sum((1, 3)).flatten()
    torch.testing.assert_close(chosen, torch.tensor(best_scores, dtype=torch.float64), rtol=1e-12, atol=0)


def test_transposable_mask_ties_go_to_the_first_pattern():
    """Small integers tie a lot; the exact scores must pick the first maximal pattern, as brute force does."""
    weight = torch.randint(-2, 3, (32, 32)).float()
    assert torch.equal(transposable_mask(weight), brute_force_transposable(weight)[0])
    first = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(TRANSPOSABLE_PATTERNS[0], first)
    for block in (torch.ones(4, 4), -torch.full((4, 4), 0.3), torch.zeros(4, 4)):
        assert torch.equal(transposable_mask(block), first)


@pytest.mark.parametrize("shape", [(6, 8), (8, 6), (8,), (4, 4, 4)])
def test_transposable_mask_refuses_partial_blocks(shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        transposable_mask(torch.randn(shape))


def test_transposable_mask_of_an_empty_shard():
    assert transposable_mask(torch.empty(0, 8)).shape == (0, 8)


# --- soft threshold ----------------------------------------------------------------------


def reference_soft_threshold(weight: torch.Tensor) -> torch.Tensor:
    """Per group in Python: keep the two largest |w| (lower index on ties), shrink them by the third largest."""
    out = torch.zeros_like(weight, dtype=torch.float64)
    for r, g in itertools.product(range(weight.shape[0]), range(0, weight.shape[1], 4)):
        values = [float(weight[r, g + i]) for i in range(4)]
        order = sorted(range(4), key=lambda i: (-abs(values[i]), i))
        t = abs(values[order[2]])
        for i in order[:2]:
            sign = (values[i] > 0) - (values[i] < 0)
            out[r, g + i] = sign * (abs(values[i]) - t)
    return out


def test_soft_threshold_matches_the_per_group_definition():
    weight = torch.randn(6, 16, dtype=torch.float64)
    ties = torch.randint(-3, 4, (6, 16)).double()  # kept entries equal to the threshold become 0
    for w in (weight, ties):
        torch.testing.assert_close(soft_threshold(w), reference_soft_threshold(w), rtol=0, atol=0)
    weight32 = torch.randn(6, 16)
    out = soft_threshold(weight32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference_soft_threshold(weight32), rtol=0, atol=1e-6)


def test_soft_threshold_is_exactly_two_of_four():
    out = soft_threshold(torch.randn(64, 128))
    assert ((out != 0).reshape(64, -1, 4).sum(-1) == 2).all()


def test_soft_threshold_is_continuous_where_the_kept_pair_swaps():
    eps = 1e-6
    before = torch.tensor([[1.0, 0.5 + eps, 0.5, 0.1], [-1.0, 0.5 + eps, -0.5, 0.1]], dtype=torch.float64)
    after = torch.tensor([[1.0, 0.5, 0.5 + eps, 0.1], [-1.0, 0.5, -0.5 - eps, 0.1]], dtype=torch.float64)
    assert not torch.equal(nm_mask(before), nm_mask(after))  # the kept pair swaps...
    assert (soft_threshold(before) - soft_threshold(after)).abs().max() <= 1.01 * eps  # ...the output moves by ε
    assert (before * nm_mask(before) - after * nm_mask(after)).abs().max() > 0.4  # a hard mask would jump

    # 2nd and 3rd largest |w| tied in every group; a 1e-6 perturbation swaps about half the pairs
    weight = torch.randn(32, 64, dtype=torch.float64).reshape(32, 16, 4)
    weight = weight.gather(-1, weight.abs().argsort(-1, descending=True))
    weight[..., 2] = weight[..., 1].abs() * weight[..., 2].sign()
    weight = weight.reshape(32, 64)
    delta = (torch.rand(weight.shape, dtype=torch.float64) * 2 - 1) * eps
    assert (nm_mask(weight) != nm_mask(weight + delta)).sum() > 100
    moved = (soft_threshold(weight + delta) - soft_threshold(weight)).abs().max()
    assert moved <= 2 * delta.abs().max() * (1 + 1e-6)  # |Δ(|w| − t)| ≤ |Δw| + |Δt|


def test_soft_threshold_scale_of_a_gaussian_init():
    """β ≈ 1.48 (the spec, to 2 decimals), within 5 standard errors estimated from 64 row blocks."""
    weight = torch.randn(1024, 2048, generator=torch.Generator().manual_seed(0)) * 0.02
    beta = soft_threshold_scale(weight)
    per_block = torch.tensor([soft_threshold_scale(block) for block in weight.chunk(64)])
    standard_error = float(per_block.std()) / 8
    assert abs(beta - 1.48) <= 0.005 + 5 * standard_error
    assert soft_threshold_scale(weight * 50) == pytest.approx(beta, rel=1e-9)  # scale-free


def test_sharded_scale_terms_add_up_to_the_direct_scale():
    weight = torch.randn(24, 32)
    inner, norm = soft_threshold_scale_terms(weight)
    assert inner.dtype == norm.dtype == torch.float64 and inner.dim() == norm.dim() == 0
    s = soft_threshold(weight.double())
    direct = float((weight.double() * s).sum() / (s * s).sum())
    assert soft_threshold_scale(weight) == pytest.approx(direct, rel=1e-12)
    shards = [weight[:5], weight[5:5], weight[5:13], weight[13:]]  # an empty shard too
    sums = [sum(t) for t in zip(*(soft_threshold_scale_terms(shard) for shard in shards), strict=True)]
    assert float(sums[0] / sums[1]) == pytest.approx(direct, rel=1e-12)


def test_soft_threshold_refuses_bad_input():
    with pytest.raises(ValueError, match="no whole groups of 4"):
        soft_threshold(torch.randn(4, 6))
    with pytest.raises(ValueError, match="S\\(W\\) is zero"):
        soft_threshold_scale(torch.zeros(4, 8))


# --- MVUE24 ------------------------------------------------------------------------------


def enumerated_inclusion(group: list[float]) -> list[float]:
    """P(i kept) summed over the ordered draws (first ∝ |g|, then ∝ |g| among the other three)."""
    a = [abs(v) for v in group]
    total = sum(a)
    p = [0.0] * 4
    for i, j in itertools.permutations(range(4), 2):
        if a[i] and total - a[i]:
            prob = a[i] / total * a[j] / (total - a[i])
            p[i] += prob
            p[j] += prob
    return p


def varied_gradient(generator: torch.Generator | None = None) -> torch.Tensor:
    """[4, 32]: Gaussians of mixed scales, zeros, a dominant entry and every degenerate kind."""
    g = torch.randn(4, 32, generator=generator) * torch.logspace(-3, 1, 32)[torch.randperm(32, generator=generator)]
    g[0, :4] = torch.tensor([1.0, 1e-6, -1e-6, 1e-6])  # a dominant entry (S − |g_0| cancels)
    g[0, 4:8] = torch.tensor([1.0, 1e-9, 2e-9, 3e-9])
    g[1, 8:12] = torch.tensor([0.0, 2.0, -1.0, 0.5])  # three nonzeros
    g[2, 0:12] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -3.0, 0.0, 0.0, 0.0, 2.0, 0.0, 1.0])  # degenerate
    g[3, torch.randperm(32, generator=generator)[:6]] = 0.0
    return g


def test_inclusion_probabilities_match_enumeration_and_sum_to_two():
    g = varied_gradient()
    p = mvue24_inclusion_probabilities(g)
    assert p.dtype == torch.float32 and p.shape == g.shape
    groups, p_groups = g.reshape(-1, 4), p.reshape(-1, 4).double()
    for group, got in zip(groups.tolist(), p_groups, strict=True):
        nonzero = sum(v != 0 for v in group)
        expected = enumerated_inclusion(group) if nonzero >= 2 else [float(v != 0) for v in group]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)
        assert float(got.sum()) == pytest.approx(min(2, nonzero), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_mvue24_keeps_two_per_group_and_returns_degenerate_groups_unchanged(dtype):
    g = torch.randn(64, 128)
    g[torch.rand(g.shape) < 0.3] = 0.0
    g[:8] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.5, 0.0, 0.0, -2.0, 0.0, 0.0, 3.0]).repeat(8, 11)[:, :128]
    g = g.to(dtype)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        out = mvue24(g, generator=generator)
        assert out.dtype == dtype and out.shape == g.shape and torch.isfinite(out).all()
        kept = (out != 0).reshape(64, -1, 4).sum(-1)
        assert torch.equal(kept, (g != 0).reshape(64, -1, 4).sum(-1).clamp(max=2))
        assert ((out == 0) | (g != 0)).all() and ((out == 0) | (out.sign() == g.sign())).all()
        degenerate = ((g != 0).reshape(64, -1, 4).sum(-1, keepdim=True) <= 2).expand(-1, -1, 4).reshape(g.shape)
        assert torch.equal(out[degenerate], g[degenerate])
    assert torch.equal(mvue24(g[:8]), g[:8])


def test_mvue24_is_unbiased_and_draws_with_the_inclusion_probabilities():
    """Mean of 20000 seeded draws within 5 standard errors of g, the standard error from the estimator's
    variance g²(1/p − 1); kept frequencies within 5 binomial standard errors of p. Seeded: not flaky."""
    g = varied_gradient(torch.Generator().manual_seed(0))
    p = mvue24_inclusion_probabilities(g).double()
    draws = 20000
    out = mvue24(g.repeat(draws, 1), generator=torch.Generator().manual_seed(1234)).reshape(draws, *g.shape)
    mean = out.double().mean(0)
    standard_error = (g.double() ** 2 * (1 / p.clamp(min=1e-12) - 1) / draws).sqrt()
    assert ((mean - g.double()).abs() <= 5 * standard_error + 1e-6 * g.double().abs()).all()
    z = (mean - g.double())[standard_error > 0] / standard_error[standard_error > 0]
    assert float((z ** 2).mean()) < 2.0  # aggregate: χ²/dof ≈ 1
    frequency = (out != 0).double().mean(0)
    frequency_error = (p * (1 - p) / draws).sqrt()
    assert ((frequency - p * (g != 0)).abs() <= 5 * frequency_error + 1e-6).all()


def test_mvue24_groups_along_the_last_dim_and_is_reproducible():
    g = torch.randn(64, 2, 32)
    a = mvue24(g, generator=torch.Generator().manual_seed(7))
    b = mvue24(g, generator=torch.Generator().manual_seed(7))
    c = mvue24(g, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a != 0).reshape(64, 2, 8, 4).sum(-1) == 2).all()
    transposed = torch.randn(32, 16).t()  # ∇Zᵀ as the GEMM passes it: a non-contiguous view
    assert ((mvue24(transposed) != 0).reshape(16, 8, 4).sum(-1) == 2).all()
    with pytest.raises(ValueError, match=r"\(4, 6\)"):
        mvue24(torch.randn(4, 6))


# --- flip rate ---------------------------------------------------------------------------


def test_flip_rate():
    old = torch.rand(6, 16) > 0.5
    new = old.clone()
    new[0, :3] = ~new[0, :3]
    assert flip_rate(old, new) == pytest.approx(3 / 96)
    assert flip_rate(old, old) == 0.0 and flip_rate(old, ~old) == 1.0
    assert flip_rate(torch.empty(0, 8, dtype=torch.bool), torch.empty(0, 8, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError, match="differ"):
        flip_rate(old, old.T)
