"""ICML'24 (Hu et al., "Accelerating Transformer Pre-training with 2:4 Sparsity").

Transposable 2:4 masks (M and Mᵀ both 2:4, so the input-gradient product can also run
sparse) recomputed every 40 steps; the masked decay α(1−M)⊙W added to the fp32 gradient
after clipping; optionally the MVUE weight gradient; and the last fraction of training
dense (plain F.linear on the full W), so the delivered model is dense.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from sparsedist.config import sparsity as configs
from sparsedist.sparsity.layer import dense_weight
from sparsedist.sparsity.methods.base import SparsityMethod
from sparsedist.sparsity.methods.ste import add_masked_decay, masked_ste_weight
from sparsedist.sparsity.product import Product
from sparsedist.sparsity.transposable import transposable_mask


class SparsePretrain(SparsityMethod):
    config = configs.SparsePretrain
    transform = staticmethod(masked_ste_weight)
    group_local = False  # 4×4 blocks: a shard may cut them, so decide on the gathered weight

    @property
    def delivers_sparse(self) -> bool:
        return self.dense_from >= self.total_steps

    @property
    def dense_from(self) -> int:
        """First step of the dense fine-tuning phase (total steps when there is none)."""
        return round(self.total_steps * (1 - self.cfg.dense_finetune_fraction))

    def product(self) -> Product:
        return Product(transposable=True, mvue=self.cfg.mvue)

    def decide(self, weight: torch.Tensor) -> torch.Tensor:
        return transposable_mask(weight)

    def begin(self, step: int) -> None:
        if step >= self.dense_from:
            for layer in self.layers.values():
                layer.transform = dense_weight
                layer.product = replace(layer.product, semi_structured=False, mvue=False)

    def update(self, step: int, tensors: list[torch.Tensor]) -> None:
        if step < self.dense_from:
            for tensor in tensors:
                add_masked_decay(self.store, tensor, self.cfg.decay)

    def end(self, step: int) -> None:
        if step + 1 < self.dense_from:
            super().end(step)

    def finalize(self) -> None:
        """With dense fine-tuning the model is dense by design; without, it is hard-pruned."""
        if self.delivers_sparse:
            super().finalize()
