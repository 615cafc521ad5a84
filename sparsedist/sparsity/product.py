"""How a sparse layer multiplies: Z = X·W̃ᵀ, ∇X = ∇Z·W̃, ∇W̃ = ∇Zᵀ·X.

W̃ is the layer's forward weight (M⊙W, β·S(W)...), so every product below computes the
masked dense product's math; the options choose how:

- `semi_structured`: where the device has 2:4 tensor cores (CUDA, compute capability 8.0+),
  W̃ is compressed for cuSPARSELt (`to_sparse_semi_structured`, which in torch 2.13 always
  takes cuSPARSELt: bf16 or fp16 operands, never fp32) and the forward runs the sparse
  kernel; with a `transposable` mask the input gradient runs the compressed W̃ᵀ too. The
  operands are in autocast's dtype where autocast is on, else in W̃'s own (bf16 under FSDP2
  and DeepSpeed with `mixed_precision: bf16`; the recipe refuses the kernel with fp32).
- `mvue`: the weight gradient is MVUE24(∇Zᵀ)·X (groups of 4 tokens of one output channel);
  with `semi_structured` on a capable device that product is sparse as well.
- `fp8`: per-tensor scaled FP8 (`sparsedist.sparsity.fp8`): e4m3 X and W̃ forward; e5m2 ∇Z
  against e4m3 W̃ and X in the backward. With `semi_structured` the forward multiplies the
  compressed e4m3 W̃ through cuSPARSELt where it is available; the backward stays FP8 dense.

Compressed and quantised forms of W̃ live in the layer's `WeightForms` for one optimizer step:
made at the first micro-batch that needs them and reused by the others, then released once
the update has run (`release_weight_forms`). Where the backend gathers parameters per use
(FSDP2, ZeRO-3) a kept form would be a full unsharded copy outliving the gather, so there
each form is made where it is used and dropped with it. Elsewhere the masked dense product
runs: the same numbers. Which path runs where is in docs/kernels.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sparsedist.sparsity import fp8
from sparsedist.sparsity.mvue import mvue24

SPARSE_DTYPES = (torch.bfloat16, torch.float16)
"""The floating dtypes of a cuSPARSELt product in torch 2.13 (besides FP8's e4m3, through `_cslt_sparse_mm`)."""


def has_sparse_tensor_cores(device: torch.device) -> bool:
    """Whether `device` runs 2:4 semi-structured sparse products (CUDA, compute capability 8.0+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def sparse_operand_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a semi-structured product on `t`'s device multiplies in: autocast's where it is on,
    else `t`'s own; fp32 has no cuSPARSELt kernel (the recipe refuses it before a run starts)."""
    kind = t.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype
    if dtype not in SPARSE_DTYPES:
        raise TypeError(f"sparsity.kernel: semi_structured multiplies bf16 or fp16 operands, not {dtype} "
                        "(set parallel.mixed_precision: bf16)")
    return dtype


def compressible(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a 2-D `t` in `dtype` has the row and column multiples cuSPARSELt compresses (torch 2.13:
    `SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS`, 16×16 for bf16/fp16, 32×32 for e4m3)."""
    limits = torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[dtype]
    rows, cols = t.shape
    return rows % limits.sparse_min_rows == 0 and cols % limits.sparse_min_cols == 0


def compress(t: torch.Tensor) -> torch.Tensor:
    """The compressed 2:4 form of a 2-D bf16/fp16 tensor that is exactly 2:4 along its rows (CUDA only)."""
    return torch.sparse.to_sparse_semi_structured(t.contiguous())


def sparse_linear(dense: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """dense·Aᵀ of a compressed A. The dense operand goes in contiguous: cuSPARSELt reads a
    non-contiguous operand as the exact transpose of a contiguous one (`dense_B.is_contiguous() ?
    NON_TRANSPOSE : TRANSPOSE`, cuSPARSELtOps.cpp), so a column slice or an expanded gradient would
    be misread."""
    return F.linear(dense.contiguous(), packed)


class WeightForms:
    """The forms of one layer's W̃ that its products need (compressed, transposed and compressed,
    quantised), each made once per optimizer step where `keep`, else at every use."""

    def __init__(self, keep: bool):
        self.keep = keep
        self._kept: dict[str, object] = {}

    def get(self, name: str, make: Callable[[], object]) -> object:
        if not self.keep:
            return make()
        if name not in self._kept:
            self._kept[name] = make()
        return self._kept[name]

    def release(self) -> None:
        self._kept.clear()


def release_weight_forms(model: nn.Module) -> None:
    """Drop every kept form of W̃ in `model` (after each optimizer update: W̃ has changed)."""
    for module in model.modules():
        forms = getattr(module, "weight_forms", None)
        if isinstance(forms, WeightForms):
            forms.release()


def _mvue(grad: torch.Tensor) -> torch.Tensor:
    """MVUE24 along the last dim: the Triton kernel on CUDA (Philox stream seeded from torch's
    generator), the torch reference elsewhere."""
    if grad.is_cuda:
        from sparsedist_kernels.mvue import mvue24 as mvue24_kernel

        return mvue24_kernel(grad, seed=int(torch.randint(0, 2**62, ())))
    return mvue24(grad).to(grad.dtype)


def _sparse_fp8_forward(x: tuple[torch.Tensor, torch.Tensor], packed_w: torch.Tensor, inv_w: torch.Tensor,
                        out_features: int, out_dtype: torch.dtype) -> torch.Tensor:
    """X·W̃ᵀ with W̃ compressed in e4m3 (`torch._cslt_compress`): cuSPARSELt's (W̃·Xᵀ) with Xᵀ passed
    column-major (the transposed view of the row-major X) and the result written transposed, so it
    is X·W̃ᵀ row-major without a copy. Both scales go in as a per-row alpha vector: a one-element
    alpha is read back to the host by `_cslt_sparse_mm` (`alpha_tensor.item<float>()`)."""
    qx, inv_x = x
    tokens = qx.shape[0]
    qx = fp8.padded(qx.contiguous(), 0)  # the dense operand's sizes: multiples of 16 for e4m3
    alpha = (inv_w * inv_x).reshape(1).expand(out_features).contiguous()
    out = torch._cslt_sparse_mm(packed_w, qx.t(), alpha=alpha, out_dtype=out_dtype, transpose_result=True)
    return out[:tokens] if out.shape[0] != tokens else out


@dataclass(frozen=True)
class Product:
    """The three products of a sparse layer, on 2-D operands ([tokens, features]).

    `forms` is the layer's `WeightForms` (None: nothing kept, as in a benchmark of one call)."""

    semi_structured: bool = False
    transposable: bool = False
    mvue: bool = False
    fp8: bool = False

    def sized(self, in_features: int, out_features: int, min_features: int) -> Product:
        """This product, with the 2:4 kernel only where both features are at least `min_features` (below, the
        compression costs more than the kernel saves)."""
        return replace(self, semi_structured=self.semi_structured and min(in_features, out_features) >= min_features)

    @property
    def plain(self) -> bool:
        """Whether this is the plain dense product (F.linear and its usual backward)."""
        return not (self.semi_structured or self.mvue or self.fp8)

    def _kernel(self, device: torch.device) -> bool:
        return self.semi_structured and has_sparse_tensor_cores(device)

    def _sparse(self, t: torch.Tensor, like: torch.Tensor) -> torch.dtype | None:
        """The dtype `t` is multiplied compressed in (that of `like`'s product), or None where it is not:
        the kernel is off, the device has none, or the shape does not fit."""
        if not self._kernel(t.device):
            return None
        dtype = sparse_operand_dtype(like)
        return dtype if compressible(t, dtype) else None

    def forward(self, x: torch.Tensor, weight: torch.Tensor, forms: WeightForms | None = None,
                quantized: dict | None = None) -> torch.Tensor:
        """Z = X·W̃ᵀ. With FP8, the e4m3 X is `quantized["x"]` where the caller gave it (several layers share
        one), else made and put there for `grad_weight`."""
        forms = forms or WeightForms(keep=False)
        if self.fp8:
            quantized = {} if quantized is None else quantized
            qx = quantized["x"] = quantized.get("x") or fp8.quantize(x, fp8.FORWARD)
            qw = forms.get("fp8", lambda: fp8.quantize(weight, fp8.FORWARD))
            if (self._kernel(weight.device) and compressible(weight, fp8.FORWARD) and fp8.hardware_fp8(weight.device)
                    and torch.backends.cusparselt.is_available()):
                packed = forms.get("fp8_compressed", lambda: torch._cslt_compress(qw[0].contiguous()))
                return _sparse_fp8_forward(qx, packed, qw[1], weight.shape[0], x.dtype)
            return fp8.fp8_mm(qx, (qw[0].t(), qw[1]), x.dtype, fast_accum=True)
        if dtype := self._sparse(weight, weight):
            return sparse_linear(x.to(dtype), forms.get("compressed", lambda: compress(weight.to(dtype))))
        # F.linear, not `@`: inside an autograd Function it saves nothing, even where DeepSpeed
        # ZeRO-3 has replaced it with its own
        return F.linear(x, weight)

    def grad_input(self, grad: torch.Tensor, weight: torch.Tensor, forms: WeightForms | None = None,
                   quantized: dict | None = None) -> torch.Tensor:
        """∇X = ∇Z·W̃. With FP8, the e5m2 ∇Z goes into `quantized` for `grad_weight`."""
        forms = forms or WeightForms(keep=False)
        if self.fp8:
            qw = forms.get("fp8", lambda: fp8.quantize(weight, fp8.FORWARD))
            qg = fp8.quantize(grad, fp8.GRADIENT)
            if quantized is not None:
                quantized["grad"] = qg
            return fp8.fp8_mm(qg, qw, grad.dtype)
        if self.transposable and (dtype := self._sparse(weight, grad)):
            return sparse_linear(grad.to(dtype), forms.get("compressed_t", lambda: compress(weight.t().to(dtype))))
        return grad @ weight

    def grad_weight(self, grad: torch.Tensor, x: torch.Tensor | None, quantized: dict | None = None) -> torch.Tensor:
        """∇W̃ = ∇Zᵀ·X, or MVUE24(∇Zᵀ)·X (FP8: X, and ∇Z without MVUE, as `quantized` holds them where given:
        a per-tensor scale is the same for a tensor and its transpose)."""
        quantized = quantized or {}
        grad_t = _mvue(grad.t()) if self.mvue else grad.t()
        if self.fp8:
            qx = quantized["x"] if "x" in quantized else fp8.quantize(x, fp8.FORWARD)
            if "grad" in quantized and not self.mvue:
                qg = (quantized["grad"][0].t(), quantized["grad"][1])
            else:
                qg = fp8.quantize(grad_t, fp8.GRADIENT)
            return fp8.fp8_mm(qg, qx, grad.dtype)
        if self.mvue and (dtype := self._sparse(grad_t, grad)):
            return compress(grad_t.to(dtype)) @ x.to(dtype).contiguous()
        return grad_t @ x
