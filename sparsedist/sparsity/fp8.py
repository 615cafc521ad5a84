"""Per-tensor scaled FP8 products: `torch._scaled_mm` on GPUs with FP8 tensor cores, an exact
emulation elsewhere.

An operand t is quantized as q = fp8(t·s) with s = FP8_MAX/amax(|t|) (a real float8 cast,
round to nearest even) and carries its dequantization scale 1/s. A product of two quantized
operands is (q_a·q_b)·(1/s_a)·(1/s_b) accumulated in fp32, which is what `_scaled_mm`
computes; the emulation multiplies the same float8 values in fp32, so the two differ only in
the order of accumulation. Forward operands are e4m3; a gradient is e5m2 and meets an e4m3
operand (the hybrid format of FP8 training: Hopper has no e5m2×e5m2 product).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.utils.weak import WeakTensorKeyDictionary

FORWARD = torch.float8_e4m3fn
GRADIENT = torch.float8_e5m2


def hardware_fp8(device: torch.device) -> bool:
    """Whether `device` multiplies FP8 in hardware (CUDA compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _quantized(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = t.aminmax()  # amax in t's own dtype, exact, without a full-size copy
    scale = torch.finfo(dtype).max / torch.maximum(-lo, hi).float().clamp(min=1e-12)
    return (t.float() * scale).to(dtype), scale.reciprocal()


@functools.cache
def fused_quantize() -> Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]:
    """`_quantized` compiled by torch.compile: the amax reduction, then one kernel that reads t and
    writes its float8 cast (about 5 bytes moved per element, against 21 eagerly), the same bits."""
    return torch.compile(_quantized, dynamic=True)


def quantize(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, 1/s): `t` cast to the float8 `dtype` with the per-tensor scale s = max/amax, and its fp32 inverse.

    On CUDA the fused, compiled form; elsewhere the eager one (the reference: the same bits)."""
    t = t.detach()
    return fused_quantize()(t, dtype) if t.is_cuda else _quantized(t, dtype)


_SHARED = WeakTensorKeyDictionary()
"""tensor → ((its version, dtype), its quantized form), for `quantize_shared`; an entry goes with its tensor."""


def quantize_shared(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize(t, dtype)`, made once for an input several layers read (a gated FFN's gate and up read one X):
    reused while `t` lives and is not modified in place, and so saved for the backward once."""
    key = (t._version, dtype)
    entry = _SHARED.get(t)
    if entry is None or entry[0] != key:
        entry = _SHARED[t] = (key, quantize(t, dtype))
    return entry[1]


def padded(t: torch.Tensor, dim: int, multiple: int = 16) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to a multiple of `multiple` (zeros add nothing to a product)."""
    short = -t.shape[dim] % multiple
    if not short:
        return t
    pad = [0, 0, 0, 0]
    pad[1 if dim == 1 else 3] = short
    return torch.nn.functional.pad(t, pad)


def fp8_mm(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
           out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """a @ b of two quantized 2-D operands (q, 1/s), in `out_dtype`.

    On FP8 hardware `torch._scaled_mm`: mat1 row-major, mat2 column-major, the inner and output widths
    multiples of 16 (torch 2.13, `_check_scaled_mm_sizes` in torch/_meta_registrations.py), so both are
    zero-padded to 16 and the result cut back; `fast_accum` (forward products) lets cuBLASLt skip its
    periodic fp32 promotion of the accumulator."""
    (qa, inv_a), (qb, inv_b) = a, b
    if hardware_fp8(qa.device):
        columns = qb.shape[1]
        qa, qb = padded(qa, 1), padded(padded(qb, 0), 1)
        out = torch._scaled_mm(qa.contiguous(), qb.t().contiguous().t(), scale_a=inv_a, scale_b=inv_b,
                               out_dtype=out_dtype, use_fast_accum=fast_accum)
        return out[:, :columns] if out.shape[1] != columns else out
    with torch.autocast(qa.device.type, enabled=False):  # fp32 accumulation, as _scaled_mm's
        return ((qa.float() @ qb.float()) * (inv_a * inv_b)).to(out_dtype)
