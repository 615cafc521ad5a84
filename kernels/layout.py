"""Mask layouts the kernels and their torch references in `sparsedist.sparsity` share.

Imports only torch (no Triton), so `sparsedist.sparsity` takes its tables from here without
loading a kernel; nothing in `sparsedist_kernels` imports `sparsedist`.
"""

from __future__ import annotations

import itertools

import torch


def packed_width(cols: int) -> int:
    """Bytes per row of a packed mask."""
    return (cols + 7) // 8


def _transposable_patterns() -> torch.Tensor:
    """The 4×4 0/1 patterns with two ones in every row and column, in lexicographic order.

    Order: by row 0's pair of columns, then row 1's, ...; pairs ordered (0,1) < (0,2) < (0,3)
    < (1,2) < (1,3) < (2,3). Equivalently, the row-major bit strings in decreasing order, so
    earlier patterns keep earlier positions.
    """
    rows = [tuple(c in pair for c in range(4)) for pair in itertools.combinations(range(4), 2)]
    patterns = torch.tensor(list(itertools.product(rows, repeat=4)))
    return patterns[(patterns.sum(1) == 2).all(-1)]


TRANSPOSABLE_PATTERNS = _transposable_patterns()
"""[90, 4, 4] bool: the candidate patterns of a transposable 2:4 mask; ties go to the lowest index."""
