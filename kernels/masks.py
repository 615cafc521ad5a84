"""Triton kernels for N:M masks: magnitude pruning with packed bits, transposable 2:4 bits, masked decay.

The torch references in `sparsedist.sparsity` are the specification: `nm_prune` and
`transposable_mask_bits` match `nm_mask`, `transposable_mask` and `pack_mask` bit for bit, and
`masked_decay_` matches the torch expression its docstring names. Weights are contiguous
[out, in]; packed masks are [out, ceil(in/8)] uint8 with element 8k+j in bit j of byte k.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparsedist_kernels.layout import TRANSPOSABLE_PATTERNS, packed_width

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
NM_GROUPS = (2, 4, 8)  # the group sizes m that nm_prune accepts


def _check_weight(name: str, weight: torch.Tensor, dtypes: tuple[torch.dtype, ...] = _FLOATS) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] tensor, got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {weight.dtype} is not one of {dtypes}")
    if not weight.is_contiguous():
        raise ValueError(f"{name}: tensor of shape {tuple(weight.shape)} is not contiguous")


@triton.jit
def _nm_prune_kernel(w_ptr, out_ptr, bits_ptr, rows, cols, width, N: tl.constexpr, M: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row = r[:, None].to(tl.int64)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    w = tl.load(w_ptr + row * cols + c[None, :], mask=inside, other=0.0)
    wide = w.to(tl.float32)  # exact; bf16 arithmetic in Triton's interpreter is not IEEE
    magnitude = tl.reshape(tl.abs(wide), (BLOCK_R, BLOCK_C // M, M))
    mine = magnitude[:, :, :, None]  # element i of its group on axis 2, the others j on axis 3
    other = magnitude[:, :, None, :]
    position = tl.arange(0, M)
    before = position[None, :] < position[:, None]  # [i, j]: j < i
    rank = tl.sum(((other > mine) | ((other == mine) & before)).to(tl.int32), axis=3)
    keep = tl.reshape(rank < N, (BLOCK_R, BLOCK_C)) & inside
    tl.store(out_ptr + row * cols + c[None, :], (wide * keep.to(tl.float32)).to(w.dtype), mask=inside)
    bit = 1 << tl.arange(0, 8)
    packed = tl.sum(tl.reshape(keep.to(tl.int32), (BLOCK_R, BLOCK_C // 8, 8)) * bit[None, None, :], axis=2)
    b = tl.program_id(1) * (BLOCK_C // 8) + tl.arange(0, BLOCK_C // 8)
    tl.store(bits_ptr + row * width + b[None, :], packed.to(tl.uint8), mask=(r[:, None] < rows) & (b[None, :] < width))


def nm_prune(weight: torch.Tensor, n: int = 2, m: int = 4, *, block_rows: int = 8,
             block_cols: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * nm_mask(weight, n, m), pack_mask(nm_mask(weight, n, m))) in one pass.

    The n largest |w| of each group of m consecutive inputs are kept, ties to the lower index,
    with the reference's comparisons (> and ==): a NaN is never outranked and outranks nothing,
    so it is always kept and its group keeps up to n more; a pruned ±inf becomes NaN (inf·0; NaN signs
    and payloads are the platform's). m is 2, 4 or 8 and divides in; weight is fp32, bf16 or fp16 (the
    pruned copy keeps its dtype).
    """
    _check_weight("nm_prune", weight)
    if m not in NM_GROUPS:
        raise ValueError(f"nm_prune: m={m} is not one of {NM_GROUPS}")
    if not 0 <= n <= m:
        raise ValueError(f"nm_prune: n={n} is not in [0, m={m}]")
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"nm_prune: weight of shape {tuple(weight.shape)} has no whole groups of {m} along dim 1")
    if block_cols % 8 or block_cols & (block_cols - 1) or block_rows & (block_rows - 1):
        raise ValueError(f"nm_prune: blocks {block_rows}x{block_cols} are not powers of two with >= 8 columns")
    pruned = torch.empty_like(weight)
    bits = torch.zeros(rows, packed_width(cols), dtype=torch.uint8, device=weight.device)
    if weight.numel():
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
        _nm_prune_kernel[grid](weight, pruned, bits, rows, cols, bits.shape[1], N=n, M=m, BLOCK_R=block_rows,
                               BLOCK_C=block_cols)
    return pruned, bits


