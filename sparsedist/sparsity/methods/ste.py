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

    The decay is added once per optimizer step, on each rank's local rows, after the
    gradients were reduced across ranks and clipped: added before a sum over ranks it
    would be multiplied by the world size, and it does not count towards the clipped norm.
    """

    name = "srste"

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        add_masked_decay(self, self.cfg.decay)


def add_masked_decay(method: SparsityMethod, decay: float) -> None:
    """grad += decay·(1−M)⊙W on every owned layer's local rows (SR-STE, ICML'24)."""
    for layer, weight, mask in method.local_pieces():
        if layer.weight.grad is not None:
            method.backend.local(layer.weight.grad).add_(weight * ~mask, alpha=decay)
