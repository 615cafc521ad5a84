"""How a sparse layer multiplies: Z = X·W̃ᵀ, ∇X = ∇Z·W̃, ∇W̃ = ∇Zᵀ·X.

W̃ is the layer's forward weight (M⊙W, β·S(W)...), so every product below computes the
masked dense product's math; the options choose how:

- `semi_structured`: where the device has 2:4 tensor cores (CUDA, compute capability 8.0+),
  W̃ is compressed with `torch.sparse.to_sparse_semi_structured` (cuSPARSELt, or CUTLASS) and
  the forward runs the sparse kernel; with a `transposable` mask the input gradient runs the
  compressed W̃ᵀ too. Compression happens in every forward (and, for W̃ᵀ, in the backward)
  from the weight the backend has just gathered, so it is always that of the current
  optimizer step, and no compressed copy outlives the product (a cached one would be a full
  unsharded copy per rank under FSDP2 and ZeRO-3). Elsewhere the masked dense product runs:
  the same numbers.
- `mvue`: the weight gradient is MVUE24(∇Zᵀ)·X (groups of 4 tokens of one output channel);
  with `semi_structured` on a capable device that product is sparse as well.
- `fp8`: per-tensor scaled FP8 (`sparsedist.sparsity.fp8`): e4m3 X and W̃ forward; e5m2 ∇Z
  against e4m3 W̃ and X in the backward. With `semi_structured` the forward multiplies the
  compressed e4m3 W̃ through cuSPARSELt where it is available; the backward stays FP8 dense.

Which path runs where is in docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsedist.sparsity import fp8
from sparsedist.sparsity.mvue import mvue24


def has_sparse_tensor_cores(device: torch.device) -> bool:
    """Whether `device` runs 2:4 semi-structured sparse products (CUDA, compute capability 8.0+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def compress(t: torch.Tensor) -> torch.Tensor:
    """The compressed 2:4 form of a 2-D tensor that is exactly 2:4 along its rows (CUDA only)."""
    return torch.sparse.to_sparse_semi_structured(t.contiguous())


def _mvue(grad: torch.Tensor) -> torch.Tensor:
    """MVUE24 along the last dim: the Triton kernel on CUDA (Philox stream seeded from torch's
    generator), the torch reference elsewhere."""
    if grad.is_cuda:
        from sparsedist_kernels.mvue import mvue24 as mvue24_kernel

        return mvue24_kernel(grad, seed=int(torch.randint(0, 2**62, ())))
    return mvue24(grad).to(grad.dtype)


def _sparse_fp8_forward(x: tuple[torch.Tensor, torch.Tensor], w: tuple[torch.Tensor, torch.Tensor],
                        out_dtype: torch.dtype) -> torch.Tensor:
    """X·W̃ᵀ with W̃ compressed in e4m3 through cuSPARSELt: (W̃·Xᵀ)ᵀ, both scales applied to the result."""
    (qx, inv_x), (qw, inv_w) = x, w
    packed = torch.sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense(qw.contiguous())
    # positional: the sparse tensor's dispatch reads (A, B, scale_a, scale_b, bias, scale_result, out_dtype)
    return torch._scaled_mm(packed, qx.t().contiguous(), inv_w, inv_x, None, None, out_dtype).t()


@dataclass(frozen=True)
class Product:
    """The three products of a sparse layer, on 2-D operands ([tokens, features])."""

    semi_structured: bool = False
    transposable: bool = False
    mvue: bool = False
    fp8: bool = False

    @property
    def plain(self) -> bool:
        """Whether this is the plain dense product (F.linear and its usual backward)."""
        return not (self.semi_structured or self.mvue or self.fp8)

    def _sparse(self, t: torch.Tensor) -> bool:
        return self.semi_structured and has_sparse_tensor_cores(t.device)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Z = X·W̃ᵀ."""
        if self.fp8:
            qx, qw = fp8.quantize(x, fp8.FORWARD), fp8.quantize(weight, fp8.FORWARD)
            if self._sparse(weight) and fp8.hardware_fp8(weight.device) and torch.backends.cusparselt.is_available():
                return _sparse_fp8_forward(qx, qw, x.dtype)
            return fp8.fp8_mm(qx, (qw[0].t(), qw[1]), x.dtype)
        # F.linear, not `@`: inside an autograd Function it saves nothing, even where DeepSpeed
        # ZeRO-3 has replaced it with its own
        return F.linear(x, compress(weight) if self._sparse(weight) else weight)

    def grad_input(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """∇X = ∇Z·W̃."""
        if self.fp8:
            return fp8.fp8_mm(fp8.quantize(grad, fp8.GRADIENT), fp8.quantize(weight, fp8.FORWARD), grad.dtype)
        if self.transposable and self._sparse(weight):
            return F.linear(grad, compress(weight.t()))
        return grad @ weight

    def grad_weight(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """∇W̃ = ∇Zᵀ·X, or MVUE24(∇Zᵀ)·X."""
        grad_t = _mvue(grad.t()) if self.mvue else grad.t()
        if self.fp8:
            return fp8.fp8_mm(fp8.quantize(grad_t, fp8.GRADIENT), fp8.quantize(x, fp8.FORWARD), grad.dtype)
        if self.mvue and self._sparse(grad_t):
            return compress(grad_t) @ x
        return grad_t @ x
