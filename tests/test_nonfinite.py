"""Numerical faults: a NaN loss at some steps skips their updates; too many in a row stop the run, and no
checkpoint ever holds a NaN. The NaN enters the real loss, so it flows through the real backward."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from conftest import MICRO, metric_history, micro_overrides
from sparsedist.config import load_recipe
from sparsedist.errors import NonFiniteError
from sparsedist.train import trainer as trainer_module

POISONED = {2, 3}  # 0-based optimizer steps whose loss is NaN


@pytest.fixture
def poisoned_loss(monkeypatch):
    state = {"step": -1}
    train_step, training_loss = trainer_module.Trainer.train_step, trainer_module.training_loss

    def tracked_step(self, step):
        state["step"] = step
        return train_step(self, step)

    def loss(*args, **kwargs):
        value, parts = training_loss(*args, **kwargs)
        return (value * math.nan, parts) if state["step"] in POISONED else (value, parts)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", tracked_step)
    monkeypatch.setattr(trainer_module, "training_loss", loss)


def checkpoint_values(path):
    """Every tensor of a DCP checkpoint, read back."""
    import torch.distributed.checkpoint as dcp

    metadata = FileSystemReader(str(path)).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=path)
    return state


def test_nan_steps_are_skipped_and_the_run_finishes(corpus, tmp_path, poisoned_loss):
    out = tmp_path / "run"
    recipe = load_recipe(MICRO, micro_overrides(corpus, out, "train.max_nonfinite_steps=2", "checkpoint.interval=2"))
    final = trainer_module.run_training(recipe)
    assert math.isfinite(final["final_val_loss"])
    norms = metric_history(out, "grad_norm")
    assert [step for step, norm in norms.items() if not math.isfinite(norm)] == [s + 1 for s in sorted(POISONED)]
    for step_dir in (out / "checkpoints").glob("step_*"):
        assert all(torch.isfinite(t).all() for t in checkpoint_values(step_dir).values()), step_dir


def test_more_nan_steps_in_a_row_than_allowed_stop_the_run(corpus, tmp_path, poisoned_loss):
    out = tmp_path / "run"
    recipe = load_recipe(MICRO, micro_overrides(corpus, out, "train.max_nonfinite_steps=1", "checkpoint.interval=2"))
    with pytest.raises(NonFiniteError, match=r"train.max_nonfinite_steps: 2 steps in a row .* step 3"):
        trainer_module.run_training(recipe)
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002"]
