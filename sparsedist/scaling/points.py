"""The points each law is fitted to, built from run records, with the checks that make the runs comparable.

tokens      per model, every point of the learning curves of its runs: (D, validation loss).
chinchilla  one point per run trained from scratch: (N, D, final validation loss).
gap         per model, every point of the sparse runs' learning curves, with the matched dense run's loss at the
            same D (interpolated in log D within its curve) as offset.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from sparsedist.errors import ScalingError
from sparsedist.scaling.laws import Law
from sparsedist.scaling.runs import RunRecord, dense_match


@dataclass(frozen=True)
class Points:
    """Inputs x (n × k, D last), observed losses y, and the offset added to the law's value to predict y."""

    x: np.ndarray
    y: np.ndarray
    offset: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def budget(self) -> np.ndarray:
        """D, or N·D for the chinchilla law."""
        return self.x.prod(axis=1)

    def take(self, index: np.ndarray) -> Points:
        return Points(self.x[index], self.y[index], self.offset[index])


@dataclass(frozen=True)
class Dataset:
    """The points of one fit, with the label of what was fitted."""

    label: str
    n_params: int | None  # the model's N for per-model laws
    points: Points


def datasets(law: Law, records: list[RunRecord], method: str | None) -> list[Dataset]:
    """The law's datasets from an experiment's runs; `method` picks the (sparse, for `gap`) method to fit."""
    if law.name == "gap":
        return _gap(records, method)
    runs = _one_method(records, method)
    _same_validation(runs)
    if law.name == "tokens":
        return [_curves(group) for group in _by_model(runs).values()]
    families = sorted({r.family for r in runs})
    if len(families) > 1:
        raise ScalingError(f"inconsistent runs: they mix model families {', '.join(families)}")
    for r in runs:
        if r.pretrained:
            raise ScalingError(f"inconsistent runs: {r.name} starts from {r.pretrained}; "
                               "the chinchilla law needs runs trained from scratch")
    x = np.array([[r.params, r.tokens] for r in runs], dtype=float)
    y = np.array([r.final_val_loss for r in runs])
    return [Dataset(f"{families[0]} {runs[0].method}", None, Points(x, y, np.zeros_like(y)))]


def _one_method(records: list[RunRecord], method: str | None) -> list[RunRecord]:
    runs = [r for r in records if method is None or r.method == method]
    methods = sorted({r.method for r in runs})
    if not runs:
        raise ScalingError(f"no finished runs of method {method!r} (there are {_methods(records)})")
    if len(methods) > 1:
        raise ScalingError(f"inconsistent runs: they mix methods {', '.join(methods)}; choose one with --method")
    return runs


def _methods(records: list[RunRecord]) -> str:
    return ", ".join(sorted({r.method for r in records}))


def _same_validation(runs: list[RunRecord]) -> None:
    data = sorted({r.validation for r in runs})
    if len(data) > 1:
        raise ScalingError(f"inconsistent runs: they are validated on different data ({'; '.join(data)})")


def _by_model(runs: list[RunRecord]) -> dict[tuple, list[RunRecord]]:
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[r.family, r.params, r.method, r.pretrained].append(r)
    return groups


def _curves(runs: list[RunRecord]) -> Dataset:
    tokens, loss = np.array([point for r in runs for point in r.curve], dtype=float).T
    return Dataset(runs[0].model, runs[0].params, Points(tokens[:, None], loss, np.zeros_like(loss)))


def _gap(records: list[RunRecord], method: str | None) -> list[Dataset]:
    if method == "dense":
        raise ScalingError("the gap law compares a sparse method with dense: --method must name a sparse method")
    dense = [r for r in records if r.dense]
    if not dense or len(dense) == len(records):
        raise ScalingError(f"the gap law needs dense and sparse runs (there are {_methods(records)})")
    sparse = _one_method([r for r in records if not r.dense], method)
    _same_validation(dense + sparse)
    out = []
    for group in _by_model(sparse).values():
        rows = []
        for run in group:
            baseline = dense_match(run, dense)
            if baseline is None:
                raise ScalingError(f"inconsistent runs: no dense run of {run.dense_model} to compare {run.name} with")
            d_tokens, d_loss = np.array(baseline.curve, dtype=float).T
            for tokens, loss in run.curve:
                if d_tokens[0] <= tokens <= d_tokens[-1]:
                    rows.append((tokens, loss, np.interp(np.log(tokens), np.log(d_tokens), d_loss)))
        tokens, loss, offset = np.array(rows, dtype=float).reshape(-1, 3).T
        out.append(Dataset(f"{group[0].model} vs dense", group[0].params, Points(tokens[:, None], loss, offset)))
    return out

