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

    def _moment(self, tensor: torch.Tensor, part: slice, weight: torch.Tensor, momentum: torch.Tensor,
                out: torch.Tensor, step: int) -> torch.Tensor:
        kept = self.store.update_mask(tensor, part, weight.dtype)
        if kept is None:
            return momentum  # no sparse weight in this part of the tensor: u = m
        return self.smoothed_moment(step, weight, momentum, kept, out)

    def smoothed_moment(self, step: int, weight: torch.Tensor, momentum: torch.Tensor, kept: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
        """u of the optimizer's update `step` (0-based), written to `out`, from this rank's values of W, m and
        the aligned mask M (0/1 in W's dtype, which this may overwrite); u = m exactly where M = 1."""
        raise NotImplementedError
