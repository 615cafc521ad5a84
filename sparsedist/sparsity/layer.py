"""`SparseLinear`: an nn.Linear whose N:M mask is a frozen, bit-packed parameter.

The mask is a parameter (not a buffer) on purpose: FSDP2 shards it with the same
`Shard(0)` rows as the weight, all-gathers it together with the weight for the
forward, and DCP saves it sharded. It costs one bit per weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsedist.sparsity.masks import packed_width

WeightTransform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(dense weight [out, in], packed mask bits) -> the weight the forward uses."""


class SparseLinear(nn.Linear):
    """A linear layer whose forward weight is `transform(weight, mask)`."""

    mask: nn.Parameter
    transform: WeightTransform

    @classmethod
    def from_linear(cls, linear: nn.Linear, transform: WeightTransform) -> SparseLinear:
        """Take over `linear`'s parameters (no copy) and add an all-zero packed mask."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        bits = torch.zeros(linear.out_features, packed_width(linear.in_features), dtype=torch.uint8,
                           device=linear.weight.device)
        layer.mask = nn.Parameter(bits, requires_grad=False)
        layer.transform = transform
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.transform(self.weight, self.mask), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transform={self.transform.__name__}"
