"""Deterministic, resumable, rank-sharded batches of token windows from an indexed split.

The token stream of a split is the concatenation of its documents (each ends with EOS). Sample
`i` is the window `stream[i*L : i*L + L + 1]`: its first L tokens are the inputs, its last L the
labels, so consecutive samples share one token; the `(total - 1) % L` tokens after the last
whole window are never used. Batches are pure functions of their arguments and the files, so a
resumed run simply asks for the step it stopped at.
"""

from __future__ import annotations

from collections.abc import Sequence
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
        self.prefix = prefix
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


Part = tuple[Path, float]
"""A blend's part: the prefix of one prepared split and its weight."""

BLOCK = 1 << 16
"""Sample positions per block of a blend: every block holds each part's share of it, to within one."""


class Blend:
    """Global sample positions → (part, sample) over the splits of several datasets, in proportion to weights.

    Positions run in blocks of `BLOCK`. Before block `b`, part `k` has had
    ⌊W_k·b·BLOCK⌋ − ⌊W_{k−1}·b·BLOCK⌋ positions (W the cumulative normalised weights): its share of
    them to within one sample, computed without walking the blocks before (a resumed run starts at
    once, and nothing grows with the run's length). Within a block the parts' positions are
    interleaved by a permutation seeded with (seed, b) (part after part without `shuffle`), each
    part's own positions in order. A part's n-th position is position n of its own epoch order
    (`epoch_order`): each part cycles through its epochs independently. One part is the split
    itself: position p is its position p.
    """

    def __init__(self, windows: list[TokenWindows], weights: Sequence[float], seed: int, shuffle: bool):
        for part in windows:
            if part.num_samples < 1:
                raise ValueError(f"{part.prefix}: no sample of {part.seq_len + 1} tokens")
        self.windows = windows
        self.cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)) / float(np.sum(weights))
        self.cumulative[-1] = 1.0
        self.seed = seed
        self.shuffle = shuffle
        self._block = lru_cache(maxsize=2)(self._layout)

    @classmethod
    def of(cls, parts: Path | Sequence[Part], seq_len: int, seed: int, shuffle: bool) -> Blend:
        """The blend of one split's prefix (weight 1) or of weighted prefixes."""
        parts = [(parts, 1.0)] if isinstance(parts, Path) else list(parts)
        return cls([TokenWindows(prefix, seq_len) for prefix, _ in parts], [w for _, w in parts], seed, shuffle)

    def samples(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part, sample within the part) of each position."""
        parts, within = self._locate(positions)
        samples = np.empty_like(within)
        for k in np.unique(parts):
            mine = parts == k
            samples[mine] = epoch_order(within[mine], self.windows[k].num_samples, self.seed, self.shuffle)
        return parts, samples

    def rows(self, parts: np.ndarray, samples: np.ndarray) -> torch.Tensor:
        """The windows of (part, sample) pairs, stacked in their order: [len(samples), seq_len + 1] int64."""
        out = torch.empty(len(samples), self.windows[0].seq_len + 1, dtype=torch.int64)
        for k in np.unique(parts):
            mine = parts == k
            out[torch.from_numpy(mine)] = self.windows[k].rows(samples[mine])
        return out

    def _locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part, the part's own position) of each global position."""
        if len(self.windows) == 1:
            return np.zeros_like(positions), positions
        blocks, offsets = np.divmod(positions, BLOCK)
        parts, within = np.empty_like(positions), np.empty_like(positions)
        for block in np.unique(blocks):
            mine = blocks == block
            labels, own = self._block(int(block))
            parts[mine], within[mine] = labels[offsets[mine]], own[offsets[mine]]
        return parts, within

    def _layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(part, the part's own position) of every position of one block: each part's positions in order."""
        before = self.taken(block * BLOCK)
        counts = self.taken((block + 1) * BLOCK) - before
        labels = np.repeat(np.arange(len(counts)), counts)
        if self.shuffle:
            labels = labels[np.random.default_rng((self.seed, 1 << 32, block)).permutation(BLOCK)]
        own = np.empty(BLOCK, dtype=np.int64)
        for k, count in enumerate(counts):
            own[labels == k] = before[k] + np.arange(count)
        return labels, own

    def taken(self, count: int) -> np.ndarray:
        """How many of the first `count` positions (a multiple of BLOCK, or any count of the apportioned
        evaluation set) fall to each part: ⌊W_k·count⌋ − ⌊W_{k−1}·count⌋."""
        return np.diff(np.floor(self.cumulative * count).astype(np.int64), prepend=0)


class TokenBatches:
    """This rank's deterministic share of each global batch of the training split(s).

    `parts` is one split's prefix, or a weighted blend of several (`Blend`). The global sample
    order of one split runs through epochs back to back: position `p` is sample `perm_e[p % N]`
    of epoch `e = p // N` (N = `num_samples`), where `perm_e` is the permutation drawn from
    `numpy.random.default_rng((seed, e))` (the identity when `shuffle` is False). A global batch
    that straddles an epoch boundary takes the end of one epoch and the start of the next, so
    every epoch visits each sample exactly once and nothing is dropped; a run that stops
    mid-epoch has simply not visited the rest of that epoch. The global batch of step `s` is
    positions `[s*G, (s+1)*G)`; rank `r` takes the contiguous rows `[r*G/W, (r+1)*G/W)` of it,
    cut into `accumulation_steps` micro-batches in order, so the global rows of a step do not
    depend on the world size.
    """

    def __init__(self, parts: Path | Sequence[Part], seq_len: int, global_batch: int, micro_batch: int,
                 rank: int, world_size: int, seed: int, shuffle: bool = True):
        _check_layout(global_batch, micro_batch, rank, world_size)
        self.blend = Blend.of(parts, seq_len, seed, shuffle)
        self.num_samples = sum(part.num_samples for part in self.blend.windows)
        if len(self.blend.windows) == 1 and self.num_samples < global_batch:
            raise ValueError(f"{self.blend.windows[0].prefix}: {self.num_samples} samples of {seq_len + 1} tokens "
                             f"are fewer than one global batch of {global_batch}")
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.rank = rank
        self.world_size = world_size
        self.accumulation_steps = global_batch // (micro_batch * world_size)

    def sample_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(part, sample) of this rank's rows of optimizer step `step`, in order."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        per_rank = self.global_batch // self.world_size
        first = step * self.global_batch + self.rank * per_rank
        return self.blend.samples(np.arange(first, first + per_rank))

    def micro_batches(self, step: int) -> list[Batch]:
        """(input_ids, labels), each [micro_batch, seq_len] int64, for optimizer step `step` (0-based) on this rank."""
        rows = self.blend.rows(*self.sample_ids(step))
        return [_as_batch(part) for part in rows.split(self.micro_batch)]


def eval_batches(parts: Path | Sequence[Part], seq_len: int, micro_batch: int, rank: int, world_size: int,
                 sequences: int | None) -> list[Batch]:
    """This rank's micro-batches of the first `sequences` samples of the validation split(s), in order, unshuffled.

    Of a blend, part k gives its first ⌊W_k·S⌋ − ⌊W_{k−1}·S⌋ samples of the S (`Blend.taken`), the
    parts one after another, so the token-weighted mean is the blend's. The samples (when
    `sequences` is None, the most that no part runs out of, rounded down to a multiple of
    `world_size`) are divided between ranks in contiguous, equal slices, so every rank runs the
    same number of forwards and the token-weighted mean over all ranks is the mean over exactly
    those samples, whatever the world size.
    """
    _check_layout(world_size * micro_batch, micro_batch, rank, world_size)
    blend = Blend.of(parts, seq_len, 0, False)
    available = np.array([part.num_samples for part in blend.windows])
    total = _largest_apportioned(blend, available, world_size) if sequences is None else sequences
    if total % world_size:
        raise ValueError(f"{total} evaluation sequences do not divide between {world_size} ranks")
    counts = blend.taken(total)
    if total < 1 or np.any(counts > available):
        raise ValueError(f"{', '.join(str(w.prefix) for w in blend.windows)}: "
                         f"{', '.join(map(str, available))} samples of {seq_len + 1} tokens; {total} requested")
    part_of = np.repeat(np.arange(len(counts)), counts)
    sample_of = np.concatenate([np.arange(n) for n in counts])
    per_rank = total // world_size
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    rows = blend.rows(part_of[mine], sample_of[mine])
    return [_as_batch(part) for part in rows.split(micro_batch)]


def epoch_order(positions: np.ndarray, num_samples: int, seed: int, shuffle: bool) -> np.ndarray:
    """The samples at `positions` of one split's order: epoch after epoch, each a seeded permutation."""
    epochs, offsets = np.divmod(positions, num_samples)
    if not shuffle:
        return offsets
    samples = np.empty_like(offsets)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        samples[in_epoch] = _epoch_order(num_samples, seed, int(epoch))[offsets[in_epoch]]
    return samples


def _largest_apportioned(blend: Blend, available: np.ndarray, world_size: int) -> int:
    """The largest multiple of `world_size` whose apportionment takes no more samples of a part than it has."""
    total = int(np.min(available / np.diff(blend.cumulative, prepend=0.0)))
    total -= total % world_size
    while total > 0 and np.any(blend.taken(total) > available):
        total -= world_size
    return total


def _check_layout(global_batch: int, micro_batch: int, rank: int, world_size: int) -> None:
    if micro_batch < 1 or world_size < 1:
        raise ValueError(f"micro_batch ({micro_batch}) and world_size ({world_size}) must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if global_batch < 1 or global_batch % (micro_batch * world_size):
        raise ValueError(f"global batch {global_batch} is not a positive multiple of micro_batch × world_size "
                         f"= {micro_batch} × {world_size} = {micro_batch * world_size}")


@lru_cache(maxsize=16)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng((seed, epoch)).permutation(num_samples)
    order.flags.writeable = False
    return order


def _as_batch(rows: torch.Tensor) -> Batch:
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
