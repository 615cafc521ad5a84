"""Deterministic, resumable, rank-sharded batches of token windows from an indexed split.

The token stream of a split is the concatenation of its documents (each ends with EOS). Sample
`i` is the window `stream[i*L : i*L + L + 1]`: its first L tokens are the inputs, its last L the
labels, so consecutive samples share one token; the `(total - 1) % L` tokens after the last
whole window are never used. Batches are pure functions of their arguments and the files, so a
resumed run simply asks for the step it stopped at.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

Batch = tuple[torch.Tensor, torch.Tensor]
"""(input_ids, labels), each [rows, seq_len] int64."""


class TokenWindows:
    """The samples of one split: overlapping windows of `seq_len + 1` tokens of its token stream."""

    def __init__(self, prefix: Path, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.dataset = IndexedDataset(str(prefix))
        self.seq_len = seq_len
        lengths = self.dataset.sequence_lengths.astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        """Position of each sequence's first token in the stream; the last entry is the total."""
        self.num_samples = max(0, (int(self.starts[-1]) - 1) // seq_len)

    def rows(self, samples: np.ndarray) -> torch.Tensor:
        """The windows of `samples`, stacked: [len(samples), seq_len + 1] int64."""
        width = self.seq_len + 1
        return torch.from_numpy(np.stack([self._read(int(i) * self.seq_len, width) for i in samples]))

    def _read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the stream from `start`, crossing document boundaries as needed."""
        pieces = []
        sequence = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[sequence])
            count = min(length, int(self.starts[sequence + 1]) - start)
            pieces.append(self.dataset.get(sequence, offset=offset, length=count))
            start, length, sequence = start + count, length - count, sequence + 1
        return np.concatenate(pieces).astype(np.int64)


class TokenBatches:
    """This rank's deterministic share of each global batch of one split.

    The global sample order runs through epochs back to back: position `p` is sample
    `perm_e[p % N]` of epoch `e = p // N` (N = `num_samples`), where `perm_e` is the permutation
    drawn from `numpy.random.default_rng((seed, e))` (the identity when `shuffle` is False). A
    global batch that straddles an epoch boundary takes the end of one epoch and the start of
    the next, so every epoch visits each sample exactly once and nothing is dropped; a run that
    stops mid-epoch has simply not visited the rest of that epoch. The global batch of step `s`
    is positions `[s*G, (s+1)*G)`; rank `r` takes the contiguous rows `[r*G/W, (r+1)*G/W)` of it,
    cut into `accumulation_steps` micro-batches in order, so the global rows of a step do not
    depend on the world size.
    """

    def __init__(self, prefix: Path, seq_len: int, global_batch: int, micro_batch: int,
                 rank: int, world_size: int, seed: int, shuffle: bool = True):
        _check_layout(global_batch, micro_batch, rank, world_size)
        self.windows = TokenWindows(prefix, seq_len)
        self.num_samples = self.windows.num_samples
        if self.num_samples < global_batch:
            raise ValueError(f"{prefix}: {self.num_samples} samples of {seq_len + 1} tokens are fewer than "
                             f"one global batch of {global_batch}")
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.accumulation_steps = global_batch // (micro_batch * world_size)

    def sample_ids(self, step: int) -> np.ndarray:
        """The samples of this rank's rows of optimizer step `step`, in order."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        per_rank = self.global_batch // self.world_size
        first = step * self.global_batch + self.rank * per_rank
        epochs, offsets = np.divmod(np.arange(first, first + per_rank), self.num_samples)
        if not self.shuffle:
            return offsets
        samples = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            samples[in_epoch] = _epoch_order(self.num_samples, self.seed, int(epoch))[offsets[in_epoch]]
        return samples

    def micro_batches(self, step: int) -> list[Batch]:
        """(input_ids, labels), each [micro_batch, seq_len] int64, for optimizer step `step` (0-based) on this rank."""
        rows = self.windows.rows(self.sample_ids(step))
        return [_as_batch(part) for part in rows.split(self.micro_batch)]


def eval_batches(prefix: Path, seq_len: int, micro_batch: int, rank: int, world_size: int,
                 sequences: int | None) -> list[Batch]:
    """This rank's micro-batches of the first `sequences` samples of a split, in order, unshuffled.

    The samples (all of them, rounded down to a multiple of `world_size`, when `sequences` is
    None) are divided between ranks in contiguous, equal slices, so every rank runs the same
    number of forwards and the token-weighted mean over all ranks is the mean over exactly
    those samples, whatever the world size.
    """
    _check_layout(world_size * micro_batch, micro_batch, rank, world_size)
    windows = TokenWindows(prefix, seq_len)
    total = windows.num_samples - windows.num_samples % world_size if sequences is None else sequences
    if total % world_size:
        raise ValueError(f"{total} evaluation sequences do not divide between {world_size} ranks")
    if not 0 < total <= windows.num_samples:
        raise ValueError(f"{prefix}: {windows.num_samples} samples of {seq_len + 1} tokens; {total} requested")
    per_rank = total // world_size
    rows = windows.rows(np.arange(rank * per_rank, (rank + 1) * per_rank))
    return [_as_batch(part) for part in rows.split(micro_batch)]


def _check_layout(global_batch: int, micro_batch: int, rank: int, world_size: int) -> None:
    if micro_batch < 1 or world_size < 1:
        raise ValueError(f"micro_batch ({micro_batch}) and world_size ({world_size}) must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if global_batch < 1 or global_batch % (micro_batch * world_size):
        raise ValueError(f"global batch {global_batch} is not a positive multiple of micro_batch × world_size "
                         f"= {micro_batch} × {world_size} = {micro_batch * world_size}")


@lru_cache(maxsize=4)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng((seed, epoch)).permutation(num_samples)
    order.flags.writeable = False
    return order


def _as_batch(rows: torch.Tensor) -> Batch:
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
