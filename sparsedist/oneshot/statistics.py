"""What the calibration forward records about the inputs of each linear layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

Statistic = Literal["norms", "gram"]
"""`norms`: the sum of squares of every input feature; `gram`: the full XᵀX."""


class InputStatistics:
    """Running float64 statistics of the inputs X [tokens, in] a linear layer has seen."""

    def __init__(self, in_features: int, statistic: Statistic, device: torch.device):
        self.statistic = statistic
        self.tokens = 0
        shape = (in_features, in_features) if statistic == "gram" else (in_features,)
        self._sum = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate one batch of inputs [..., in]."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        self.tokens += x.shape[0]
        if self.statistic == "gram":
            self._sum.addmm_(x.T, x)
        else:
            self._sum.add_(x.square().sum(0))

    def feature_norms(self) -> torch.Tensor:
        """‖X_j‖₂ of every input feature j over all tokens seen: [in] float64."""
        squares = self._sum.diagonal() if self.statistic == "gram" else self._sum
        return squares.sqrt()

    def gram(self) -> torch.Tensor:
        """XᵀX over all tokens seen: [in, in] float64."""
        if self.statistic != "gram":
            raise ValueError("these statistics hold feature norms only, not XᵀX")
        return self._sum


@contextmanager
def recording_inputs(linears: dict[str, nn.Linear], statistic: Statistic) -> Iterator[dict[str, InputStatistics]]:
    """Statistics of the inputs of every linear, by name, filled by forward hooks while the context is open."""
    stats = {name: InputStatistics(linear.in_features, statistic, linear.weight.device)
             for name, linear in linears.items()}
    handles = [linear.register_forward_hook(lambda _module, args, _output, s=stats[name]: s.add(args[0]))
               for name, linear in linears.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """‖XWᵀ − XŴᵀ‖²_F from XᵀX alone: tr(Δ XᵀX Δᵀ) with Δ = W − Ŵ ([out, in] weights)."""
    delta = (dense - pruned).to(torch.float64)
    return float(((delta @ gram) * delta).sum())
