"""Checkpoints as flat pieces with offsets: the format of backends whose shards are flat slices.

Each rank writes `rank_<r>.pt`: {"pieces": {name: (start, flat tensor)}, ...}, where
`name` is a model parameter or buffer, or `param@key` for an optimizer moment of it. A
sparse layer's mask is saved as the flat bool mask of the weight piece (its packed layout
depends on the world size; the elements of the weight do not).
Any reader, at any world size and with any sharding, assembles the full flat tensor of
a name from every rank's pieces and keeps the range it owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsedist.sparsity.layer import SparseLinear, sparse_layers

Pieces = dict[str, list[tuple[int, torch.Tensor]]]


def is_piece_checkpoint(path: Path) -> bool:
    return any(path.glob("rank_*.pt"))


def write_pieces(path: Path, rank: int, pieces: dict[str, tuple[int, torch.Tensor]], extra: dict[str, Any]) -> None:
    torch.save({"pieces": pieces, **extra}, path / f"rank_{rank}.pt")


def read_pieces(path: Path) -> tuple[Pieces, list[dict[str, Any]]]:
    """Every rank's pieces by name, and each file's other entries."""
    files = [torch.load(f, map_location="cpu", mmap=True, weights_only=True) for f in sorted(path.glob("rank_*.pt"))]
    if not files:
        raise FileNotFoundError(f"checkpoint.resume: {path} holds no pieces (rank_*.pt)")
    saved: Pieces = {}
    for f in files:
        for name, entry in f.pop("pieces").items():
            saved.setdefault(name, []).append(entry)
    return saved, files


def assemble(saved: Pieces, name: str, numel: int) -> torch.Tensor:
    """The full flat tensor `name` from the pieces every rank saved; fails unless they cover it exactly."""
    if name not in saved:
        raise KeyError(f"checkpoint: no saved state for {name}")
    full = torch.zeros(numel, dtype=saved[name][0][1].dtype)
    covered = 0
    for start, tensor in saved[name]:
        full.narrow(0, start, tensor.numel()).copy_(tensor)
        covered += tensor.numel()
    if covered != numel:
        raise RuntimeError(f"checkpoint: the saved pieces of {name} cover {covered} of {numel} elements")
    return full


def assemble_mask(saved: Pieces, name: str, layer: SparseLinear) -> torch.Tensor:
    """The [out, in] bool mask of a sparse layer, saved as the bool masks of weight pieces."""
    return assemble(saved, name, layer.out_features * layer.in_features).view(layer.out_features, -1)


@torch.no_grad()
def load_module(path: Path, module: nn.Module) -> None:
    """Fill an unsharded module's parameters and buffers from a piece checkpoint."""
    saved, _ = read_pieces(path)
    masks = {f"{name}.mask": layer for name, layer in sparse_layers(module)}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name in masks:
            tensor.copy_(masks[name].pack(assemble_mask(saved, name, masks[name])))
        else:
            tensor.copy_(assemble(saved, name, tensor.numel()).reshape(tensor.shape))
