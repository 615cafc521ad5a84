"""A grid of recipe overrides, over seeds: validation perplexity and the method's logged statistics.

    python bench/sweep.py RECIPE --grid KEY=V1,V2 [--grid KEY=...] [--set KEY=VALUE ...] [--seeds 0]
        [--metrics flip_rate pruned_weight_share] [--windows 0 0.05 0.1 0.25 0.5 1]

Every combination of the `--grid` values is trained from scratch with the `--set` overrides,
one process per run, through `sparsedist train` exactly as bench/quality.py runs a cell (same
work-dir layout, cached results, resumable checkpoints). For each run the table gives the final
validation perplexity and, per window of training (fractions of the steps), the mean of each
logged metric, e.g. the flip rate of the mask refreshes and the share of weight norm² on pruned
positions. Written with this command line to `--out`.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import Cell, mean_sd, mlflow_run, run_cell  # noqa: E402
from report import write_section  # noqa: E402

from sparsedist.config.load import RecipeError, load_recipe  # noqa: E402


def grid_cells(recipe: Path, grid: list[str], fixed: list[str]) -> list[Cell]:
    """One from-scratch cell per combination of the grid's values."""
    axes = []
    for spec in grid:
        key, _, values = spec.partition("=")
        if not values:
            raise SystemExit(f"--grid {spec!r}: expected KEY=V1,V2")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [Cell(" ".join(point), str(recipe), (*fixed, *point), stage="scratch") for point in itertools.product(*axes)]


def window_means(client, run_id: str, metric: str, bounds: list[int]) -> list[float | None]:
    """Mean of a run's logged `metric` over each window (lo, hi] of steps."""
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]
    means = []
    for lo, hi in itertools.pairwise(bounds):
        values = [value for step, value in history if lo < step <= hi]
        means.append(statistics.mean(values) if values else None)
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--grid", action="append", required=True, help="KEY=V1,V2,...; repeat for more axes")
    parser.add_argument("--set", action="append", default=[], help="an override shared by every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--metrics", nargs="+", default=["flip_rate", "pruned_weight_share"])
    parser.add_argument("--windows", type=float, nargs="+", default=[0, 0.05, 0.1, 0.25, 0.5, 1],
                        help="window bounds, as fractions of the run's steps")
    parser.add_argument("--workdir", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    recipe = args.recipe.resolve()
    cells = grid_cells(recipe, args.grid, args.set)
    steps = {}
    for cell in cells:  # every run's recipe is checked before the first starts
        try:
            steps[cell.label] = load_recipe(recipe, cell.overrides).train.steps
        except RecipeError as err:
            raise SystemExit(f"{cell.label}: {err}") from None
    workdir = args.workdir.resolve()

    windows = [f"{lo:.0%}–{hi:.0%}" for lo, hi in itertools.pairwise(args.windows)]
    lines = ["| run | validation ppl | " + " | ".join(f"{m}, {w}" for m in args.metrics for w in windows) + " |",
             "|---|---|" + "---|" * (len(args.metrics) * len(windows))]
    for cell in cells:
        ppl = [run_cell(cell, seed, workdir, None) for seed in args.seeds]
        bounds = [round(fraction * steps[cell.label]) for fraction in args.windows]
        runs = [mlflow_run(workdir, workdir / f"seed{seed}" / cell.slug) for seed in args.seeds]
        columns = []
        for metric in args.metrics:
            per_seed = [window_means(client, run_id, metric, bounds) for client, run_id in runs]
            for values in zip(*per_seed, strict=True):
                present = [v for v in values if v is not None]
                columns.append(f"{statistics.mean(present):.4f}" if present else "–")
        lines.append(f"| {cell.label} | {mean_sd(ppl, '.2f')} | " + " | ".join(columns) + " |")
    text = "\n".join(lines)
    print(text)
    command = " ".join(["python bench/sweep.py", *sys.argv[1:]])
    write_section(args.out, f"Sweep of {args.recipe.name}: {'; '.join(args.grid)}, seeds {args.seeds}", (
        f"Command: `{command}` · from scratch, 16 × 128 tokens a step, one process · seeds {args.seeds} · "
        f"metrics: mean of the values logged in each window, as fractions of the run's steps.\n\n{text}"))


if __name__ == "__main__":
    main()
