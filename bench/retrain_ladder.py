"""CAST's scaling law over the retraining budget: regime c's converged model retrained to 2:4 at 5 budgets.

    python bench/retrain_ladder.py [--other AST] [--seeds 0 1] [--jobs 2] [--workdir runs/quality-b]

From the dense model that bench/quality.py pretrains for regimes b and c (pretrained here if
it is not there yet), CAST (λ auto), a second method (`--other`, regime c's best after CAST)
and the dense model continued with the same self-distillation retrain with 0.5%, 1%, 2%, 3%
and 8% of the pretraining tokens, at regime c's settings: 2 sequences per step, lr = the
pretraining peak / 15, 3% warm-up then cosine. The 3% cells are regime c's own (shared cache).
`sparsedist.scaling` then fits the `gap` law ΔL(D) = G·D^−γ + G∞ over the retraining tokens D,
each point a run's final (after `finalize`) validation loss, its offset the same seed's dense
continuation at the same budget; the largest budget is held out and predicted from the others.
The fits, the held-out errors and the plot (docs/figures/) go to `--out` with this command line.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CEILING_KD, KD, PRETRAIN_BATCH, REGIMES, Cell, cast, cells, retrain, run_table, steps_for  # noqa: E402
from report import write_section  # noqa: E402

BUDGETS = (0.005, 0.01, 0.02, 0.03, 0.08)
"""Fractions of the pretraining tokens; 0.03 is regime c's budget."""
OTHER = {"AST": "ast.yaml", "AST + SLoRB": "ast-slorb.yaml", "SR-STE": "srste.yaml", "STE": "ste.yaml"}
TOKENS_PER_SEQUENCE = 128


def ladder_cells(steps: int, other: str) -> list[Cell]:
    """The pretraining cell, then CAST (λ auto), `other` and the distilled dense ceiling at `steps` steps."""
    regime = REGIMES["c"]
    pretrain = cells(steps, regime.pretrain_steps, regime)[0]
    return [pretrain, Cell("CAST, λ auto", "cast.yaml", cast(steps, regime, 1.0)),
            Cell(other, OTHER[other], retrain(OTHER[other], steps, regime)),
            Cell(CEILING_KD, "retrain.yaml", (*retrain("retrain.yaml", steps, regime), KD))]


def fit_gaps(losses: dict[float, dict[str, list[float]]], methods: list[str], figure: Path) -> str:
    """The `gap` law of each method against the distilled dense ceiling, over retraining tokens; markdown."""
    from sparsedist.scaling.fit import fit_law
    from sparsedist.scaling.laws import get_law
    from sparsedist.scaling.plot import plot_fits
    from sparsedist.scaling.points import Points

    law, fits = get_law("gap"), []
    rows = ["| budget | retraining tokens | " + " | ".join(f"{m}: loss − dense (mean)" for m in methods) + " |",
            "|---|---|" + "---|" * len(methods)]
    for fraction, by_label in sorted(losses.items()):
        gaps = [np.mean(np.subtract(by_label[m], by_label[CEILING_KD])) for m in methods]
        rows.append(f"| {fraction:.1%} | {tokens(fraction):.3g} | " + " | ".join(f"{g:+.4f}" for g in gaps) + " |")
    for method in methods:
        x, y, offset = zip(*((tokens(fraction), loss, dense) for fraction, by_label in losses.items()
                             for loss, dense in zip(by_label[method], by_label[CEILING_KD], strict=True)), strict=True)
        fits.append(fit_law(law, Points(np.array(x, dtype=float)[:, None], np.array(y), np.array(offset)), method))
    plot = plot_fits(fits, figure)
    summaries = "\n".join(fit.summary() for fit in fits)
    return "\n".join(rows) + f"\n\n**gap law** ([plot](figures/{plot.name})):\n\n```\n{summaries}\n```"


def tokens(fraction: float) -> float:
    return fraction * REGIMES["c"].pretrain_steps * PRETRAIN_BATCH * TOKENS_PER_SEQUENCE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", choices=sorted(OTHER), default="AST")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once after pretraining (threads shared)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/quality-b"))
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    regime, workdir = REGIMES["c"], args.workdir.resolve()
    losses: dict[float, dict[str, list[float]]] = {}
    for fraction in BUDGETS:
        steps = steps_for(regime.pretrain_steps, fraction, regime)
        table = ladder_cells(steps, args.other)
        subdir = "regime-c" if fraction == regime.retrain_fraction else f"regime-c-{fraction:g}"
        results = run_table(table, args.seeds, workdir, regime, args.jobs,
                            lambda cell, subdir=subdir: subdir if cell.stage == "retrain" else "")
        losses[fraction] = {cell.label: [math.log(r["val_ppl"]) for r in results[cell.label]] for cell in table[1:]}
    body = fit_gaps(losses, ["CAST, λ auto", args.other], args.out.parent / "figures" / "retrain-ladder-gap.png")
    print(body)
    command = shlex.join(["python", "bench/retrain_ladder.py", *sys.argv[1:]])
    write_section(args.out, "CAST's retraining-budget law (regime c's model, 5 budgets)", (
        f"Command: `{command}` · seeds {args.seeds} · budgets {', '.join(f'{b:.1%}' for b in BUDGETS)} of the "
        f"pretraining tokens, {regime.retrain_batch} sequences per step, every method at lr "
        f"{regime.retrain_lr:.3g} (3% warm-up, cosine) · loss = ln(validation ppl) after `finalize`, against the "
        "same seed's dense continuation with the same distillation · the 8% budget held out.\n\n" + body))


if __name__ == "__main__":
    main()
