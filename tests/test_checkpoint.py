"""Checkpoint integrity: a save killed half-way is never chosen, and a damaged file is named on load."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sparsedist.checkpoint.checkpointer import TRAINER_FILE, Checkpointer
from sparsedist.checkpoint.manifest import MANIFEST_FILE
from sparsedist.checkpoint.publish import staging_dir
from sparsedist.config.schema import ParallelConfig
from sparsedist.errors import CheckpointError
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity.store import MaskStore


@pytest.fixture
def saved(tmp_path):
    backend = ParallelBackend(ParallelConfig(backend="none"), Runtime(0, 1, 0, torch.device("cpu")))
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    checkpointer = Checkpointer(tmp_path / "checkpoints", keep=3, backend=backend, store=MaskStore(backend, m=4))
    for step in (1, 2):
        checkpointer.save(step, model, optimizer, {"tokens": step})
    return checkpointer, model, optimizer


def shards(path):
    return sorted(f for f in path.rglob("*") if f.is_file() and f.name not in (MANIFEST_FILE, TRAINER_FILE))


def test_the_manifest_lists_every_file_with_its_size(saved):
    checkpointer, model, optimizer = saved
    path = checkpointer.latest()
    files = json.loads((path / MANIFEST_FILE).read_text())["files"]
    assert set(files) == {str(f.relative_to(path)) for f in [*shards(path), path / TRAINER_FILE]}
    assert all(entry["bytes"] == (path / name).stat().st_size for name, entry in files.items())
    assert checkpointer.load(path, model, optimizer)["step"] == 2


def test_a_save_killed_before_its_rename_leaves_the_previous_checkpoint_newest(saved):
    checkpointer, model, optimizer = saved
    torn = staging_dir(checkpointer.root / "step_00000003")
    (checkpointer.latest()).rename(torn)  # a complete-looking folder that was never published
    assert checkpointer.latest().name == "step_00000001"
    assert checkpointer.load(checkpointer.latest(), model, optimizer)["step"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_shard_is_refused_naming_the_file(saved, damage):
    checkpointer, model, optimizer = saved
    path = checkpointer.latest()
    shard = max(shards(path), key=lambda f: f.stat().st_size)
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        shard.unlink()
    expected = {"truncate": r"has \d+ bytes, the manifest \d+", "flip": "does not match its SHA-256",
                "delete": "is missing"}
    with pytest.raises(CheckpointError, match=f"{re.escape(str(shard.relative_to(path)))} {expected[damage]}"):
        checkpointer.load(path, model, optimizer)
