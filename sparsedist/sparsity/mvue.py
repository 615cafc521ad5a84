"""MVUE24: an unbiased 2:4 sparsification of gradients (ICML'24, S-STE).

A group is 4 consecutive elements along the last dim. For the weight gradient the caller
passes ∇Zᵀ [out, tokens], so a group is 4 tokens of one output channel.
"""

from __future__ import annotations

import torch

from sparsedist.sparsity.masks import nm_mask


def _grouped(grad: torch.Tensor) -> torch.Tensor:
    """`grad` detached as [..., groups, 4] in float32, or float64 for a float64 input."""
    if grad.dim() == 0 or grad.shape[-1] % 4:
        raise ValueError(f"mvue24: gradient of shape {tuple(grad.shape)} has no whole groups of 4 along its last dim")
    dtype = torch.promote_types(grad.dtype, torch.float32)
    return grad.detach().to(dtype).reshape(*grad.shape[:-1], grad.shape[-1] // 4, 4)


def _others(x: torch.Tensor) -> torch.Tensor:
    """Sum of the other three entries of each group (no cancellation, unlike sum − x)."""
    return x.roll(1, -1) + x.roll(2, -1) + x.roll(3, -1)


def mvue24_inclusion_probabilities(grad: torch.Tensor) -> torch.Tensor:
    """Probability that `mvue24` keeps each entry, same shape, float32 (float64 for float64 input).

    p_i = t_i + |g_i|·Σ_{j≠i} t_j/(S − |g_j|) with t_i = |g_i|/S and S = Σ|g| over the group:
    the chance of being drawn first or second when two are drawn ∝ |g| without replacement.
    It is evaluated as t_i·(1 + Σ_{j≠i} |g_j|/(S − |g_j|)), each S − |g_j| summed from the other
    three entries, so a dominant entry causes no cancellation. Zero entries get 0. In a group
    with at most two nonzeros each nonzero gets exactly 1, the formula's value there
    ((|g_1| + |g_2|)/S for two, 1 + 0 for one) without its rounding; those groups' zero
    denominators are guarded, so no inf or NaN arises. Each group sums to min(2, #nonzeros).
    """
    magnitude = _grouped(grad).abs()
    total = magnitude.sum(-1, keepdim=True)
    rest = _others(magnitude)
    share = magnitude / total.where(total > 0, 1)
    p = (share * (1 + _others(magnitude / rest.where(rest > 0, 1)))).clamp_(max=1)  # rounding can pass 1
    nonzero = magnitude > 0
    p = torch.where(nonzero.sum(-1, keepdim=True) <= 2, nonzero.to(p.dtype), p)
    return p.reshape(grad.shape)


def mvue24(grad: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased 2:4 estimate of `grad` (E[mvue24(g)] = g), same shape and dtype.

    In each group two entries are drawn without replacement ∝ |g| and divided by their
    inclusion probability (`mvue24_inclusion_probabilities`); the other two become 0, and
    groups with at most two nonzeros come back unchanged. The draw is an exponential race,
    keeping the two largest |g_i|/E_i with E_i ~ Exp(1) i.i.d. (ties towards the lower index),
    which has the law of drawing one entry ∝ |g| and then one of the rest ∝ |g|. `generator`
    (on grad's device; default: torch's global one) makes it reproducible. Computed in
    float32, or float64 for a float64 input.
    """
    p = mvue24_inclusion_probabilities(grad)
    g = grad.detach().to(p.dtype)
    clock = torch.rand(g.shape, generator=generator, dtype=g.dtype, device=g.device).neg_().log1p_().neg_()
    key = g.abs() / clock.clamp_min(torch.finfo(g.dtype).tiny)  # 0 exactly for zeros, > 0 otherwise
    drawn = nm_mask(key.reshape(-1, 4)).reshape(g.shape)
    return torch.where(drawn, g / p.where(p > 0, 1), 0).to(grad.dtype)  # a drawn zero (p = 0) stays 0
