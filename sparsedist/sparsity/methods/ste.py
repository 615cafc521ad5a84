"""Magnitude N:M masks trained with the straight-through estimator, plain (STE) or with SR-STE's decay."""

from __future__ import annotations

import torch

from sparsedist.sparsity.layer import SparseLinear, straight_through
from sparsedist.sparsity.masks import unpack_mask
from sparsedist.sparsity.methods.base import SparsityMethod


def masked_ste_weight(layer: SparseLinear) -> torch.Tensor:
    """M⊙W in the forward, identity in the backward."""
    return straight_through(layer.weight, lambda w: w * unpack_mask(layer.mask, w.shape[1]).to(w.dtype))


class STE(SparsityMethod):
    """Forward with M⊙W, gradient straight through to the dense W; masks refreshed from |W|."""

    name = "ste"
    transform = staticmethod(masked_ste_weight)


class SRSTE(STE):
    """SR-STE (Zhou et al. 2021): STE plus the masked decay λ(1−M)⊙W on the gradient.

    The decay is added once per optimizer step, on each rank's piece, after the gradients
    were reduced across ranks and clipped: added before a sum over ranks it would be
    multiplied by the world size, and it does not count towards the clipped norm.
    """

    name = "srste"

    def masks_in_update(self, step: int) -> bool:
        return True

    def gradient_term(self, step: int, tensor: torch.Tensor) -> None:
        add_masked_decay(self, tensor, self.cfg.decay)


@torch.no_grad()
def add_masked_decay(method: SparsityMethod, tensor: torch.Tensor, decay: float) -> None:
    """grad += decay·(1−M)⊙W on this rank's values of one optimizer tensor (SR-STE, ICML'24)."""
    mask = method.update_mask(tensor)
    if mask is not None and tensor.grad is not None:
        local = method.backend.local
        local(tensor.grad).add_(local(tensor) * ~mask, alpha=decay)
