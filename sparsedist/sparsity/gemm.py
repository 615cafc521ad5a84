"""The linear product of sparse layers with an MVUE weight gradient and/or emulated FP8.

Forward Z = X·W̃ᵀ. Backward ∇X = ∇Z·W̃ and ∇W̃ = ∇Zᵀ·X, where with `mvue` the weight
gradient is MVUE24(∇Zᵀ)·X: groups of 4 consecutive tokens of one output channel, two
kept with their exact inclusion probabilities (ICML'24, S-STE). With `fp8` every operand
is rounded to FP8 with a per-tensor scale FP8_MAX/amax: e4m3 in the forward product,
e5m2 in both backward products (S-STE's simulation), accumulation in fp32.
"""

from __future__ import annotations

import torch

from sparsedist.sparsity.layer import Gemm
from sparsedist.sparsity.mvue import mvue24

FORWARD_FP8 = torch.float8_e4m3fn
BACKWARD_FP8 = torch.float8_e5m2


def fp8_round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` through a real float8 cast with a per-tensor scale, back in fp32."""
    t = t.float()
    scale = torch.finfo(dtype).max / t.abs().amax().clamp(min=1e-12)
    return (t * scale).to(dtype).float() / scale


class _SparseGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                mvue: bool, fp8: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.mvue, ctx.fp8, ctx.has_bias = mvue, fp8, bias is not None
        if fp8:
            out = (fp8_round(x, FORWARD_FP8) @ fp8_round(weight, FORWARD_FP8).t()).to(x.dtype)
        else:
            out = x @ weight.t()
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = grad_out.reshape(-1, grad_out.shape[-1])  # [tokens, out]
        inputs = x.reshape(-1, x.shape[-1])  # [tokens, in]
        grad_t = rows.t()  # ∇Zᵀ: [out, tokens]
        if ctx.mvue:
            grad_t = mvue24(grad_t)
        if ctx.fp8:
            grad_x = fp8_round(grad_out, BACKWARD_FP8) @ fp8_round(weight, BACKWARD_FP8)
            grad_w = fp8_round(grad_t, BACKWARD_FP8) @ fp8_round(inputs, BACKWARD_FP8)
        else:
            grad_x = grad_out @ weight
            grad_w = grad_t @ inputs
        grad_b = rows.sum(0) if ctx.has_bias else None
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b, None, None


def sparse_gemm(mvue: bool, fp8: bool) -> Gemm:
    """A product like F.linear with the chosen weight-gradient estimator and precision."""

    def gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _SparseGemm.apply(x, weight, bias, mvue, fp8)

    return gemm
