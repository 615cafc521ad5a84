"""Host-device synchronisation: a training step reads at most one value back to the host (the gradient norm
that decides the non-finite skip) outside logging steps, whatever the number of micro-batches; constant lookup
tables reach a device once per device and dtype.

A read-back is `aten._local_scalar_dense`, what `.item()`, `float(t)`, `int(t)` and `bool(t)` dispatch, or a
`Tensor.tolist()` (which dispatches nothing on the CPU, so it is counted by wrapping it). On the CPU every read
counts, so the counter sets two kinds apart rather than calling them syncs: the host-side `step` counters of
torch's own optimizers (AdamW keeps them on the CPU and reads them per parameter: host memory on a GPU too) and
transformers' packed-sequence check in its causal-mask creation (a real sync per forward, in third-party code;
docs/architecture.md, "Host-device synchronisation").
"""

from __future__ import annotations

import functools
import sys
from collections import Counter

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import MICRO, micro_overrides
from sparsedist.config import load_recipe
from sparsedist.sparsity.masks import _BYTE_VALUES, count_ones, device_table, pack_mask, unpack_mask
from sparsedist.sparsity.transposable import transposable_mask
from sparsedist.train import trainer as trainer_module
from sparsedist.train.preemption import Preemption

STEPS, LOG_INTERVAL, AGREEMENT_INTERVAL = 6, 3, 4
LOGGED = {done - 1 for done in range(1, STEPS + 1) if done % LOG_INTERVAL == 0}  # 0-based steps: {2, 5}
AGREED = {done - 1 for done in range(1, STEPS) if done % AGREEMENT_INTERVAL == 0}  # {3}


class ReadBacks(TorchDispatchMode):
    """Counts `aten._local_scalar_dense` by kind: "sync", "optimizer_counter", "transformers_mask"."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.optimizer: torch.optim.Optimizer | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts[self._kind(args[0])] += 1
        return func(*args, **(kwargs or {}))

    def _kind(self, tensor: torch.Tensor) -> str:
        if self.optimizer is not None and isinstance(self.optimizer, torch.optim.AdamW) and tensor.device.type == "cpu":
            counters = {state["step"].data_ptr() for state in self.optimizer.state.values() if "step" in state}
            if tensor.data_ptr() in counters:
                return "optimizer_counter"
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_name == "find_packed_sequence_indices" and "transformers" in frame.f_code.co_filename:
                return "transformers_mask"
            frame = frame.f_back
        return "sync"


def read_backs_per_step(corpus, tmp_path, monkeypatch, method: str, micro_batches: int) -> list[Counter[str]]:
    """The read-backs of each optimizer step of a micro run (2 layers, `micro_batches` of 4 sequences a step),
    from the start of one step to the start of the next (its logging, refresh and agreement included)."""
    data = yaml.safe_load(MICRO.read_text())
    data["sparsity"] = {"method": method} | ({} if method == "dense" else {"refresh_interval": 2})
    out = tmp_path / f"{method}-{micro_batches}"
    out.mkdir()
    (out / "recipe.yaml").write_text(yaml.safe_dump(data))
    recipe = load_recipe(out / "recipe.yaml", micro_overrides(
        corpus, out, f"train.steps={STEPS}", f"train.global_batch={4 * micro_batches}", "train.micro_batch=4",
        f"train.log_interval={LOG_INTERVAL}", "checkpoint.interval=1000", "eval.interval=1000",
        "checkpoint.export=false", "tracking.enabled=false"))
    mode, marks, tables = ReadBacks(), [], []
    train_step = trainer_module.Trainer.train_step

    def marked_step(self, step):
        mode.optimizer = self.optimizer
        marks.append(mode.counts.copy())
        tables.append(device_table.cache_info().misses)
        return train_step(self, step)

    tolist = torch.Tensor.tolist

    def counted_tolist(tensor):
        mode.counts["sync"] += 1
        return tolist(tensor)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module.Trainer, "train_step", marked_step)
        patch.setattr(torch.Tensor, "tolist", counted_tolist)
        patch.setattr(trainer_module, "Preemption", functools.partial(Preemption, interval=AGREEMENT_INTERVAL))
        with mode:
            trainer_module.run_training(recipe)
    marks.append(mode.counts.copy())
    assert len(set(tables[1:])) <= 1, f"lookup tables built after the first step: misses {tables}"
    return [marks[i + 1] - marks[i] for i in range(STEPS)]


@pytest.mark.parametrize("method", ["dense", "srste", "cast", "sparse_pretrain"])
def test_a_step_reads_back_at_most_once_outside_logging_steps(corpus, tmp_path, monkeypatch, method):
    syncs = {}
    for micro_batches in (2, 4):
        steps = read_backs_per_step(corpus, tmp_path, monkeypatch, method, micro_batches)
        syncs[micro_batches] = [counts["sync"] for counts in steps[:-1]]  # the last step also finishes the run
        for step, counts in enumerate(steps[:-1]):
            if step not in LOGGED:
                budget = 2 if step in AGREED else 1  # the gradient norm; and the preemption agreement
                assert counts["sync"] <= budget, f"{method}, {micro_batches} micro-batches, step {step}: {counts}"
            assert counts["transformers_mask"] <= micro_batches
    assert syncs[2] == syncs[4], f"{method}: read-backs grow with micro-batches: {syncs}"


def test_lookup_tables_are_built_once_per_device_and_dtype():
    torch.manual_seed(0)
    weight = torch.randn(8, 16)
    bits = pack_mask(weight > 0)
    device_table.cache_clear()
    for _ in range(3):
        unpack_mask(bits, 16, torch.float32)
        unpack_mask(bits, 16, torch.bfloat16)
        count_ones(bits)
        transposable_mask(weight)
    info = device_table.cache_info()
    assert info.misses == 5  # byte values in 2 dtypes, popcounts, transposable patterns and their scores
    assert info.hits == 3 * 5 - 5
    table = device_table(_BYTE_VALUES, bits.device, torch.float32)
    assert device_table(_BYTE_VALUES, bits.device, torch.float32) is table
    assert device_table(_BYTE_VALUES, bits.device, torch.bfloat16) is not table
