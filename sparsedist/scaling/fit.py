"""Fitting a law to points, with bootstrap intervals and the error of an extrapolation to the largest budget.

The objective is the Huber loss (δ = 1e-3) of the log-loss residuals log L_pred − log L_obs, minimized by L-BFGS-B
from every start of the law's grid, the best kept. Positive parameters (E, A, B, G) are fitted as logarithms;
exponents stay in [0.01, 3] and G∞ ≥ 0 by bounds. Bootstrap: the points resampled with replacement (seeded), each
resample refitted from the full fit's optimum; intervals are the central 95% of the resampled parameters and of
the predictions they make. Held out: the points at the largest budget (D, or N·D for chinchilla) are left out of a
second fit from the full grid, whose predictions there give the signed mean relative error on the loss.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from sparsedist.errors import ScalingError
from sparsedist.scaling.laws import Law, get_law
from sparsedist.scaling.points import Points

DELTA = 1e-3
LEVEL = 0.95
LOG_BOUND = 50.0  # |log p| of the log-scaled parameters


@dataclass(frozen=True)
class Fit:
    """A fitted law. `bootstrap` holds one parameter vector per resample; `points` what it was fitted to."""

    law: Law
    label: str
    n_params: int | None  # N of the model, for per-model laws
    params: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    heldout_error: float | None  # None when too few points remain without the largest budget
    heldout_budget: float
    n_points: int
    bootstrap: np.ndarray
    points: Points

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The law's quantity (a loss, or the gap for `gap`) at inputs x (rows of law.inputs)."""
        return self.law.predict(np.array(list(self.params.values())), x)

    def interval(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The central 95% of the bootstrap fits' predictions at x."""
        values = np.array([self.law.predict(p, x) for p in self.bootstrap])
        lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
        return lo, hi

    def summary(self) -> str:
        lines = [f"{self.label}: {self.law.name} law on {self.n_points} points ({LEVEL:.0%} bootstrap intervals)"]
        lines += [f"  {k:<6} = {v:<11.5g} [{lo:.5g}, {hi:.5g}]" for (k, v), (lo, hi)
                  in zip(self.params.items(), self.intervals.values(), strict=True)]
        budget = "N·D" if self.law.name == "chinchilla" else "D"
        error = "too few points to hold out" if self.heldout_error is None else f"{self.heldout_error:+.3%}"
        lines.append(f"  held-out largest budget ({budget}={self.heldout_budget:.3g}): relative error on loss {error}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "label": self.label, "n_params": self.n_params, "params": self.params,
            "intervals": {k: list(v) for k, v in self.intervals.items()}, "level": LEVEL,
            "heldout_error": self.heldout_error, "heldout_budget": self.heldout_budget, "n_points": self.n_points,
            "bootstrap": self.bootstrap.tolist(),
            "points": {"inputs": list(self.law.inputs), "x": self.points.x.tolist(), "y": self.points.y.tolist(),
                       "offset": self.points.offset.tolist()},
        }

    @classmethod
    def from_json(cls, law: Law, data: dict) -> Fit:
        pts = data["points"]
        return cls(law, data["label"], data["n_params"], {k: float(data["params"][k]) for k in law.names},
                   {k: tuple(data["intervals"][k]) for k in law.names}, data["heldout_error"],
                   data["heldout_budget"], data["n_points"], np.array(data["bootstrap"], dtype=float),
                   Points(np.array(pts["x"], dtype=float).reshape(-1, len(law.inputs)), np.array(pts["y"]),
                          np.array(pts["offset"])))


def fit_law(law: Law, points: Points, label: str = "", n_params: int | None = None, resamples: int = 200,
            seed: int = 0) -> Fit:
    """Fit `law` to `points` (see the module docstring)."""
    _check_enough(law, points, label)
    with _one_blas_thread():
        return _fit(law, points, label, n_params, resamples, seed)


def _one_blas_thread() -> AbstractContextManager:
    """L-BFGS-B's tiny LAPACK calls only lose to OpenBLAS threads (ten times over on a busy machine)."""
    return threadpool_limits(1, user_api="blas")


def _fit(law: Law, points: Points, label: str, n_params: int | None, resamples: int, seed: int) -> Fit:
    best = _minimize(law, points, law.starts(points.x, points.y - points.offset))
    rng = np.random.default_rng(seed)
    bootstrap = np.array([_minimize(law, points.take(rng.integers(0, len(points), len(points))), [best])
                          for _ in range(resamples)])
    lo, hi = np.quantile(bootstrap, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0)
    budget = points.budget()
    held = budget == budget.max()
    error = None
    if (~held).sum() >= 2 * len(law.names):
        train = points.take(~held)
        p = _minimize(law, train, law.starts(train.x, train.y - train.offset))
        predicted = points.offset[held] + law.predict(p, points.x[held])
        error = float(np.mean(predicted / points.y[held] - 1))
    return Fit(law, label, n_params, dict(zip(law.names, best.tolist(), strict=True)),
               {k: (float(a), float(b)) for k, a, b in zip(law.names, lo, hi, strict=True)}, error,
               float(budget.max()), len(points), bootstrap, points)


def _check_enough(law: Law, points: Points, label: str) -> None:
    distinct = len(np.unique(points.x, axis=0))
    if distinct <= len(law.names) or any(len(np.unique(col)) < 3 for col in points.x.T):
        raise ScalingError(f"{label}: {distinct} distinct points; the {law.name} law needs at least "
                           f"{len(law.names) + 1}, with 3 or more values of each of {', '.join(law.inputs)}")


def _minimize(law: Law, points: Points, starts: list[np.ndarray]) -> np.ndarray:
    """The best parameters found by L-BFGS-B from `starts`."""
    from scipy.optimize import minimize

    logs = np.array(law.log_scaled)
    bounds = [(-LOG_BOUND, LOG_BOUND) if log else b for log, b in zip(logs, law.bounds, strict=True)]
    lower = np.array([-np.inf if b[0] is None else b[0] for b in bounds])
    upper = np.array([np.inf if b[1] is None else b[1] for b in bounds])
    log_y = np.log(points.y)

    def objective(z: np.ndarray) -> tuple[float, np.ndarray]:
        p = np.where(logs, np.exp(z), z)
        value, jac = law.value(p, points.x)
        predicted = points.offset + value
        r = np.log(predicted) - log_y
        huber = np.where(np.abs(r) <= DELTA, 0.5 * r**2, DELTA * (np.abs(r) - 0.5 * DELTA))
        grad = (np.clip(r, -DELTA, DELTA) / predicted) @ jac * np.where(logs, p, 1.0)
        return huber.sum() / DELTA**2, grad / DELTA**2  # scaled so that the tolerances of L-BFGS-B fit

    best = None
    for start in starts:
        z = np.array(start, dtype=float)
        z[logs] = np.log(z[logs])
        result = minimize(objective, np.clip(z, lower, upper), jac=True, method="L-BFGS-B", bounds=bounds)
        if np.isfinite(result.fun) and (best is None or result.fun < best.fun):
            best = result
    if best is None:
        raise ScalingError(f"the {law.name} law could not be fitted from any start")
    return np.where(logs, np.exp(best.x), best.x)


def save_fits(path: Path, fits: list[Fit], experiment: str) -> Path:
    doc = {"law": fits[0].law.name, "experiment": experiment, "fits": [f.to_json() for f in fits]}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def load_fits(path: Path) -> list[Fit]:
    if not path.is_file():
        raise ScalingError(f"fit file not found: {path}")
    try:
        doc = json.loads(path.read_text())
        law = get_law(doc["law"])
        return [Fit.from_json(law, f) for f in doc["fits"]]
    except ScalingError:
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise ScalingError(f"{path} is not a sparsedist scaling fit ({type(err).__name__}: {err})") from None


def prediction(fits: list[Fit], tokens: float, params: float | None) -> str:
    """One line: the fitted quantity at D = `tokens` (and N = `params`), its interval, and its perplexity."""
    if tokens <= 0 or (params is not None and params <= 0):
        raise ScalingError("--tokens and --params must be positive")
    fit = _select(fits, params)
    x = np.array([[params, tokens]] if fit.law.name == "chinchilla" else [[tokens]], dtype=float)
    value, (lo, hi) = float(fit.predict(x)[0]), (float(v[0]) for v in fit.interval(x))
    beyond = float(x.prod()) / fit.heldout_budget
    note = f"; {beyond:.3g}× the largest fitted budget" if beyond > 1 else ""
    if fit.law.name == "gap":
        return (f"{fit.label} at D={tokens:.4g}: gap {value:.4f} [{lo:.4f}, {hi:.4f}], sparse/dense perplexity"
                f" {math.exp(value):.4f} [{math.exp(lo):.4f}, {math.exp(hi):.4f}] ({LEVEL:.0%} bootstrap{note})")
    at = f"N={params:.4g}, D={tokens:.4g}" if fit.law.name == "chinchilla" else f"D={tokens:.4g}"
    return (f"{fit.label} at {at}: loss {value:.4f} [{lo:.4f}, {hi:.4f}], perplexity {math.exp(value):.2f}"
            f" [{math.exp(lo):.2f}, {math.exp(hi):.2f}] ({LEVEL:.0%} bootstrap{note})")


def _select(fits: list[Fit], params: float | None) -> Fit:
    """The chinchilla fit, which needs N; else the per-model fit of N within 5% (optional when there is one)."""
    if fits[0].law.name == "chinchilla":
        if params is None:
            raise ScalingError("the chinchilla law needs --params N")
        return fits[0]
    if params is None:
        if len(fits) > 1:
            raise ScalingError(f"the fit holds {len(fits)} models ({_models(fits)}): choose one with --params")
        return fits[0]
    near = [f for f in fits if abs(f.n_params / params - 1) <= 0.05]
    if len(near) != 1:
        which = "no fitted model" if not near else "several fitted models"
        raise ScalingError(f"{which} with N≈{params:,.0f} (fitted: {_models(fits)})")
    return near[0]


def _models(fits: list[Fit]) -> str:
    return "; ".join(f.label for f in fits)
