"""Sharded checkpoints, written atomically.

Layout: `<dir>/step_00000100/` holds the backend's shard files (torch DCP under FSDP2;
per-rank pieces under DeepSpeed), `trainer.json` (step, tokens, tracking run...) and
`manifest.json` (size and SHA-256 of every file). Every rank writes into
`.step_00000100.partial/`; once all are done, rank 0 writes `trainer.json`, the ranks hash
the files, rank 0 writes the manifest and publishes the folder (`checkpoint/publish.py`), so a
step directory exists only when it is complete: a run killed while saving leaves the previous
one as the newest. Loading verifies the manifest first. Resuming picks the newest complete one;
a checkpoint may be loaded at another world size (both backends reshard).
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

from sparsedist.checkpoint.manifest import verify_manifest, write_manifest
from sparsedist.checkpoint.publish import prepare, publish, staging_dir
from sparsedist.parallel.backend import ParallelBackend

TRAINER_FILE = "trainer.json"


class Checkpointer:
    """Saves and restores model, optimizer and trainer state under one folder."""

    def __init__(self, root: Path, keep: int, backend: ParallelBackend):
        self.root = root
        self.keep = keep
        self.backend = backend
        self.is_main = backend.runtime.is_main

    def complete_steps(self) -> list[Path]:
        """Complete step folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if p.suffix != ".tmp" and (p / TRAINER_FILE).is_file()]
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
        self.backend.save_state(staging, model, optimizer)
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
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no {TRAINER_FILE})")
        verify_manifest(path)
        self.backend.load_state(path, model, optimizer)
        return json.loads((path / TRAINER_FILE).read_text())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
