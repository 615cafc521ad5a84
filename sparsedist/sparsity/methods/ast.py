"""AST (Huang et al., AAAI'25, "Pruning Large Language Models with Semi-Structural Adaptive Sparse Training").

Magnitude masks recomputed every 10 steps, forward M⊙W with a plain STE, and the annealed
SR-STE decay λ(t)(1−M)⊙W, λ(t) = λ_max·min(t/T₀, 1), inside the Adam moments as AST's
optimizer does it (u = m + λ(t)(1−M)⊙W; v from u²; see sparsity/adam.py). Distillation
from the dense model comes from the recipe's `distill` section. Optionally SLoRB: a dense
low-rank branch y += (x·Xᵀ)·Sᵀ with X the block indicator of k consecutive inputs
(trainable, as in the released runs) and S initialised to the mean of the pruned weights
of each block.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsedist.config import sparsity as configs
from sparsedist.errors import RecipeError
from sparsedist.sparsity.layer import SparseLinear
from sparsedist.sparsity.methods.moment import MomentAdamMethod
from sparsedist.sparsity.methods.ste import masked_ste_weight


class SLoRB(nn.Module):
    """Semi-structured low-rank bypass: y = (x·Xᵀ)·Sᵀ, rank in/k."""

    def __init__(self, in_features: int, out_features: int, k: int, device: torch.device):
        super().__init__()
        blocks = in_features // k
        indicator = torch.arange(in_features, device=device) // k == torch.arange(blocks, device=device)[:, None]
        self.x = nn.Parameter(indicator.float())  # [in/k, in]
        self.s = nn.Parameter(torch.zeros(out_features, blocks, device=device))  # [out, in/k]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(nn.functional.linear(inputs, self.x), self.s)


class AST(MomentAdamMethod):
    config = configs.AST
    transform = staticmethod(masked_ste_weight)

    def extend(self, layer: SparseLinear) -> None:
        if self.cfg.slorb:
            if layer.in_features % self.cfg.slorb_k:
                raise RecipeError(f"sparsity.slorb_k: {layer.in_features} inputs are not a multiple of "
                                 f"{self.cfg.slorb_k}")
            layer.branch = SLoRB(layer.in_features, layer.out_features, self.cfg.slorb_k, layer.weight.device)

    @torch.no_grad()
    def start(self, training: bool = True) -> None:
        super().start(training)
        if self.cfg.slorb:
            for layer in self.layers.values():
                weight = self.backend.full_tensor(layer.weight)
                pruned = (weight * ~self.store.full(layer)).reshape(weight.shape[0], -1, self.cfg.slorb_k)
                self.backend.set_full(layer.branch.s, pruned.mean(-1))

    @property
    def decay_warmup_steps(self) -> int:
        """T₀ in steps: `decay_warmup` itself, or its share of the run."""
        warmup = self.cfg.decay_warmup
        return max(1, round(warmup * self.total_steps)) if 0 < warmup < 1 else int(warmup)

    def decay_at(self, step: int) -> float:
        """λ(t) = λ_max·min(t/T₀, 1) at optimizer step `step` (t = step + 1)."""
        warmup = self.decay_warmup_steps
        return self.cfg.decay * (min((step + 1) / warmup, 1.0) if warmup else 1.0)

    def no_decay_parameters(self) -> set[int]:
        """SLoRB's indicator and scales are not weight-decayed."""
        return {id(p) for layer in self.layers.values() if layer.branch is not None
                for p in layer.branch.parameters()}

    def smoothed_moment(self, step: int, weights: list[torch.Tensor], momenta: list[torch.Tensor],
                        kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """u = m + λ(t)(1−M)⊙W, with (1−M)⊙W = W − W⊙M as in `pruned_values`."""
        pruned = torch._foreach_addcmul(weights, weights, kept, value=-1)
        kept.clear()
        return torch._foreach_add(momenta, pruned, alpha=self.decay_at(step))
