"""Triton kernel of MVUE24, the unbiased 2:4 sparsification of gradients (S-STE).

The specification is `sparsedist.sparsity.mvue24`: a group is 4 consecutive elements of the
last dim; two entries are drawn without replacement ∝ |g| by an exponential race and divided by
their inclusion probability (`mvue24_inclusion_probabilities`, evaluated here by the same
formula and guards). The draw uses Triton's counter-based Philox instead of torch's generator,
so draws match the reference in law, not sample for sample.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_BLOCK_GROUPS = 1024


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _beats(key_j, key_i, j_before_i: tl.constexpr):
    """1 where entry j ranks above entry i: larger key, ties towards the lower index."""
    if j_before_i:
        return (key_j >= key_i).to(tl.int32)
    return (key_j > key_i).to(tl.int32)


@triton.jit
def _keep(g, p, rank, ty):
    """g/p for an entry among the group's two highest ranks, else 0 (a drawn zero has p = 0 and stays 0)."""
    return tl.where(rank < 2, g / tl.where(p > 0, p, 1.0), 0.0).to(ty)


@triton.jit
def _mvue24_kernel(g_ptr, out_ptr, groups, seed, offset, COMPUTE: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    group = tl.program_id(0).to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    live = group < groups
    first = group * 4
    g0 = tl.load(g_ptr + first, mask=live, other=0.0).to(COMPUTE)
    g1 = tl.load(g_ptr + first + 1, mask=live, other=0.0).to(COMPUTE)
    g2 = tl.load(g_ptr + first + 2, mask=live, other=0.0).to(COMPUTE)
    g3 = tl.load(g_ptr + first + 3, mask=live, other=0.0).to(COMPUTE)
    m0, m1, m2, m3 = tl.abs(g0), tl.abs(g1), tl.abs(g2), tl.abs(g3)

    # Inclusion probabilities, as mvue24_inclusion_probabilities: sums of the other three
    # entries in the reference's order, zero denominators replaced by 1.
    total = m0 + m1 + m2 + m3
    total = tl.where(total > 0, total, 1.0)
    rest0 = m3 + m2 + m1
    rest1 = m0 + m3 + m2
    rest2 = m1 + m0 + m3
    rest3 = m2 + m1 + m0
    q0 = m0 / tl.where(rest0 > 0, rest0, 1.0)
    q1 = m1 / tl.where(rest1 > 0, rest1, 1.0)
    q2 = m2 / tl.where(rest2 > 0, rest2, 1.0)
    q3 = m3 / tl.where(rest3 > 0, rest3, 1.0)
    p0 = tl.minimum(m0 / total * (1 + (q3 + q2 + q1)), 1.0)
    p1 = tl.minimum(m1 / total * (1 + (q0 + q3 + q2)), 1.0)
    p2 = tl.minimum(m2 / total * (1 + (q1 + q0 + q3)), 1.0)
    p3 = tl.minimum(m3 / total * (1 + (q2 + q1 + q0)), 1.0)
    nz0, nz1, nz2, nz3 = m0 > 0, m1 > 0, m2 > 0, m3 > 0
    few = (nz0.to(tl.int32) + nz1.to(tl.int32) + nz2.to(tl.int32) + nz3.to(tl.int32)) <= 2
    p0 = tl.where(few, nz0.to(COMPUTE), p0)
    p1 = tl.where(few, nz1.to(COMPUTE), p1)
    p2 = tl.where(few, nz2.to(COMPUTE), p2)
    p3 = tl.where(few, nz3.to(COMPUTE), p3)

    # Exponential race: keys |g_i|/E_i with E_i = -log(1 - U_i); zeros get -1 so they rank
    # below every nonzero even when a key underflows to 0.
    u0, u1, u2, u3 = tl.rand4x(seed, offset + group)
    k0 = tl.where(nz0, m0 / -tl.log(1 - u0.to(COMPUTE)), -1.0)
    k1 = tl.where(nz1, m1 / -tl.log(1 - u1.to(COMPUTE)), -1.0)
    k2 = tl.where(nz2, m2 / -tl.log(1 - u2.to(COMPUTE)), -1.0)
    k3 = tl.where(nz3, m3 / -tl.log(1 - u3.to(COMPUTE)), -1.0)
    r0 = _beats(k1, k0, False) + _beats(k2, k0, False) + _beats(k3, k0, False)
    r1 = _beats(k0, k1, True) + _beats(k2, k1, False) + _beats(k3, k1, False)
    r2 = _beats(k0, k2, True) + _beats(k1, k2, True) + _beats(k3, k2, False)
    r3 = _beats(k0, k3, True) + _beats(k1, k3, True) + _beats(k2, k3, True)

    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + first, _keep(g0, p0, r0, ty), mask=live)
    tl.store(out_ptr + first + 1, _keep(g1, p1, r1, ty), mask=live)
    tl.store(out_ptr + first + 2, _keep(g2, p2, r2, ty), mask=live)
    tl.store(out_ptr + first + 3, _keep(g3, p3, r3, ty), mask=live)


def mvue24(grad: torch.Tensor, seed: int, offset: int = 0) -> torch.Tensor:
    """Unbiased 2:4 estimate of `grad` (E[mvue24(g)] = g), same shape and dtype, not differentiable.

    Groups of 4 consecutive elements of the last dim (a multiple of 4). Each group keeps two
    entries drawn without replacement ∝ |g|, divided by their inclusion probability; groups with
    at most two nonzeros come back unchanged. Group k of the tensor (row-major, counting groups)
    draws its 4 uniforms from `tl.rand4x(seed, offset + k)`, so the result is a deterministic
    function of (grad, seed, offset), and a shard of whole groups starting at group s, called
    with offset + s, draws what the whole tensor draws there. `seed` and `offset` are
    non-negative integers below 2**63. Computed in float32 (float64 for a float64 gradient);
    float32, bfloat16, float16 and float64 are accepted.
    """
    if grad.dim() == 0 or grad.shape[-1] % 4:
        raise ValueError(f"mvue24: gradient of shape {tuple(grad.shape)} has no whole groups of 4 along its last dim")
    if grad.dtype not in _DTYPES:
        raise ValueError(f"mvue24: unsupported dtype {grad.dtype}")
    for name, value in (("seed", seed), ("offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
            raise ValueError(f"mvue24: {name} must be an integer in [0, 2**63), got {value!r}")
    grad = grad.detach().contiguous()
    out = torch.empty_like(grad)
    groups = grad.numel() // 4
    grid = (triton.cdiv(groups, _BLOCK_GROUPS),)
    _mvue24_kernel[grid](grad, out, groups, seed, offset, COMPUTE=_compute_dtype(grad.dtype),
                         BLOCK_GROUPS=_BLOCK_GROUPS)
    return out
