"""S-STE's soft-threshold projection onto 2:4 weights, and its per-tensor scale β.

A weight is [out, in]; a group is 4 consecutive elements of one row (dim 1), so S(W) is
row-local and exact on any shard made of whole rows.
"""

from __future__ import annotations

import torch

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_kernel(weight: torch.Tensor) -> bool:
    """Whether `scaled_soft_threshold` runs the Triton kernel: CUDA tensors (tests force it on the CPU)."""
    return weight.is_cuda


def scaled_soft_threshold(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale·S(W), not differentiable: S-STE's forward weight, with `scale` its 0-dim β.

    On CUDA (fp32, bf16, fp16) one pass of `sparsedist_kernels.soft_threshold`, which reads β on
    the device and writes only the result; elsewhere `scale.to(W.dtype) * soft_threshold(W)`.
    Kept entries are the same; the values are equal bit for bit for an fp32 weight and β, else
    within one rounding to W's dtype (the kernel rounds once, the reference twice).
    """
    if _use_kernel(weight) and weight.dtype in _KERNEL_DTYPES:
        from sparsedist_kernels.soft_threshold import soft_threshold as soft_threshold_kernel

        return soft_threshold_kernel(weight, scale)
    return scale.to(weight.dtype) * soft_threshold(weight.detach())


def soft_threshold(weight: torch.Tensor) -> torch.Tensor:
    """S(W): in each group the two largest |w| become sign(w)·(|w| − t), the other two 0.

    t is the group's second-smallest |w| (the larger of the two dropped), so
    S(W) = sign(W)·max(|W| − t, 0): a tie at the threshold gives 0 whichever element is
    kept, and S is continuous in W. t comes from a 4-input min/max network, elementwise
    only (no sort). Computed in the weight's dtype; refuses weights without whole groups.
    """
    rows, cols = weight.shape
    if cols % 4:
        raise ValueError(f"soft_threshold: weight of shape {tuple(weight.shape)} has no whole groups of 4 along dim 1")
    grouped = weight.reshape(rows, cols // 4, 4)
    magnitude = grouped.abs()
    a, b, c, d = magnitude.unbind(-1)
    low = torch.maximum(torch.minimum(a, b), torch.minimum(c, d))
    high = torch.minimum(torch.maximum(a, b), torch.maximum(c, d))
    threshold = torch.minimum(low, high).unsqueeze(-1)
    return (grouped.sign() * (magnitude - threshold).clamp_min(0)).reshape(rows, cols)


def soft_threshold_scale_terms(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(⟨W, S(W)⟩, ⟨S(W), S(W)⟩) as float64 scalars, summed over this tensor's rows."""
    weight = weight.detach().to(torch.float64)
    projected = soft_threshold(weight)
    return (weight * projected).sum(), (projected * projected).sum()


def soft_threshold_scale(weight: torch.Tensor) -> float:
    """β = ⟨W, S(W)⟩ / ⟨S(W), S(W)⟩ of an unsharded weight (≈ 1.48 for a Gaussian init).

    Raises ValueError when S(W) = 0 (every group's top three |w| tie), where β is undefined.
    """
    inner, norm = soft_threshold_scale_terms(weight)
    if norm == 0:
        raise ValueError(f"soft_threshold_scale: S(W) is zero for the weight of shape {tuple(weight.shape)}")
    return float(inner / norm)
