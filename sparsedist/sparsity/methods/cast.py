"""CAST (continuous adaptive sparse trainer, arXiv 2509.25996).

The forward stays dense during training; only the optimizer uses the mask (progressive
sparsification). AdamS (sparsity/adam.py) keeps the raw gradient EMA μ and builds
μ̃ = (1−α_t)μ + α_t·λ·sign(W) on pruned slots (μ̃ = μ on kept ones), with α_t = t/T; the
second moment and the step come from μ̃, which is never written back. Masks are
recomputed every T₁ = 10 steps, before that step's update. Learnable weight scaling:
A ∈ R^{out×n} (init 1) multiplies each contiguous segment of in/n inputs of a row; with
4 | in/n a 2:4 group shares one scale, so scaling never changes which weights are kept.
Self-distillation comes from the recipe's `distill` section. At the end A is folded into W
and W is hard-pruned with the last masks.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsedist.config import sparsity as configs
from sparsedist.errors import RecipeError
from sparsedist.sparsity.layer import SparseLinear
from sparsedist.sparsity.methods.moment import MomentAdamMethod


def expanded_scale(layer: SparseLinear, scale: torch.Tensor) -> torch.Tensor:
    """[rows, n] segment scales as a [rows, in] factor."""
    return scale.repeat_interleave(layer.in_features // scale.shape[1], dim=1)


def scaled_weight(layer: SparseLinear) -> torch.Tensor:
    """A⊙W, dense: CAST trains without masking the forward. Each row viewed as n segments times its n
    scales, broadcast (the expanded [rows, in] factor is never built)."""
    weight, scale = layer.weight, layer.scale.to(layer.weight.dtype)
    return (weight.view(weight.shape[0], scale.shape[1], -1) * scale.unsqueeze(-1)).view(weight.shape)


def pruned_scaled_weight(layer: SparseLinear) -> torch.Tensor:
    """M⊙A⊙W: what the final hard prune would deliver with the current masks."""
    return scaled_weight(layer) * layer.dense_mask(dtype=layer.weight.dtype)


class CAST(MomentAdamMethod):
    config = configs.CAST
    transform = staticmethod(scaled_weight)
    delivered_transform = staticmethod(pruned_scaled_weight)

    def extend(self, layer: SparseLinear) -> None:
        segments = self.cfg.scale_segments
        if layer.in_features % segments or (layer.in_features // segments) % self.cfg.m:
            raise RecipeError(f"sparsity.scale_segments: {layer.in_features} inputs do not split into {segments} "
                             f"segments of whole groups of {self.cfg.m}")
        layer.scale = nn.Parameter(torch.ones(layer.out_features, segments, device=layer.weight.device))

    def alpha_at(self, step: int) -> float:
        """α_t = t/T at optimizer step `step` (t = step + 1)."""
        return (step + 1) / self.total_steps

    def begin(self, step: int) -> None:
        """Masks are refreshed before the update of step t = step + 1 whenever T₁ divides t (the paper's
        1-based t, as in α_t: steps 9, 19, … here); the forward is dense, so before the forward passes is
        the same as right before the update."""
        if (step + 1) % self.cfg.refresh_interval == 0:
            self.refresh()

    def end(self, step: int) -> None:
        """Masks are refreshed before updates (`begin`), not after."""

    def no_decay_parameters(self) -> set[int]:
        return {id(layer.scale) for layer in self.layers.values()}

    def smoothed_moment(self, step: int, weights: list[torch.Tensor], momenta: list[torch.Tensor],
                        kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """μ̃ = μ on kept slots, (1−α_t)μ + α_t·λ·sign(W) on pruned ones, as μ + α_t·(1−M)⊙(λ·sign(W) − μ):
        exactly μ where M = 1 (d − d·1 = 0)."""
        toward = torch._foreach_sign(weights)
        torch._foreach_mul_(toward, self.cfg.decay)
        torch._foreach_sub_(toward, momenta)
        torch._foreach_addcmul_(toward, toward, kept, value=-1)
        kept.clear()
        return torch._foreach_add(momenta, toward, alpha=self.alpha_at(step))

    @torch.no_grad()
    def finalize(self) -> None:
        """Scales folded into W, hard prune with the masks AdamS used last (the last refresh: the weights
        it decayed are the ones pruned; a recompute from the final W could swap near-ties)."""
        for layer in self.layers.values():
            weight, scale = self.backend.full_tensor(layer.weight), self.backend.full_tensor(layer.scale)
            self.backend.set_full(layer.weight, weight * expanded_scale(layer, scale) * self.store.full(layer))
            self.backend.set_full(layer.scale, torch.ones_like(scale))
