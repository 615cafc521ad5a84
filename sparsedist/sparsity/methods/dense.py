"""Dense training: the method that owns no weight."""

from __future__ import annotations

from torch import nn

from sparsedist.config import sparsity as configs
from sparsedist.models.families import Family
from sparsedist.sparsity.methods.base import SparsityMethod


class Dense(SparsityMethod):
    """No masks: the dense baseline, and the pretraining stage of a retraining pipeline."""

    config = configs.Dense
    delivers_sparse = False

    def convert(self, model: nn.Module, family: Family) -> None:
        """A dense run converts nothing."""

    def end(self, step: int) -> None:
        """No masks to refresh."""
