"""Sharded checkpoints with torch DCP, written atomically.

Layout: `<dir>/step_00000100/` holds DCP's shard files and `.metadata` plus
`trainer.json` (step, tokens, tracking run...). Every rank writes into
`step_00000100.tmp/`; once all are done, rank 0 writes `trainer.json` and renames the
folder, so a step directory exists only when it is complete. Resuming picks the
newest complete one; a checkpoint may be loaded at another world size (DCP reshards).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

TRAINER_FILE = "trainer.json"


class Checkpointer:
    """Saves and restores model, optimizer and trainer state under one folder."""

    def __init__(self, root: Path, keep: int, is_main: bool):
        self.root = root
        self.keep = keep
        self.is_main = is_main

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
        staging = final.with_suffix(".tmp")
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
            staging.mkdir(parents=True)
        _barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=staging)
        _barrier()
        if self.is_main:
            _write_json(staging / TRAINER_FILE, {**trainer_state, "step": step})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            for old in self.complete_steps()[: -self.keep]:
                shutil.rmtree(old)
        _barrier()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        """Restore model and optimizer in place; returns the trainer state."""
        if not (path / TRAINER_FILE).is_file():
            raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no {TRAINER_FILE})")
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return json.loads((path / TRAINER_FILE).read_text())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
