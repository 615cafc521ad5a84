"""Fused gated activations of gated FFNs (SwiGLU, GeGLU) as Triton kernels with autograd.

The specification is torch.nn.functional: `silu(gate) * up` and
`gelu(gate, approximate="tanh") * up`. Both are written as gate·σ(k(gate))·up, with k(x) = x
for SiLU and k(x) = 2·√(2/π)·(x + 0.044715·x³) for the tanh GELU (0.5·(1 + tanh(z)) = σ(2z),
which avoids tanh's cancellation for negative inputs). The backward kernel recomputes σ from
the saved gate and up (nothing else is saved) and writes d_gate and d_up in one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_BLOCK = 4096
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _sigmoid_of_k(x, GELU: tl.constexpr):
    """σ(k(x)). One `return` of one type: the compiler rejects returns of different types under a
    constexpr branch, which the interpreter runs."""
    z = x
    if GELU:
        z = 2 * _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    return tl.sigmoid(z)


@triton.jit
def _gated_forward_kernel(gate_ptr, up_ptr, out_ptr, n, GELU: tl.constexpr, COMPUTE: tl.constexpr,
                          BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = index < n
    x = tl.load(gate_ptr + index, mask=live).to(COMPUTE)
    u = tl.load(up_ptr + index, mask=live).to(COMPUTE)
    s = _sigmoid_of_k(x, GELU)
    tl.store(out_ptr + index, (x * s * u).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _gated_backward_kernel(gate_ptr, up_ptr, d_out_ptr, d_gate_ptr, d_up_ptr, n, GELU: tl.constexpr,
                           COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = index < n
    x = tl.load(gate_ptr + index, mask=live).to(COMPUTE)
    u = tl.load(up_ptr + index, mask=live).to(COMPUTE)
    dy = tl.load(d_out_ptr + index, mask=live).to(COMPUTE)
    s = _sigmoid_of_k(x, GELU)
    d_sigmoid = x * s * (1 - s)  # d_act = s + x·σ'(k(x))·k'(x), the d/dx of x·σ(k(x)); k' = 1 for SiLU
    if GELU:
        d_sigmoid = d_sigmoid * (2 * _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * x * x))
    d_act = s + d_sigmoid
    tl.store(d_gate_ptr + index, (dy * u * d_act).to(d_gate_ptr.dtype.element_ty), mask=live)
    tl.store(d_up_ptr + index, (dy * x * s).to(d_up_ptr.dtype.element_ty), mask=live)


def _compute_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


class _GatedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
        out = torch.empty_like(gate)
        grid = (triton.cdiv(gate.numel(), _BLOCK),)
        _gated_forward_kernel[grid](gate, up, out, gate.numel(), GELU=gelu, COMPUTE=_compute_dtype(gate.dtype),
                                    BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return out

    @staticmethod
    def backward(ctx, d_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        gate, up = ctx.saved_tensors
        d_out = d_out.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        grid = (triton.cdiv(gate.numel(), _BLOCK),)
        _gated_backward_kernel[grid](gate, up, d_out, d_gate, d_up, gate.numel(), GELU=ctx.gelu,
                                     COMPUTE=_compute_dtype(gate.dtype), BLOCK=_BLOCK)
        return d_gate, d_up, None


def _gated(name: str, gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"{name}: gate of shape {tuple(gate.shape)} and up of shape {tuple(up.shape)} differ")
    if gate.dtype != up.dtype or gate.dtype not in _DTYPES:
        raise ValueError(f"{name}: gate and up must share a dtype among {_DTYPES}, got {gate.dtype} and {up.dtype}")
    if gate.device != up.device:
        raise ValueError(f"{name}: gate on {gate.device} and up on {up.device}")
    return _GatedActivation.apply(gate.contiguous(), up.contiguous(), gelu)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, differentiable; gate and up of one shape and dtype (non-contiguous ones are copied).

    Computed in float32 (float64 for float64 inputs) and rounded once to the inputs' dtype, forward
    and backward. Matches torch autograd of `F.silu(gate) * up` within a few float32 ulps.
    """
    return _gated("swiglu", gate, up, gelu=False)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu(gate) · up with the tanh-approximated GELU (`F.gelu(gate, approximate="tanh")`), differentiable.

    Same contract as `swiglu`: one shape and dtype, computed in float32 (float64 for float64
    inputs), rounded once to the inputs' dtype; matches torch autograd of the reference within a
    few float32 ulps (more accurate for very negative gates, where the reference's 1 + tanh cancels).
    """
    return _gated("geglu", gate, up, gelu=True)
