"""Score-based one-shot N:M pruning: magnitude and Wanda. Neither updates the kept weights."""

from __future__ import annotations

import torch

from sparsedist.sparsity.masks import nm_mask


def magnitude(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, mask): keep the `n` largest |W_ij| of every group of `m` inputs."""
    mask = nm_mask(weight, n, m)
    return weight * mask, mask


def wanda(weight: torch.Tensor, feature_norms: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, mask) by Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs").

    Score S_ij = |W_ij|·‖X_j‖₂, with ‖X_j‖₂ the L2 norm of input feature j over all calibration
    tokens; the `n` largest scores of every group of `m` inputs of a row are kept.
    """
    score = weight.detach().abs().to(torch.float64) * feature_norms.to(weight.device, torch.float64)
    mask = nm_mask(score, n, m)
    return weight * mask, mask
