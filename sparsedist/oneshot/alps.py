"""ALPS for N:M sparsity (Meng et al. 2024, "ALPS: Improved Optimization for Highly Sparse One-Shot
Pruning for Large Language Models").

The layer problem is min ‖XWᵀ − XŴᵀ‖²_F over N:M weights Ŵ, i.e. row by row
min (ŵ − w)ᵀ H (ŵ − w) with H = XᵀX. ADMM splits Ŵ into an unconstrained copy D and an N:M
copy Z with scaled dual V and penalty ρ:

    D ← (WH + ρ(Z − V))(H + ρI)⁻¹      (least squares; one eigendecomposition of H serves every ρ)
    Z ← Π_NM(D + V)                     (keep the n largest |·| of every group of m)
    V ← V + D − Z

ρ starts at `rho`·mean(diag H) and is multiplied by `rho_growth` every `rho_interval` iterations
(V rescaled accordingly), which drives D and Z together and freezes the support; ADMM stops once
the support has not changed for a whole interval and ‖D − Z‖ ≤ `tolerance`·‖Z‖. The kept
weights are then refitted on that support by preconditioned conjugate gradients.
"""

from __future__ import annotations

from typing import Literal

import torch

from sparsedist.oneshot.hessian import conditioned_problem
from sparsedist.sparsity.masks import nm_mask


def alps(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, *, init: Literal["wanda", "magnitude"] = "wanda",
         percdamp: float = 0.01, rho: float = 0.1, rho_growth: float = 1.3, rho_interval: int = 3,
         max_iters: int = 300, tolerance: float = 1e-4, refit_iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, mask): ADMM for the support, then a PCG refit of the kept weights.

    `hessian` is XᵀX up to a positive factor, conditioned like SparseGPT's (`percdamp`, dead
    inputs). Computed in float64; returned in the weight's dtype.
    """
    w, h = conditioned_problem(weight, hessian, percdamp)
    start = initial_mask(w, h, init, n, m)
    z, mask = admm_support(w, h, start, n, m, rho=rho, rho_growth=rho_growth, rho_interval=rho_interval,
                           max_iters=max_iters, tolerance=tolerance)
    refit = refit_on_support(w, h, mask, z, refit_iters)
    return refit.to(weight.dtype), mask


def initial_mask(weight: torch.Tensor, hessian: torch.Tensor, init: Literal["wanda", "magnitude"],
                 n: int, m: int) -> torch.Tensor:
    """The support ADMM starts from: Wanda's (|W_ij|·sqrt(H_jj)) or magnitude's."""
    if init == "wanda":
        return nm_mask(weight.abs() * hessian.diagonal().sqrt(), n, m)
    if init == "magnitude":
        return nm_mask(weight, n, m)
    raise ValueError(f"alps: init must be 'wanda' or 'magnitude', got {init!r}")


def admm_support(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, n: int, m: int, *,
                 rho: float, rho_growth: float, rho_interval: int, max_iters: int,
                 tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z, its N:M mask) after ADMM from the support `mask` (see the module docstring).

    Iterates in float32: the iterations only have to find the support (the float64 refit then
    solves for the values), and float32 makes them several times cheaper on the CPU.
    """
    eigenvalues, eigenvectors = (t.to(torch.float32) for t in torch.linalg.eigh(hessian))
    weight_hessian = (weight @ hessian).to(torch.float32)
    penalty = rho * float(hessian.diagonal().mean())
    weight = weight.to(torch.float32)
    z = weight * mask
    dual = torch.zeros_like(weight)
    checked = mask
    for iteration in range(1, max_iters + 1):
        rhs = weight_hessian + penalty * (z - dual)
        d = ((rhs @ eigenvectors) / (eigenvalues + penalty)) @ eigenvectors.T
        shifted = d + dual
        mask = nm_mask(shifted, n, m)
        z = shifted * mask
        dual = shifted - z
        if iteration % rho_interval == 0:
            if torch.equal(mask, checked) and torch.linalg.norm(d - z) <= tolerance * torch.linalg.norm(z):
                break
            checked = mask
            penalty *= rho_growth
            dual /= rho_growth
    return z, mask


def refit_on_support(weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, start: torch.Tensor,
                     iters: int) -> torch.Tensor:
    """The least-squares weights on a fixed support, by Jacobi-preconditioned conjugate gradients.

    Solves, for every row r at once, min (x − w_r)ᵀ H (x − w_r) over x zero outside the row's
    support S_r, i.e. H_SS x_S = (H w_r)_S, starting from `start`; at most `iters` iterations,
    fewer once every row's residual has vanished.
    """
    def restricted(x: torch.Tensor) -> torch.Tensor:
        return (x @ hessian) * mask

    inverse_diagonal = 1.0 / hessian.diagonal()
    x = start.to(weight.dtype) * mask
    residual = restricted(weight - x)
    preconditioned = residual * inverse_diagonal
    direction = preconditioned.clone()
    rz = (residual * preconditioned).sum(1)
    floor = 1e-20 * rz.max().clamp_min(torch.finfo(rz.dtype).tiny)
    for _ in range(iters):
        if rz.max() <= floor:
            break
        product = restricted(direction)
        curvature = (direction * product).sum(1)
        step = torch.where(curvature > 0, rz / curvature, 0.0)
        x += step[:, None] * direction
        residual -= step[:, None] * product
        preconditioned = residual * inverse_diagonal
        rz_next = (residual * preconditioned).sum(1)
        direction = preconditioned + torch.where(rz > 0, rz_next / rz, 0.0)[:, None] * direction
        rz = rz_next
    return x
