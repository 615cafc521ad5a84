"""`SparseLinear`: an nn.Linear whose N:M mask is a frozen, bit-packed parameter.

The mask is a parameter (not a buffer) on purpose: the backend shards it like the
weight and gathers it together with the weight for the forward, and checkpoints save it
sharded. It costs one bit per weight, packed as rows of `mask_row` elements of the
flattened weight: the weight's own rows (FSDP2 shards them with `Shard(0)` like the
weight), or one row per ZeRO-3 partition of the weight (so each rank's partition of the
mask holds exactly the bits of its partition of the weight).

What the forward does is set by the method that converted the layer: `transform`
gives the weight the product uses, `gemm` the product itself (None: the plain
`F.linear`; or one with an MVUE weight gradient and emulated FP8), and an optional
`branch` adds a dense side path.

With the plain product, the transformed weight (M⊙W, A⊙W, β·S(W)) is not kept from the
forward to the backward: it is rebuilt in the backward from the parameters, which FSDP2
and ZeRO-3 gather again there anyway. Kept, it would be a full, unsharded copy of every
sparse weight alive for the whole forward-backward window. (The plain product is None
rather than `F.linear` itself because DeepSpeed ZeRO-3 replaces `F.linear` with its own.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsedist.sparsity.masks import pack_rows, packed_width, unpack_rows

Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""(input, weight [out, in], bias) -> output, like F.linear."""


class SparseLinear(nn.Linear):
    """A linear layer whose forward is `gemm(x, transform(self), bias) + branch(x)`."""

    mask: nn.Parameter
    mask_row: int
    transform: Callable[[SparseLinear], torch.Tensor]
    gemm: Gemm | None
    branch: nn.Module | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, transform: Callable[[SparseLinear], torch.Tensor],
                    gemm: Gemm | None = None, mask_row: int | None = None) -> SparseLinear:
        """Take over `linear`'s parameters (no copy) and add an all-zero mask packed in rows of
        `mask_row` elements (default: the weight's rows)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.mask_row = mask_row or linear.in_features
        rows = -(-linear.in_features * linear.out_features // layer.mask_row)
        bits = torch.zeros(rows, packed_width(layer.mask_row), dtype=torch.uint8, device=linear.weight.device)
        layer.mask = nn.Parameter(bits, requires_grad=False)
        layer.transform, layer.gemm, layer.branch = transform, gemm, None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm is not None:
            out = self.gemm(x, self.transform(self), self.bias)
        elif self.transform is dense_weight:
            out = F.linear(x, self.weight, self.bias)
        else:
            trained = [p for name, p in self.named_parameters(recurse=False) if p.requires_grad and name != "bias"]
            out = _RebuiltWeightLinear.apply(x, self, *trained)
            out = out if self.bias is None else out + self.bias
        return out if self.branch is None else out + self.branch(x)

    def unpack_bits(self, bits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Flat bool mask of elements [lo, hi) from packed mask rows whose first element is element 0."""
        return unpack_rows(bits, self.mask_row, lo, hi)

    def pack_bits(self, mask: torch.Tensor, rows: int) -> torch.Tensor:
        """`rows` packed mask rows holding a flat bool mask (zero-padded)."""
        return pack_rows(mask, rows, self.mask_row)

    def dense_mask(self, bits: torch.Tensor | None = None) -> torch.Tensor:
        """The [out, in] bool mask from the whole packed mask (default: the gathered `mask`)."""
        bits = self.mask if bits is None else bits
        return self.unpack_bits(bits, 0, self.out_features * self.in_features).view(self.out_features, -1)

    def pack(self, mask: torch.Tensor) -> torch.Tensor:
        """The whole packed mask of an [out, in] bool mask."""
        return self.pack_bits(mask, -(-mask.numel() // self.mask_row))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transform={self.transform.__name__}"


class _RebuiltWeightLinear(torch.autograd.Function):
    """x·transform(layer)ᵀ, saving x and the layer's parameters rather than the transformed weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: SparseLinear, *trained: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, *trained)
        return F.linear(x, layer.transform(layer))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *trained = ctx.saved_tensors
        with torch.enable_grad():
            weight = ctx.layer.transform(ctx.layer)
        grad_x = grad_out @ weight.detach()
        grad_weight = grad_out.flatten(0, -2).t() @ x.flatten(0, -2)
        grads = torch.autograd.grad(weight, trained, grad_weight)
        return grad_x, None, *grads


def sparse_layers(module: nn.Module) -> list[tuple[str, SparseLinear]]:
    """(name, layer) of every `SparseLinear` in `module`."""
    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, SparseLinear)]


def dense_weight(layer: SparseLinear) -> torch.Tensor:
    """The forward uses the dense weight; the mask only guides the method."""
    return layer.weight


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return project(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def straight_through(weight: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`project(weight)` in the forward; in the backward the gradient reaches the dense weight unchanged (STE)."""
    return _StraightThrough.apply(weight, project)
