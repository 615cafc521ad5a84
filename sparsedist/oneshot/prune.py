"""One-shot N:M pruning of a model's linears, block by block on calibration data."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparsedist.models.families import Family
from sparsedist.oneshot.alps import alps
from sparsedist.oneshot.blocks import BlockInputs, capture_block_inputs
from sparsedist.oneshot.scores import magnitude, wanda
from sparsedist.oneshot.sparsegpt import sparsegpt
from sparsedist.oneshot.statistics import InputStatistics, Statistic, reconstruction_error, recording_inputs

logger = logging.getLogger(__name__)

Targets = Sequence[tuple[str, nn.Linear]] | Sequence[str]
"""Full module names of the linears to prune, or `target_linears`' (name, linear) pairs."""


@dataclass(frozen=True)
class OneShotMethod:
    """A pruning criterion and the statistic of its layer's inputs it needs (None: no calibration)."""

    statistic: Statistic | None
    criterion: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    """(weight, [feature norms | XᵀX,] n, m, **options) -> (pruned weight, bool mask)."""

    def options(self) -> set[str]:
        """The keyword options the criterion accepts."""
        parameters = inspect.signature(self.criterion).parameters.values()
        return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def prune(self, weight: torch.Tensor, stats: InputStatistics | None, n: int, m: int,
              options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.statistic is None:
            return self.criterion(weight, n, m, **options)
        inputs = stats.feature_norms() if self.statistic == "norms" else stats.gram()
        return self.criterion(weight, inputs, n, m, **options)


METHODS: dict[str, OneShotMethod] = {
    "magnitude": OneShotMethod(None, magnitude),
    "wanda": OneShotMethod("norms", wanda),
    "sparsegpt": OneShotMethod("gram", sparsegpt),
    "alps": OneShotMethod("gram", alps),
}


@torch.no_grad()
def prune_oneshot(model: nn.Module, family: Family, targets: Targets, method: str,
                  calibration: Sequence[torch.Tensor] = (), n: int = 2, m: int = 4,
                  **options) -> dict[str, torch.Tensor]:
    """Prune every target weight in place to exactly N:M; returns each bool mask by full module name.

    `calibration` (input_ids batches [b, seq]) feeds the methods that look at the inputs
    (all but magnitude). They run block by block, as SparseGPT does: the embeddings run once
    to capture the first block's inputs; then each block runs on its inputs with hooks
    accumulating its target linears' input statistics, its targets are pruned, and the pruned
    block runs again to turn its inputs into the next block's. Only one block's inputs are
    held at a time, and each block is calibrated on the outputs of the already pruned ones.
    `options` go to the method's criterion (e.g. `percdamp`, `blocksize` for sparsegpt).
    """
    if method not in METHODS:
        raise ValueError(f"unknown one-shot method {method!r}; choose from {sorted(METHODS)}")
    spec = METHODS[method]
    unknown = set(options) - spec.options()
    if unknown:
        raise TypeError(f"{method} takes no option(s) {sorted(unknown)}; it takes {sorted(spec.options())}")
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < n < m, got {n}:{m}")
    layers = _layers_by_block(model, family, targets, m)
    if spec.statistic is None:
        return {name: _prune_layer(name, linear, spec, None, n, m, options)
                for block_layers in layers.values() for name, linear in block_layers.items()}
    if not calibration:
        raise ValueError(f"{method} needs calibration batches")
    training = model.training
    model.eval()
    try:
        return _prune_block_by_block(model, family, layers, spec, list(calibration), n, m, options)
    finally:
        model.train(training)


def _prune_block_by_block(model: nn.Module, family: Family, layers: dict[int, dict[str, nn.Linear]],
                          spec: OneShotMethod, calibration: list[torch.Tensor], n: int, m: int,
                          options: dict) -> dict[str, torch.Tensor]:
    blocks = family.blocks(model)
    inputs = capture_block_inputs(model, family, calibration)
    last = max(layers)
    masks = {}
    for index in range(last + 1):
        if index in layers:
            masks.update(_prune_block(blocks[index], layers[index], inputs, spec, n, m, options))
        if index < last:
            inputs.advance(blocks[index])
    return masks


def _prune_block(block: nn.Module, layers: dict[str, nn.Linear], inputs: BlockInputs, spec: OneShotMethod,
                 n: int, m: int, options: dict) -> dict[str, torch.Tensor]:
    """Record the inputs of the block's target linears on the (unpruned) block, then prune them."""
    with recording_inputs(layers, spec.statistic) as stats:
        inputs.run(block)
    return {name: _prune_layer(name, linear, spec, stats[name], n, m, options) for name, linear in layers.items()}


def _prune_layer(name: str, linear: nn.Linear, spec: OneShotMethod, stats: InputStatistics | None,
                 n: int, m: int, options: dict) -> torch.Tensor:
    started = time.perf_counter()
    pruned, mask = spec.prune(linear.weight, stats, n, m, options)
    if stats is not None and stats.statistic == "gram":
        dense = reconstruction_error(linear.weight, torch.zeros_like(linear.weight), stats.gram())
        error = reconstruction_error(linear.weight, pruned, stats.gram()) / max(dense, torch.finfo(torch.float64).tiny)
        logger.info("%s: %d:%d in %.2fs, relative reconstruction error %.4g", name, n, m,
                    time.perf_counter() - started, error)
    else:
        logger.info("%s: %d:%d in %.2fs", name, n, m, time.perf_counter() - started)
    linear.weight.copy_(pruned)
    return mask


def _layers_by_block(model: nn.Module, family: Family, targets: Targets, m: int) -> dict[int, dict[str, nn.Linear]]:
    """The target linears grouped by the index of the block that holds them, in block order."""
    prefix = f"{family.blocks_path}."
    grouped: dict[int, dict[str, nn.Linear]] = {}
    for target in targets:
        name = target if isinstance(target, str) else target[0]
        index, _, inner = name.removeprefix(prefix).partition(".")
        if not (name.startswith(prefix) and index.isdigit() and inner):
            raise ValueError(f"{name} is not a layer inside a block of {family.blocks_path}")
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        if linear.in_features % m:
            raise ValueError(f"{name} has {linear.in_features} inputs, not a multiple of m = {m}")
        grouped.setdefault(int(index), {})[name] = linear
    return dict(sorted(grouped.items()))
