"""Checkpoints as flat pieces with offsets: the format of backends whose shards are flat slices (ZeRO).

Each rank writes `rank_<r>.pt`: {"pieces": {name: (start, flat tensor)}, "optimizer_step": n},
where `name` is a model parameter or buffer, or `param@key` for an optimizer moment of it. A
sparse layer's mask is saved by the mask store as the flat bool mask of the weight piece (its
packed layout depends on the world size; the elements of the weight do not). Any reader, at
any world size and with any sharding, assembles the full flat tensor of a name from every
rank's pieces and keeps the range it owns.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparsedist.errors import CheckpointError
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.store import MaskStore

Pieces = dict[str, list[tuple[int, torch.Tensor]]]


def is_piece_checkpoint(path: Path) -> bool:
    return any(path.glob("rank_*.pt"))


def write_pieces(path: Path, rank: int, pieces: dict[str, tuple[int, torch.Tensor]], optimizer_step: int) -> None:
    """Write one rank's file."""
    torch.save({"pieces": pieces, "optimizer_step": optimizer_step}, path / f"rank_{rank}.pt")


def read_pieces(path: Path) -> tuple[Pieces, list[dict]]:
    """Every rank's pieces by name, and each file's other entries."""
    files = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in sorted(path.glob("rank_*.pt"))]
    if not files:
        raise CheckpointError(f"checkpoint.resume: {path} holds no pieces (rank_*.pt)")
    saved: Pieces = {}
    for f in files:
        for name, entry in f.pop("pieces").items():
            saved.setdefault(name, []).append(entry)
    return saved, files


def assemble(saved: Pieces, name: str, numel: int) -> torch.Tensor:
    """The full flat tensor `name` from the pieces every rank saved; fails unless they cover it exactly."""
    if name not in saved:
        raise CheckpointError(f"checkpoint: no saved state for {name}")
    full = torch.zeros(numel, dtype=saved[name][0][1].dtype)
    covered = 0
    for start, tensor in saved[name]:
        full.narrow(0, start, tensor.numel()).copy_(tensor)
        covered += tensor.numel()
    if covered != numel:
        raise CheckpointError(f"checkpoint: the saved pieces of {name} cover {covered} of {numel} elements")
    return full


class PieceCheckpoint:
    """A piece checkpoint read back (`parallel.backend.SavedState`)."""

    def __init__(self, path: Path):
        self.saved, files = read_pieces(path)
        self.optimizer_step = max(f.get("optimizer_step", 0) for f in files)
        self.moment_keys = sorted({name.split("@")[1] for name in self.saved if "@" in name})

    def full(self, name: str, numel: int) -> torch.Tensor:
        return assemble(self.saved, name, numel)


def save(path: Path, backend: ParallelBackend, store: MaskStore, model: nn.Module,
         optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's pieces of model, optimizer and masks under `path` (all ranks)."""
    pieces = backend.state_pieces(model, optimizer, skip=store.state_names())
    pieces.update(store.state_pieces())
    write_pieces(path, backend.runtime.rank, pieces, backend.optimizer_step(optimizer))


@torch.no_grad()
def load(path: Path, backend: ParallelBackend, store: MaskStore, model: nn.Module,
         optimizer: torch.optim.Optimizer | None) -> None:
    """Restore what `save` wrote into any backend and world size (the optimizer where the backend saves pieces)."""
    saved = PieceCheckpoint(path)
    backend.load_pieces(model, optimizer, saved, skip=store.state_names())
    store.load_state(saved.full)
