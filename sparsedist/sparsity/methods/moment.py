"""Methods whose optimizer is `MomentAdam`: the mask enters through the first moment (AST, CAST)."""

from __future__ import annotations

import torch

from sparsedist.config.schema import OptimConfig
from sparsedist.sparsity.adam import MomentAdam
from sparsedist.sparsity.methods.base import SparsityMethod


class MomentAdamMethod(SparsityMethod):
    """Builds `MomentAdam` and turns each sparse weight's momentum m into the method's u."""

    def make_optimizer(self, groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
        return MomentAdam(groups, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, self.backend.local, self._moment)

    def _moment(self, tensors: list[torch.Tensor], parts: list[slice], weights: list[torch.Tensor],
                momenta: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """u of each piece of a batch (`MomentAdam`'s Modify): m where the piece holds no sparse weight, else
        `smoothed_moment` over all the pieces that do, at once."""
        moments = list(momenta)
        sparse, kept = [], []
        for i, (tensor, part, weight) in enumerate(zip(tensors, parts, weights, strict=True)):
            mask = self.store.update_mask(tensor, part, weight.dtype)
            if mask is not None:
                sparse.append(i)
                kept.append(mask)
        if sparse:
            smoothed = self.smoothed_moment(step, [weights[i] for i in sparse], [momenta[i] for i in sparse], kept)
            for i, moment in zip(sparse, smoothed, strict=True):
                moments[i] = moment
        return moments

    def smoothed_moment(self, step: int, weights: list[torch.Tensor], momenta: list[torch.Tensor],
                        kept: list[torch.Tensor]) -> list[torch.Tensor]:
        """u of the optimizer's update `step` (0-based) for each of a batch of pieces, as new tensors, from this
        rank's values of W, m and the aligned mask M (0/1 in W's dtype; this may overwrite them and empties the
        list `kept` once it no longer needs them); u = m exactly where M = 1."""
        raise NotImplementedError
