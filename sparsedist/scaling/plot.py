"""A PNG of fitted laws: observed points, the fit, its extrapolation beyond the largest budget, the bootstrap band."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparsedist.scaling.fit import Fit

EXTRAPOLATE = 10.0  # the curves go on to this many times the largest D fitted


def plot_fits(fits: list[Fit], path: Path) -> Path:
    """One curve per fit against D, or per N for the chinchilla law; the held-out budget's points as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = iter(plt.get_cmap("tab10").colors * 10)
    top = max(float(f.points.x[:, -1].max()) for f in fits)
    for fit in fits:
        pts = fit.points
        held = pts.budget() == pts.budget().max()
        for fixed in np.unique(pts.x[:, :-1], axis=0):  # one row of N for chinchilla, an empty row otherwise
            rows = np.all(pts.x[:, :-1] == fixed, axis=1)
            color = next(colors)
            label = fit.label + (f" N={fixed[0]:.3g}" if len(fixed) else "")
            observed = pts.y - pts.offset
            ax.scatter(pts.x[rows & ~held, -1], observed[rows & ~held], s=10, color=color, alpha=0.6)
            ax.scatter(pts.x[rows & held, -1], observed[rows & held], s=90, marker="*", color=color,
                       edgecolors="black", linewidths=0.5, zorder=3)
            tokens = np.geomspace(pts.x[rows, -1].min(), top * EXTRAPOLATE, 200)
            x = np.column_stack([np.tile(fixed, (len(tokens), 1)), tokens])
            lo, hi = fit.interval(x)
            ax.fill_between(tokens, lo, hi, color=color, alpha=0.15, linewidth=0)
            curve, inside = fit.predict(x), tokens <= pts.x[:, -1].max()
            ax.plot(tokens[inside], curve[inside], color=color, label=label)
            ax.plot(tokens[~inside], curve[~inside], color=color, linestyle="--")
    ax.axvline(top, color="gray", linestyle=":", linewidth=1, label="largest budget (★ held out)")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel(fits[0].law.quantity)
    ax.set_title(f"{fits[0].law.name} law: fit (solid), extrapolation (dashed), 95% bootstrap band")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
