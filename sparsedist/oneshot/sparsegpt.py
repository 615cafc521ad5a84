"""SparseGPT for N:M sparsity (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot")."""

from __future__ import annotations

import torch

from sparsedist.oneshot.hessian import conditioned_problem
from sparsedist.sparsity.masks import nm_mask


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, *, percdamp: float = 0.01,
              blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, mask) by row-wise Optimal Brain Surgeon with lazy block updates.

    `hessian` is XᵀX up to a positive factor (the result does not depend on it), conditioned by
    `conditioned_problem`. With U the upper Cholesky factor of H⁻¹, columns are processed left
    to right: at the start of every group of `m` columns the `n` entries of each row with the
    largest OBS saliency w_j²/U_jj² are kept (U_jj² = [H_F⁻¹]_jj, F the columns not yet
    processed); pruning column j by error e = (w_j − ŵ_j)/U_jj moves the remaining columns by
    −e·U_j,j: (the OBS update). Updates within a block of `blocksize` columns are applied at
    once, later columns receive them block by block; the result equals the unblocked algorithm.
    Computed in float64; returned in the weight's dtype.
    """
    if blocksize % m:
        raise ValueError(f"sparsegpt: blocksize {blocksize} is not a multiple of m = {m}")
    w, h = conditioned_problem(weight, hessian, percdamp)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    mask = torch.zeros_like(w, dtype=torch.bool)
    columns = w.shape[1]
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        errors = _prune_block(w[:, start:end], u[start:end, start:end], mask[:, start:end], n, m)
        w[:, end:] -= errors @ u[start:end, end:]
    return (w * mask).to(weight.dtype), mask


def _prune_block(block: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune one block of columns in place (its mask too); returns the scaled errors [rows, block columns]."""
    errors = torch.zeros_like(block)
    diagonal = u.diagonal()
    for i in range(block.shape[1]):
        if i % m == 0:
            saliency = block[:, i : i + m].square() / diagonal[i : i + m].square()
            mask[:, i : i + m] = nm_mask(saliency, n, m)
        column = block[:, i].clone()
        kept = column * mask[:, i]
        errors[:, i] = (column - kept) / u[i, i]
        block[:, i:] -= errors[:, i : i + 1] * u[i : i + 1, i:]
        block[:, i] = kept
    return errors
