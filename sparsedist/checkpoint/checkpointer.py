"""Sharded checkpoints, written atomically, in the format of the run's backend.

Layout: `<dir>/step_00000100/` holds the shard files (torch DCP, dcp.py, for one process and
FSDP2; per-rank flat pieces, pieces.py, under DeepSpeed), `trainer.json` (step, tokens, tracking run...) and
`manifest.json` (size and SHA-256 of every file). Every rank writes into
`.step_00000100.partial/`; once all are done, rank 0 writes `trainer.json`, the ranks hash
the files, rank 0 writes the manifest and publishes the folder (publish.py), so a step
directory exists only when it is complete: a run killed while saving leaves the previous
one as the newest.
Loading verifies the manifest first. Resuming picks the newest complete one; a checkpoint
may be loaded at another world size (both backends reshard).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from sparsedist.checkpoint import dcp, pieces
from sparsedist.checkpoint.manifest import verify_manifest, write_manifest
from sparsedist.checkpoint.publish import prepare, publish, staging_dir
from sparsedist.errors import CheckpointError
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.store import MaskStore

TRAINER_FILE = "trainer.json"


class Checkpointer:
    """Saves and restores model, optimizer and trainer state under one folder."""

    def __init__(self, root: Path, keep: int, backend: ParallelBackend, store: MaskStore):
        self.root = root
        self.keep = keep
        self.backend = backend
        self.store = store
        self.is_main = backend.runtime.is_main

    def complete_steps(self) -> list[Path]:
        """Complete step folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if (p / TRAINER_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))

    def latest(self) -> Path | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, step: int, model: nn.Module, optimizer: Optimizer, trainer_state: dict[str, Any]) -> Path:
        final = self.root / f"step_{step:08d}"
        staging = staging_dir(final)
        if self.is_main:
            prepare(final)  # clears what an interrupted save left
        _barrier()
        if self.backend.checkpoint_format == "pieces":
            pieces.save(staging, self.backend, self.store, model, optimizer)
        else:
            dcp.save(staging, self.backend, model, optimizer)
        _barrier()
        if self.is_main:
            _write_json(staging / TRAINER_FILE, {**trainer_state, "step": step})
        _barrier()
        write_manifest(staging)
        if self.is_main:
            publish(final)
            for old in self.complete_steps()[: -self.keep]:
                shutil.rmtree(old)
        _barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        """Verify the manifest, restore model and optimizer in place; returns the trainer state."""
        if not (path / TRAINER_FILE).is_file():
            raise CheckpointError(f"checkpoint.resume: {path} is not a complete checkpoint (no {TRAINER_FILE})")
        verify_manifest(path)
        load_state(path, self.backend, self.store, model, optimizer)
        return json.loads((path / TRAINER_FILE).read_text())


def load_state(path: Path, backend: ParallelBackend, store: MaskStore, model: nn.Module,
               optimizer: Optimizer | None) -> None:
    """Restore a checkpoint folder into `model` (and `optimizer`), in whichever format it was written."""
    if pieces.is_piece_checkpoint(path):
        pieces.load(path, backend, store, model, optimizer)
    elif backend.checkpoint_format == "dcp":
        dcp.load(path, backend, model, optimizer)
    else:
        raise CheckpointError(f"checkpoint.resume: {path} is a DCP checkpoint; parallel.backend "
                              f"{backend.cfg.backend} reads the piece checkpoints it writes")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
