"""Triton kernel of S-STE's scaled soft-threshold projection β·S(W) onto 2:4 weights.

The specification is `scale * sparsedist.sparsity.soft_threshold(weight)`: a group is 4
consecutive elements of one row of an [out, in] weight, its threshold t is the group's
second-smallest |w| from the same min/max network, and S(W) = sign(W)·max(|W| − t, 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_BLOCK_GROUPS = 1024


@triton.jit
def _soft_threshold_kernel(w_ptr, out_ptr, scale, groups, SCALE_IS_PTR: tl.constexpr, BLOCK_GROUPS: tl.constexpr):
    group = tl.program_id(0).to(tl.int64) * BLOCK_GROUPS + tl.arange(0, BLOCK_GROUPS)
    live = group < groups
    first = group * 4
    a = tl.load(w_ptr + first, mask=live).to(tl.float32)
    b = tl.load(w_ptr + first + 1, mask=live).to(tl.float32)
    c = tl.load(w_ptr + first + 2, mask=live).to(tl.float32)
    d = tl.load(w_ptr + first + 3, mask=live).to(tl.float32)
    ma, mb, mc, md = tl.abs(a), tl.abs(b), tl.abs(c), tl.abs(d)
    low = tl.maximum(tl.minimum(ma, mb), tl.minimum(mc, md))
    high = tl.minimum(tl.maximum(ma, mb), tl.maximum(mc, md))
    t = tl.minimum(low, high)
    s = tl.load(scale).to(tl.float32) if SCALE_IS_PTR else scale
    ty = out_ptr.dtype.element_ty
    ka = tl.maximum(ma - t, 0.0) * s
    kb = tl.maximum(mb - t, 0.0) * s
    kc = tl.maximum(mc - t, 0.0) * s
    kd = tl.maximum(md - t, 0.0) * s
    tl.store(out_ptr + first, tl.where(a < 0, -ka, ka).to(ty), mask=live)
    tl.store(out_ptr + first + 1, tl.where(b < 0, -kb, kb).to(ty), mask=live)
    tl.store(out_ptr + first + 2, tl.where(c < 0, -kc, kc).to(ty), mask=live)
    tl.store(out_ptr + first + 3, tl.where(d < 0, -kd, kd).to(ty), mask=live)


def soft_threshold(weight: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """scale·S(W) of a 2-D [out, in] weight (in % 4 == 0), same shape and dtype, not differentiable.

    The weight is float32, bfloat16 or float16. `scale` is a Python number or a 0-dim tensor
    (S-STE's β, read by the kernel: no host sync) of any of those dtypes or float64, used at its
    own precision. Computed in float32 and rounded once to the weight's dtype. Which entries are
    kept is exact (the reference's comparisons); the values equal the reference's bit for bit at
    scale 1 in every dtype, and at any scale for a float32 weight with a Python or float32
    scale; otherwise they are within one rounding of the reference's, which rounds S(W) (and a
    tensor scale) to the weight's dtype before multiplying.
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ValueError(f"soft_threshold: weight of shape {tuple(weight.shape)} is not 2-D with whole groups of 4 "
                         "along dim 1")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"soft_threshold: unsupported dtype {weight.dtype}")
    scale_is_ptr = isinstance(scale, torch.Tensor)
    if scale_is_ptr:
        if scale.dim() != 0:
            raise ValueError(f"soft_threshold: scale must be a number or a 0-dim tensor, not {tuple(scale.shape)}")
        if scale.dtype not in _SCALE_DTYPES:
            raise ValueError(f"soft_threshold: scale tensor of dtype {scale.dtype} is not one of {_SCALE_DTYPES}")
        scale = scale.detach().to(weight.device)
    else:
        scale = float(scale)
    weight = weight.detach().contiguous()
    out = torch.empty_like(weight)
    groups = weight.numel() // 4
    grid = (triton.cdiv(groups, _BLOCK_GROUPS),)
    _soft_threshold_kernel[grid](weight, out, scale, groups, SCALE_IS_PTR=scale_is_ptr,
                                 BLOCK_GROUPS=_BLOCK_GROUPS)
    return out
