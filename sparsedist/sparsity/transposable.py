"""Transposable 2:4 masks: per aligned 4×4 block, the best pattern that is 2:4 along both axes.

A weight is [out, in]; a block is rows 4i..4i+3 × columns 4j..4j+3. Every decision is
block-local, so the result is exact on any shard made of whole groups of 4 rows.
"""

from __future__ import annotations

import torch

from sparsedist.sparsity.masks import device_table
from sparsedist_kernels.layout import TRANSPOSABLE_PATTERNS

_BLOCKS_PER_MATMUL = 1 << 16  # bounds the float64 score buffer to 45 MiB
_SCORES = TRANSPOSABLE_PATTERNS.reshape(-1, 16).T.to(torch.float64)  # [16, 90]: a block's score per pattern


def transposable_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask, per aligned 4×4 block, of the pattern maximising Σ|w| over its ones.

    Both the mask and its transpose are 2:4 along dim 1. All 90 patterns are scored at once as
    a (blocks × 16) @ (16 × 90) matmul in float64 (2^16 blocks at a time). A score adds eight
    magnitudes, exactly in float64 for float32 (or narrower) values spanning less than ~2^26 in
    a block, so ties do not depend on the backend's summation order. Among equal scores the
    lowest index in `TRANSPOSABLE_PATTERNS` wins: an all-equal block gets
    [[1,1,0,0],[1,1,0,0],[0,0,1,1],[0,0,1,1]].
    """
    if weight.dim() != 2 or weight.shape[0] % 4 or weight.shape[1] % 4:
        raise ValueError(f"transposable_mask: weight of shape {tuple(weight.shape)} has no whole 4×4 blocks")
    rows, cols = weight.shape
    blocks = weight.detach().abs().reshape(rows // 4, 4, cols // 4, 4).transpose(1, 2).reshape(-1, 16)
    patterns = device_table(TRANSPOSABLE_PATTERNS, weight.device)
    table = device_table(_SCORES, weight.device)
    # torch.argmax returns the first maximal index.
    choice = [(chunk.to(torch.float64) @ table).argmax(1) for chunk in blocks.split(_BLOCKS_PER_MATMUL)]
    return patterns[torch.cat(choice)].reshape(rows // 4, cols // 4, 4, 4).transpose(1, 2).reshape(rows, cols)
