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

from typing import Any

import torch
from torch import nn

from sparsedist.config import sparsity as configs
from sparsedist.config.schema import OptimConfig
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decay: float | None = None if self.cfg.decay == "auto" else self.cfg.decay
        """λ; None until `decay: auto` has measured it (0 is used meanwhile)."""
        self._pruned_moment: torch.Tensor | None = None  # Σ|μ| and the count over pruned slots, while measuring

    def make_optimizer(self, groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
        self._beta1 = cfg.betas[0]
        return super().make_optimizer(groups, cfg)

    def host_state(self) -> dict[str, Any]:
        return {"decay": self.decay} if self.cfg.decay == "auto" else {}

    def load_host_state(self, state: dict[str, Any]) -> None:
        if self.cfg.decay == "auto":
            self.decay = state.get("decay")

    def metrics(self) -> dict[str, float]:
        return super().metrics() | ({} if self.decay is None else {"decay": self.decay})

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
        """Masks are refreshed before updates (`begin`), not after. With `decay: auto`, after update
        `decay_auto_steps` λ is set to factor × the mean bias-corrected |μ| over pruned slots (one read-back)."""
        if self._measuring(step):  # every rank: the sums are reduced even where a rank held no pruned slot
            local = self._pruned_moment
            if local is None:
                local = torch.zeros(2, dtype=torch.float64, device=self.backend.runtime.device)
            total, count = self.backend.sum_over_ranks(local).tolist()
            self._pruned_moment = None
            if count:  # else the update was skipped (non-finite gradients): measure the next one
                self.decay = self.cfg.decay_auto_factor * total / count / (1 - self._beta1 ** (step + 1))

    def _measuring(self, step: int) -> bool:
        """Whether update `step` sets λ: the first at or after `decay_auto_steps` while λ is unknown."""
        return self.decay is None and step + 1 >= self.cfg.decay_auto_steps

    def no_decay_parameters(self) -> set[int]:
        return {id(layer.scale) for layer in self.layers.values()}

    def smoothed_moment(self, step: int, weights: list[torch.Tensor], momenta: list[torch.Tensor],
                        kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """μ̃ = μ on kept slots, (1−α_t)μ + α_t·λ·sign(W) on pruned ones, as μ + α_t·(1−M)⊙(λ·sign(W) − μ):
        exactly μ where M = 1 (d − d·1 = 0)."""
        if self._measuring(step):
            self._measure(momenta, kept)
        toward = torch._foreach_sign(weights)
        torch._foreach_mul_(toward, self.decay or 0.0)
        torch._foreach_sub_(toward, momenta)
        torch._foreach_addcmul_(toward, toward, kept, value=-1)
        kept.clear()
        return torch._foreach_add(momenta, toward, alpha=self.alpha_at(step))

    def _measure(self, momenta: list[torch.Tensor], kept: list[torch.Tensor]) -> None:
        """Add Σ|μ|·(1−M) and Σ(1−M) of a batch of pieces to this step's sums (on the device)."""
        if self._pruned_moment is None:
            self._pruned_moment = torch.zeros(2, dtype=torch.float64, device=momenta[0].device)
        for moment, mask in zip(momenta, kept, strict=True):
            pruned = 1 - mask
            self._pruned_moment += torch.stack([(moment.abs() * pruned).sum().double(), pruned.sum().double()])

    @torch.no_grad()
    def finalize(self) -> None:
        """Scales folded into W, hard prune with the masks AdamS used last (the last refresh: the weights
        it decayed are the ones pruned; a recompute from the final W could swap near-ties)."""
        for layer in self.layers.values():
            weight, scale = self.backend.full_tensor(layer.weight), self.backend.full_tensor(layer.scale)
            self.backend.set_full(layer.weight, weight * expanded_scale(layer, scale) * self.store.full(layer))
            self.backend.set_full(layer.scale, torch.ones_like(scale))
