"""The three laws, over training tokens D and total parameters N.

tokens      L(D) = E + B·D^−β, per model: the loss falls toward E as the model sees more tokens.
chinchilla  L(N, D) = E + A·N^−α + B·D^−β, jointly over the models of one family and method (Hoffmann et al.).
gap         ΔL(D) = L_sparse(D) − L_dense(D) = G·D^−γ + G∞, per model, G∞ ≥ 0 the irreducible gap. The gap is
            modelled directly rather than as the difference of two fitted `tokens` laws, so that its decay and floor
            are parameters with their own intervals. It is fitted against the sparse losses, predicted as the
            matched dense run's loss at the same D plus ΔL(D), so noisy (even negative) observed gaps need no care.

Each law's `value(p, x)` returns its quantity (a loss, or the gap) and the Jacobian ∂/∂p, for x an
n × len(inputs) array whose last column is D.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import product

import numpy as np

from sparsedist.errors import ScalingError

Array = np.ndarray
EXPONENT = (0.01, 3.0)  # bounds of every exponent


@dataclass(frozen=True)
class Law:
    """A parametric law. `log_scaled` parameters are positive and fitted as logarithms; the others keep `bounds`."""

    name: str
    names: tuple[str, ...]
    inputs: tuple[str, ...]
    log_scaled: tuple[bool, ...]
    bounds: tuple[tuple[float | None, float | None], ...]
    value: Callable[[Array, Array], tuple[Array, Array]]
    starts: Callable[[Array, Array], list[Array]]  # (x, observed quantity) -> starting parameter vectors
    quantity: str  # what `value` predicts, for plots

    def predict(self, p: Array, x: Array) -> Array:
        return self.value(np.asarray(p, dtype=float), np.asarray(x, dtype=float).reshape(-1, len(self.inputs)))[0]


def _power(scale: float, exponent: float, v: Array) -> tuple[Array, Array, Array]:
    """scale·v^−exponent and its derivatives in scale and exponent."""
    u = np.exp(-exponent * np.log(v))
    return scale * u, u, -scale * u * np.log(v)


def _tokens(p: Array, x: Array) -> tuple[Array, Array]:
    e, b, beta = p
    term, d_b, d_beta = _power(b, beta, x[:, 0])
    return e + term, np.column_stack([np.ones_like(term), d_b, d_beta])


def _chinchilla(p: Array, x: Array) -> tuple[Array, Array]:
    e, a, alpha, b, beta = p
    n_term, d_a, d_alpha = _power(a, alpha, x[:, 0])
    d_term, d_b, d_beta = _power(b, beta, x[:, 1])
    return e + n_term + d_term, np.column_stack([np.ones_like(n_term), d_a, d_alpha, d_b, d_beta])


def _gap(p: Array, x: Array) -> tuple[Array, Array]:
    g, gamma, g_inf = p
    term, d_g, d_gamma = _power(g, gamma, x[:, 0])
    return term + g_inf, np.column_stack([d_g, d_gamma, np.ones_like(term)])


def _tokens_starts(x: Array, loss: Array) -> list[Array]:
    """E a fraction of the lowest loss; B so that the curve starts at the highest loss at the smallest D."""
    d0, top, low = x[:, -1].min(), loss.max(), loss.min()
    return [np.array([f * low, (top - f * low) * d0**beta, beta])
            for f, beta in product((0.2, 0.5, 0.8), (0.1, 0.3, 0.6, 1.0))]


def _chinchilla_starts(x: Array, loss: Array) -> list[Array]:
    """As `tokens`, the excess over E shared between the N and D terms at the smallest model and budget."""
    n0, d0, top, low = x[:, 0].min(), x[:, 1].min(), loss.max(), loss.min()
    starts = []
    for f, alpha, beta, share in product((0.3, 0.7), (0.1, 0.3, 0.6), (0.1, 0.3, 0.6), (0.25, 0.75)):
        excess = top - f * low
        starts.append(np.array([f * low, share * excess * n0**alpha, alpha, (1 - share) * excess * d0**beta, beta]))
    return starts


def _gap_starts(x: Array, gap: Array) -> list[Array]:
    """G∞ zero or a fraction of the smallest observed gap; G so that the curve starts at the largest gap."""
    d0, top, low = x[:, -1].min(), max(gap.max(), 1e-4), max(gap.min(), 0.0)
    return [np.array([max(top - f * low, 1e-4) * d0**gamma, gamma, f * low])
            for f, gamma in product((0.0, 0.5, 0.9), (0.1, 0.3, 0.6, 1.0))]


FREE = (None, None)
LAWS = {
    "tokens": Law(
        "tokens", ("E", "B", "beta"), ("tokens",), (True, True, False), (FREE, FREE, EXPONENT),
        _tokens, _tokens_starts, "validation loss"),
    "chinchilla": Law(
        "chinchilla", ("E", "A", "alpha", "B", "beta"), ("params", "tokens"), (True, True, False, True, False),
        (FREE, FREE, EXPONENT, FREE, EXPONENT), _chinchilla, _chinchilla_starts, "validation loss"),
    "gap": Law(
        "gap", ("G", "gamma", "G_inf"), ("tokens",), (True, False, False), (FREE, EXPONENT, (0.0, None)),
        _gap, _gap_starts, "sparse − dense validation loss"),
}


def get_law(name: str) -> Law:
    """The law named `name` (see the module docstring)."""
    if name not in LAWS:
        raise ScalingError(f"unknown law {name!r}: choose one of {', '.join(LAWS)}")
    return LAWS[name]
