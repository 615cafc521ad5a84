"""S-STE's soft-threshold projection onto 2:4 weights, and its per-tensor scale β.

A weight is [out, in]; a group is 4 consecutive elements of one row (dim 1), so S(W) is
row-local and exact on any shard made of whole rows.
"""

from __future__ import annotations

import torch

from sparsedist.sparsity.masks import nm_mask


def soft_threshold(weight: torch.Tensor) -> torch.Tensor:
    """S(W): in each group the two largest |w| become sign(w)·(|w| − t), the other two 0.

    t is the group's second-smallest |w| (the larger of the two dropped). The kept pair is
    `nm_mask`'s, ties towards the lower index; a tie at the threshold gives 0 either way, so
    S is continuous in W. Computed in the weight's dtype.
    """
    keep = nm_mask(weight)  # also refuses weights without whole groups
    rows, cols = weight.shape
    keep = keep.reshape(rows, cols // 4, 4)
    grouped = weight.reshape(rows, cols // 4, 4)
    magnitude = grouped.abs()
    threshold = torch.where(keep, 0, magnitude).amax(-1, keepdim=True)
    return torch.where(keep, grouped.sign() * (magnitude - threshold), 0).reshape(rows, cols)


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
