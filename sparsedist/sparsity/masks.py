"""N:M mask primitives: selection, bit-packing, flip counting and digests.

Reference implementations in plain torch that run on any device. A weight is [out, in];
a group is `m` consecutive elements of one row, so every decision here is row-local and
exact on any shard made of whole rows.
"""

from __future__ import annotations

import functools
import hashlib

import torch

from sparsedist_kernels.layout import packed_width

_POPCOUNT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.int64)
_BYTE_VALUES = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1).float()  # [byte, bit j] as 0/1


@functools.cache
def device_table(table: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A constant lookup table (a module-level tensor on the CPU) on `device` in `dtype` (default: its own),
    built once per (table, device, dtype) and shared: a copy per call would be a host-to-device transfer in
    every masked forward, backward and optimizer chunk. Callers must not write to it."""
    return table.to(device, dtype or table.dtype)


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask keeping the `n` largest |w| of each group of `m` consecutive inputs (dim 1).

    Ties are broken towards the lower index, so the result is a deterministic function of
    the values: replicas and shards holding the same rows always agree.
    """
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(f"nm_mask: weight of shape {tuple(weight.shape)} has no whole groups of {m} along dim 1")
    magnitude = weight.detach().abs().reshape(-1, m).unbind(-1)
    groups = magnitude[0].numel()
    rank = [torch.zeros(groups, dtype=torch.uint8, device=weight.device) for _ in range(m)]
    for i in range(m):  # rank = how many of the group outrank the element: each pair compared once
        for j in range(i + 1, m):
            rank[j] += magnitude[i] >= magnitude[j]  # a tie goes to i, the lower index
            rank[i] += magnitude[j] > magnitude[i]
    kept = torch.empty(groups, m, dtype=torch.bool, device=weight.device)
    for i in range(m):
        torch.lt(rank[i], n, out=kept[:, i])
    return kept.view(weight.shape)


def pruned_values(weight: torch.Tensor, kept: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(1−M)⊙W into `out` (which may be `kept`), as W − W⊙M with M 0/1 in W's dtype: exactly 0 where M = 1."""
    return torch.addcmul(weight, weight, kept, value=-1, out=out)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of `m` consecutive inputs of an [out, in] weight (in % m == 0) holding more than `n` non-zeros."""
    return int(((weight != 0).reshape(weight.shape[0], -1, m).sum(-1) > n).sum())


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a [rows, cols] bool mask to [rows, ceil(cols/8)] uint8, element 8k+j in bit j of byte k."""
    rows, cols = mask.shape
    padded = torch.nn.functional.pad(mask.bool().view(torch.uint8), (0, -cols % 8)).reshape(rows, packed_width(cols), 8)
    bits = padded[..., 0].clone()
    for j in range(1, 8):
        bits |= padded[..., j] << j
    return bits


def unpack_mask(bits: torch.Tensor, cols: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of `pack_mask`: [rows, ceil(cols/8)] uint8 to a [rows, cols] mask, bool or 0/1 in a floating
    `dtype` (looked up 8 at a time from a byte table: a bool mask cast to float costs several times more)."""
    if dtype == torch.bool:
        shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
        values = (bits.unsqueeze(-1) >> shifts) & 1
        return values.bool().reshape(bits.shape[0], bits.shape[1] * 8)[:, :cols]
    table = device_table(_BYTE_VALUES, bits.device, dtype)
    return torch.nn.functional.embedding(bits.long(), table).reshape(bits.shape[0], -1)[:, :cols]


def pack_rows(flat: torch.Tensor, rows: int, row: int) -> torch.Tensor:
    """Pack a flat bool mask as `rows` rows of `row` elements ([rows, ceil(row/8)] uint8), zero-padded."""
    padded = torch.nn.functional.pad(flat.reshape(-1), (0, rows * row - flat.numel()))
    return pack_mask(padded.view(rows, row))


def unpack_rows(bits: torch.Tensor, row: int, lo: int, hi: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Elements [lo, hi) of the flat mask packed as rows of `row` elements (unpacks only their rows)."""
    first = lo // row
    rows = unpack_mask(bits[first: -(-hi // row)], row, dtype).reshape(-1)
    return rows[lo - first * row: hi - first * row]


def count_ones(bits: torch.Tensor) -> torch.Tensor:
    """Number of set bits in a packed mask (a 0-d tensor on its device: no synchronisation)."""
    return device_table(_POPCOUNT, bits.device)[bits.long()].sum()


def count_flips(old_bits: torch.Tensor, new_bits: torch.Tensor) -> int:
    """Number of elements whose mask bit differs between two packed masks."""
    return int(count_ones(old_bits ^ new_bits))


def mask_digest(bits: torch.Tensor) -> str:
    """SHA-256 of a packed mask's bytes: compares masks bit for bit (a sum cannot: every 2:4 mask sums to D/2)."""
    return hashlib.sha256(bits.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def flip_rate(old_mask: torch.Tensor, new_mask: torch.Tensor) -> float:
    """Fraction of elements whose bool mask differs, ‖M_old ⊕ M_new‖₁ / D (0.0 for empty masks)."""
    if old_mask.shape != new_mask.shape:
        raise ValueError(f"flip_rate: masks of shapes {tuple(old_mask.shape)} and {tuple(new_mask.shape)} differ")
    return int((old_mask ^ new_mask).sum()) / max(old_mask.numel(), 1)
