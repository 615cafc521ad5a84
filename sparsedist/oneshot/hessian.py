"""The layer-wise least-squares problem the reconstruction methods (SparseGPT, ALPS) solve."""

from __future__ import annotations

import torch


def conditioned_problem(weight: torch.Tensor, hessian: torch.Tensor,
                        percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, H) in float64, ready to factorise, as SparseGPT's reference prepares them.

    Dead inputs (H_jj == 0: feature j was always zero) get H_jj = 1 and W[:, j] = 0, which
    changes no output; then `percdamp`·mean(diag H) is added to the diagonal.
    """
    w = weight.detach().to(torch.float64).clone()
    h = hessian.to(weight.device, torch.float64).clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * h.diagonal().mean())
    return w, h
