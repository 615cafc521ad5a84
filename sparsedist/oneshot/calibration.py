"""Calibration data for one-shot pruning: random token windows of a prepared split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sparsedist.data import TokenWindows


def calibration_batches(prefix: Path, seq_len: int, num_sequences: int, batch_size: int,
                        seed: int) -> list[torch.Tensor]:
    """input_ids batches [≤ batch_size, seq_len] of `num_sequences` distinct windows of a split.

    The windows are `TokenWindows` samples drawn without replacement by
    `numpy.random.default_rng(seed)`, so the batches are a pure function of the split and the seed.
    """
    if num_sequences < 1 or batch_size < 1:
        raise ValueError(f"num_sequences ({num_sequences}) and batch_size ({batch_size}) must be positive")
    windows = TokenWindows(prefix, seq_len)
    if num_sequences > windows.num_samples:
        raise ValueError(f"{prefix}: {windows.num_samples} windows of {seq_len + 1} tokens; "
                         f"{num_sequences} calibration sequences requested")
    samples = np.random.default_rng(seed).choice(windows.num_samples, size=num_sequences, replace=False)
    input_ids = windows.rows(samples)[:, :-1]
    return [batch.contiguous() for batch in input_ids.split(batch_size)]
