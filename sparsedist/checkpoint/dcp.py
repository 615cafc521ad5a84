"""torch DCP folders: the checkpoint format of backends whose state is a DTensor/plain state dict (one
process, FSDP2). Every rank writes its shards; any world size reads them back (DCP reshards)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from sparsedist.parallel.backend import ParallelBackend


def save(path: Path, backend: ParallelBackend, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write model and optimizer state under `path` (all ranks)."""
    dcp.save(backend.sharded_state(model, optimizer), checkpoint_id=path)


def load(path: Path, backend: ParallelBackend, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Restore what `save` wrote, at this world size; without an optimizer, the model only. An optimizer with
    an `init_state()` creates its state there, instead of by DCP's zero step."""
    if optimizer is not None and hasattr(optimizer, "init_state"):
        optimizer.init_state()
    state = backend.sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    backend.load_sharded_state(model, optimizer, state)
