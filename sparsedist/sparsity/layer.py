"""`SparseLinear`: an nn.Linear whose N:M mask is a frozen, bit-packed parameter.

The mask is a parameter (not a buffer) on purpose: the backend shards it like the
weight and gathers it together with the weight for the forward, and checkpoints save it
sharded. It costs one bit per weight, packed as rows of `mask_row` elements of the
flattened weight, in the layout the mask store (store.py) chose; the store reads and
writes the bits, the layer only unpacks the gathered mask for its forward.

What the forward does is set by the method that converted the layer: `transform`
gives the weight W̃ the product uses, `product` how it is multiplied (the plain dense
product, or with the 2:4 kernel, an MVUE weight gradient or FP8: see product.py), and
an optional `branch` adds a dense side path. `weight_forms` keeps the compressed and quantised
forms of W̃ a training step's micro-batches share (product.py).

W̃ (M⊙W, A⊙W, β·S(W)) is not kept from the forward to the backward: it is rebuilt in the
backward from the parameters, which FSDP2 and ZeRO-3 gather again there anyway. Kept, it
would be a full, unsharded copy of every sparse weight alive for the whole
forward-backward window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsedist.sparsity import fp8
from sparsedist.sparsity.masks import packed_width, unpack_rows
from sparsedist.sparsity.product import Product, WeightForms


class SparseLinear(nn.Linear):
    """A linear layer whose forward is `product(x, transform(self)) + bias + branch(x)`."""

    mask: nn.Parameter
    mask_row: int
    transform: Callable[[SparseLinear], torch.Tensor]
    product: Product
    branch: nn.Module | None
    weight_forms: WeightForms

    @classmethod
    def from_linear(cls, linear: nn.Linear, transform: Callable[[SparseLinear], torch.Tensor],
                    product: Product | None = None, mask_row: int | None = None,
                    keep_weight_forms: bool = False) -> SparseLinear:
        """Take over `linear`'s parameters (no copy) and add an all-zero mask packed in rows of
        `mask_row` elements (default: the weight's rows). `keep_weight_forms`: W̃'s compressed and
        quantised forms are made once per optimizer step (False where parameters are gathered per use)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.mask_row = mask_row or linear.in_features
        rows = -(-linear.in_features * linear.out_features // layer.mask_row)
        bits = torch.zeros(rows, packed_width(layer.mask_row), dtype=torch.uint8, device=linear.weight.device)
        layer.mask = nn.Parameter(bits, requires_grad=False)
        layer.transform, layer.product, layer.branch = transform, product or Product(), None
        layer.weight_forms = WeightForms(keep_weight_forms)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform is dense_weight and self.product.plain:
            out = F.linear(x, self.weight, self.bias)
        else:
            trained = [p for name, p in self.named_parameters(recurse=False) if p.requires_grad and name != "bias"]
            out = _ProductLinear.apply(x, self, *trained)
            out = out if self.bias is None else out + self.bias
        return out if self.branch is None else out + self.branch(x)

    def dense_mask(self, bits: torch.Tensor | None = None, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The [out, in] mask (bool, or 0/1 in `dtype`) from the whole packed mask (default: the gathered `mask`)."""
        bits = self.mask if bits is None else bits
        numel = self.out_features * self.in_features
        return unpack_rows(bits, self.mask_row, 0, numel, dtype).view(self.out_features, -1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, transform={self.transform.__name__}"


class _ProductLinear(torch.autograd.Function):
    """layer.product of x and transform(layer), saving x (FP8: its e4m3 form, quantised once for every layer that
    reads this x) and the layer's parameters rather than W̃."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: SparseLinear, *trained: torch.Tensor) -> torch.Tensor:
        ctx.layer = layer
        ctx.forms = layer.weight_forms if layer.training else None  # evaluation keeps nothing
        kind = x.device.type  # the backward multiplies under the forward's autocast, as autocast's own ops do
        ctx.autocast = dict(device_type=kind, dtype=torch.get_autocast_dtype(kind),
                            enabled=torch.is_autocast_enabled(kind))
        ctx.shape = x.shape
        ctx.quantized = None
        if layer.product.fp8:
            qx, inv_x = fp8.quantize_shared(x, fp8.FORWARD)
            ctx.quantized = {"x": (qx.reshape(-1, x.shape[-1]), inv_x)}
        ctx.save_for_backward(*(trained if layer.product.fp8 else (x, *trained)))  # FP8 keeps its e4m3 X instead
        out = layer.product.forward(x.reshape(-1, x.shape[-1]), layer.transform(layer), ctx.forms, ctx.quantized)
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *trained = (None, *ctx.saved_tensors) if ctx.quantized is not None else ctx.saved_tensors
        product = ctx.layer.product
        with torch.enable_grad():
            weight = ctx.layer.transform(ctx.layer)
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        inputs = None if x is None else x.reshape(-1, x.shape[-1])
        with torch.autocast(**ctx.autocast):
            grad_x = product.grad_input(rows, weight.detach(), ctx.forms, ctx.quantized).reshape(ctx.shape)
            grad_weight = product.grad_weight(rows, inputs, ctx.quantized)
        grad_weight = grad_weight.to(weight.dtype)
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
