"""S-STE (Hu et al., NeurIPS'24): a continuous soft-threshold projection with a frozen scale.

Every forward uses W̃ = β·S(W), where S keeps the two largest |w| of each group of 4
shrunk by the group's second-smallest |w| (continuous in W, no stored mask, no decay).
β = ⟨W, S(W)⟩/⟨S(W), S(W)⟩ is computed once, right after initialisation, from the
gathered weight, kept as a persistent buffer (checkpointed, never recomputed on
resume). The backward is the identity STE: ∂L/∂W := ∂L/∂W̃, with no β or mask factor.
The mask parameter records the support of S(W) for flip-rate monitoring only.
"""

from __future__ import annotations

import torch

from sparsedist.config import sparsity as configs
from sparsedist.sparsity.layer import SparseLinear, straight_through
from sparsedist.sparsity.methods.base import SparsityMethod
from sparsedist.sparsity.product import Product
from sparsedist.sparsity.soft_threshold import scaled_soft_threshold, soft_threshold, soft_threshold_scale


def soft_threshold_weight(layer: SparseLinear) -> torch.Tensor:
    """β·S(W) in the forward (the Triton kernel on CUDA), identity in the backward."""
    return straight_through(layer.weight, lambda w: scaled_soft_threshold(w, layer.beta))


class SSTE(SparsityMethod):
    config = configs.SSTE
    transform = staticmethod(soft_threshold_weight)

    def product(self) -> Product:
        return Product(mvue=self.cfg.mvue)

    def extend(self, layer: SparseLinear) -> None:
        layer.register_buffer("beta", torch.ones((), dtype=torch.float32, device=layer.weight.device))

    @torch.no_grad()
    def start(self, training: bool = True) -> None:
        super().start(training)
        for layer in self.layers.values():
            layer.beta.fill_(soft_threshold_scale(self.backend.full_tensor(layer.weight)))

    def end(self, step: int) -> None:
        self.refresh()  # S(W) changes at every step; its support is monitored every step

    @torch.no_grad()
    def finalize(self) -> None:
        """Deliver the forward weights: W ← β·S(W), then β = 1 (S of a 2:4 weight is itself)."""
        for layer in self.layers.values():
            weight = self.backend.full_tensor(layer.weight)
            self.backend.set_full(layer.weight, layer.beta.float() * soft_threshold(weight))
            layer.beta.fill_(1.0)
        self.refresh()
