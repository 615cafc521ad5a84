"""Magnitude N:M masks trained with the straight-through estimator, plain (STE) or with SR-STE's decay."""

from __future__ import annotations

import torch

from sparsedist.config import sparsity as configs
from sparsedist.sparsity.adam import CHUNK
from sparsedist.sparsity.layer import SparseLinear, straight_through
from sparsedist.sparsity.masks import pruned_values
from sparsedist.sparsity.methods.base import SparsityMethod
from sparsedist.sparsity.store import MaskStore


def masked_ste_weight(layer: SparseLinear) -> torch.Tensor:
    """M⊙W in the forward, identity in the backward."""
    return straight_through(layer.weight, lambda w: w * layer.dense_mask(dtype=w.dtype))


class STE(SparsityMethod):
    """Forward with M⊙W, gradient straight through to the dense W; masks refreshed from |W|."""

    config = configs.STE
    transform = staticmethod(masked_ste_weight)


class SRSTE(STE):
    """SR-STE (Zhou et al. 2021): STE plus the masked decay λ(1−M)⊙W on the gradient.

    The decay is added once per optimizer step, on each rank's piece, after the gradients
    were reduced across ranks and clipped: added before a sum over ranks it would be
    multiplied by the world size, and it does not count towards the clipped norm.
    """

    config = configs.SRSTE

    def update(self, step: int, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            add_masked_decay(self.store, tensor, self.cfg.decay)


@torch.no_grad()
def add_masked_decay(store: MaskStore, tensor: torch.Tensor, decay: float) -> None:
    """grad += decay·(1−M)⊙W on this rank's values of one optimizer tensor (SR-STE, ICML'24)."""
    if tensor.grad is None:
        return
    weight, grad = store.backend.local(tensor).view(-1), store.backend.local(tensor.grad).view(-1)
    for start in range(0, weight.numel(), CHUNK):
        part = slice(start, start + CHUNK)
        kept = store.update_mask(tensor, part, weight.dtype)
        if kept is not None:
            grad[part].add_(pruned_values(weight[part], kept, out=kept), alpha=decay)