@functools.cache
def _pattern_codes(device: torch.device) -> torch.Tensor:
    """TRANSPOSABLE_PATTERNS as int32 codes, entry (a, b) of a pattern in bit 4a+b, in the reference's order."""
    flat = TRANSPOSABLE_PATTERNS.reshape(-1, 16).to(torch.int32)
    return (flat << torch.arange(16, dtype=torch.int32)).sum(1, dtype=torch.int32).to(device)


@triton.jit
def _transposable_kernel(w_ptr, codes_ptr, bits_ptr, rows, cols, width, PATTERNS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    # The program's 4x4 blocks: block rows i (weight rows 4i..4i+3) x block columns j (columns 4j..4j+3).
    i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1) * (2 * BLOCK_B) + tl.arange(0, 2 * BLOCK_B)
    k = tl.arange(0, 16)  # entry (k // 4, k % 4) of a block
    r = 4 * i[:, None, None] + k[None, None, :] // 4
    c = 4 * j[None, :, None] + k[None, None, :] % 4
    w = tl.load(w_ptr + r.to(tl.int64) * cols + c, mask=(r < rows) & (c < cols), other=0.0)
    magnitude = tl.abs(w.to(tl.float32).to(tl.float64))  # exact; via fp32 for the interpreter's bf16
    # Scores Σ_k |w_k|·P_k as the reference's float64 matmul: exact sums, NaN where an inf meets a 0.
    p = tl.arange(0, 128)
    code = tl.load(codes_ptr + p, mask=p < PATTERNS, other=0)
    table = ((code[None, :] >> k[:, None]) & 1).to(tl.float64)
    score = tl.dot(tl.reshape(magnitude, (BLOCK_R * 2 * BLOCK_B, 16)), table, input_precision="ieee")
    # torch.argmax: the first maximum, NaN above everything.
    nan = score != score
    real = (p < PATTERNS)[None, :] & ~nan
    top = tl.max(tl.where(real, score, -1.0), axis=1)
    some_nan = tl.max(nan.to(tl.int32), axis=1) > 0
    hit = (p < PATTERNS)[None, :] & tl.where(some_nan[:, None], nan, score == top[:, None])
    best = tl.min(tl.where(hit, (p[None, :] << 16) | code[None, :], 1 << 30), axis=1) & 0xFFFF
    best = tl.where(j[None, :] < cols // 4, tl.reshape(best, (BLOCK_R, 2 * BLOCK_B)), 0)
    # Row a of block j is bits 4a..4a+3 of its code; blocks 2b and 2b+1 share byte b of each row.
    a = tl.arange(0, 4)
    nibble = tl.reshape((best[:, None, :] >> (4 * a)[None, :, None]) & 15, (BLOCK_R, 4, BLOCK_B, 2))
    packed = tl.sum(nibble << (4 * tl.arange(0, 2))[None, None, None, :], axis=3)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row = (4 * i[:, None, None] + a[None, :, None]).to(tl.int64)
    store = (i[:, None, None] < rows // 4) & (b[None, None, :] < width)
    tl.store(bits_ptr + row * width + b[None, None, :], packed.to(tl.uint8), mask=store)


def transposable_mask_bits(weight: torch.Tensor, *, block_rows: int = 4, block_bytes: int = 4) -> torch.Tensor:
    """pack_mask(transposable_mask(weight)) for a weight whose dims are multiples of 4.

    Per aligned 4x4 block, the pattern of TRANSPOSABLE_PATTERNS maximising Σ|w| over its ones, scored
    as a float64 (blocks x 16) @ (16 x 90) product as in the reference, the lowest index winning ties.
    Bit for bit wherever the reference's scores are exact (float32 magnitudes spanning less than
    ~2^26 in a block; any bf16 or fp16 block), non-finite values included: a block holding a NaN
    gets pattern 0, one holding an inf the first pattern leaving an inf out (inf·0 scores NaN, which
    torch.argmax ranks first). A program covers block_rows x 2·block_bytes blocks (at least 16, tl.dot's minimum).
    """
    _check_weight("transposable_mask_bits", weight)
    rows, cols = weight.shape
    if rows % 4 or cols % 4:
        raise ValueError(f"transposable_mask_bits: weight of shape {tuple(weight.shape)} has no whole 4x4 blocks")
    if block_rows & (block_rows - 1) or block_bytes & (block_bytes - 1) or block_rows * block_bytes < 8:
        raise ValueError(f"transposable_mask_bits: blocks {block_rows}x{block_bytes} are not powers of two "
                         "covering at least 16 blocks")
    bits = torch.zeros(rows, packed_width(cols), dtype=torch.uint8, device=weight.device)
    if weight.numel():
        codes = _pattern_codes(weight.device)
        grid = (triton.cdiv(rows // 4, block_rows), triton.cdiv(bits.shape[1], block_bytes))
        _transposable_kernel[grid](weight, codes, bits, rows, cols, bits.shape[1], PATTERNS=codes.numel(),
                                   BLOCK_R=block_rows, BLOCK_B=block_bytes)
    return bits


@triton.jit
def _masked_decay_kernel(grad_ptr, w_ptr, bits_ptr, rows, cols, width, decay, BLOCK_R: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row = r[:, None].to(tl.int64)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    byte = tl.load(bits_ptr + row * width + c[None, :] // 8, mask=inside, other=0).to(tl.int32)
    pruned = 1 - ((byte >> (c[None, :] % 8)) & 1)
    w = tl.load(w_ptr + row * cols + c[None, :], mask=inside, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + row * cols + c[None, :], mask=inside, other=0.0)
    tl.store(grad_ptr + row * cols + c[None, :], g + decay * w * pruned.to(tl.float32), mask=inside)


def masked_decay_(grad: torch.Tensor, weight: torch.Tensor, bits: torch.Tensor, decay: float, *,
                  block_rows: int = 16, block_cols: int = 256) -> None:
    """In place grad += decay·(1 − M)⊙W, M unpacked from `bits` (pack_mask of the [out, in] mask).

    grad is fp32; weight is fp32, bf16 or fp16. The result is bit for bit
    `grad + decay * weight.float() * ~unpack_mask(bits, in)`: decay rounded to fp32, decay·w rounded
    to fp32 before the sum (FMA fusion is disabled), inf·0 = NaN as in torch. For fp32 weights that is
    exactly `grad + decay * weight * ~unpack_mask(bits, in)`; for bf16 (fp16) weights that expression
    also rounds decay·w to the weight's dtype, so the two differ by at most that rounding (2^-8 (2^-11)
    relative, half the subnormal spacing below the normal range) plus one ulp of the fp32 sum.
    """
    _check_weight("masked_decay_", grad, (torch.float32,))
    _check_weight("masked_decay_", weight)
    _check_weight("masked_decay_", bits, (torch.uint8,))
    rows, cols = grad.shape
    if weight.shape != grad.shape or bits.shape != (rows, packed_width(cols)):
        raise ValueError(f"masked_decay_: grad {tuple(grad.shape)}, weight {tuple(weight.shape)} and bits "
                         f"{tuple(bits.shape)} do not match (bits must be [out, ceil(in/8)])")
    if weight.device != grad.device or bits.device != grad.device:
        raise ValueError(f"masked_decay_: grad, weight and bits are on {grad.device}, {weight.device}, {bits.device}")
    if block_cols & (block_cols - 1) or block_rows & (block_rows - 1):
        raise ValueError(f"masked_decay_: blocks {block_rows}x{block_cols} are not powers of two")
    if grad.numel():
        grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_cols))
        _masked_decay_kernel[grid](grad, weight, bits, rows, cols, bits.shape[1], float(decay), BLOCK_R=block_rows,
                                   BLOCK_C=block_cols, enable_fp_fusion=False)
