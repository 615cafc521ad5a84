"""Magnitude N:M masks trained with the straight-through estimator, plain (STE) or with SR-STE's decay."""

from __future__ import annotations

import torch

from sparsedist.config.schema import SparsityConfig
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.masks import unpack_mask
from sparsedist.sparsity.methods.base import SparsityMethod


class _MaskedSTE(torch.autograd.Function):
    """Forward M⊙W; backward passes the gradient to the dense W unchanged."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return weight * unpack_mask(bits, weight.shape[1]).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def masked_ste_weight(weight: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """M⊙W in the forward, identity in the backward."""
    return _MaskedSTE.apply(weight, bits)


class STE(SparsityMethod):
    """Forward with M⊙W, gradient straight through to the dense W; masks refreshed from |W|."""

    name = "ste"
    transform = staticmethod(masked_ste_weight)


class SRSTE(STE):
    """SR-STE (Zhou et al. 2021): STE plus the masked decay λ(1−M)⊙W on the gradient.

    The decay is added once per optimizer step, on each rank's local rows, after the
    gradients were reduced across ranks and clipped: added before a sum over ranks it
    would be multiplied by the world size, and it does not count towards the clipped norm.
    """

    name = "srste"
    default_decay = 2e-4

    def __init__(self, cfg: SparsityConfig, backend: ParallelBackend):
        super().__init__(cfg, backend)
        self.decay = self.default_decay if cfg.decay is None else cfg.decay

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        for layer, weight, mask in self.local_pieces():
            if layer.weight.grad is None:
                continue
            grad = self.backend.local(layer.weight.grad)
            grad.add_(weight * ~mask, alpha=self.decay)
