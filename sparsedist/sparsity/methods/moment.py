"""Methods whose optimizer is `MomentAdam`: the mask enters through the first moment (AST, CAST)."""

from __future__ import annotations

import torch

from sparsedist.config.schema import OptimConfig
from sparsedist.sparsity.adam import MomentAdam
from sparsedist.sparsity.layer import SparseLinear
from sparsedist.sparsity.masks import unpack_mask
from sparsedist.sparsity.methods.base import SparsityMethod


class MomentAdamMethod(SparsityMethod):
    """Builds `MomentAdam` and turns each sparse weight's momentum m into the method's u."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step = 0
        self._layer_of: dict[int, SparseLinear] = {}

    def before_step(self, step: int) -> None:
        self.step = step

    def make_optimizer(self, groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
        self._layer_of = {id(layer.weight): layer for layer in self.layers.values()}
        return MomentAdam(groups, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay, self.backend.local, self._moment)

    def _moment(self, param: torch.Tensor, weight: torch.Tensor, momentum: torch.Tensor) -> torch.Tensor:
        layer = self._layer_of.get(id(param))
        if layer is None:
            return momentum  # a dense parameter: u = m
        mask = unpack_mask(self.backend.local(layer.mask), layer.in_features)
        return self.smoothed_moment(weight, momentum, mask)

    def smoothed_moment(self, weight: torch.Tensor, momentum: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """u from this rank's rows of W, m and the bool mask, at step `self.step`."""
        raise NotImplementedError
