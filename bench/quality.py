"""Validation perplexity of every method on the embedded corpus, over seeds, against dense.

    python bench/quality.py --regime a|b|c [--seeds 0 1 2] [--pretrain-steps N] [--retrain-fraction F]

Regime a: the dense model trained 1250 steps (a few epochs), retrained to 2:4 with 25% of its
tokens. Regime b: trained 5000 steps (close to convergence), retrained with 3% (the papers
retrain converged models with 0.4–2%) in 150 steps of 16 sequences: a short-budget stress test.
Regime c: the same model and the same 3%, in the papers' proportions: 1200 steps of 2 sequences
(≥ 1000 steps, ≥ 100 mask refreshes), every method at the pretraining peak lr / 15 (the CAST
paper's rule, no per-method factor), 3% warm-up then cosine to 0.1·lr (the schedule of the
shipped LLaMA recipes), CAST with `sparsity.decay: auto` and a sweep of its factor (×⅓, ×3).
Regime a pretrains once per seed; regimes b and c, like the papers (one released checkpoint,
retrained), pretrain once with the first seed and retrain that model with every seed, so their
spread is the retraining's alone; c reuses b's pretrained model when both share a work dir.

Per seed, with the tiny Llama of recipes/tiny (real runs through `sparsedist train`, one
process, MLflow store under the work dir):

1. dense pretraining for `--pretrain-steps` (recipes/tiny/dense.yaml);
2. one-shot 2:4 of that model: magnitude, Wanda, SparseGPT, ALPS (validation at step 0);
3. retraining to 2:4 with `--retrain-fraction` of the pretraining tokens: STE, SR-STE, AST,
   AST+SLoRB, CAST, and the dense model continued for as long (the fair ceiling), plain
   and with the same self-distillation as AST and CAST (their ceiling);
4. from scratch at the pretraining budget: `sparse_pretrain` and `sste` (dense = step 1).

Prints a table of mean ± standard deviation over seeds of the perplexity and of its ratio to
the same seed's dense baseline (a paired comparison, free of the variation between the seeds'
starting models), and writes it with this command line to `--out`. A finished cell is cached
(`result.json`), and every cell checkpoints every 250 steps and resumes from there, so an
interrupted invocation continues where it stopped when run again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

from sparsedist.config.load import load_recipe  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "tiny"
ONESHOT = ("magnitude", "wanda", "sparsegpt", "alps")
DENSE_PRETRAINED, CEILING = "dense, pretrained", "dense, continued (ceiling)"
CEILING_KD = "dense, continued with KD (ceiling)"
"""The baselines: from-scratch cells compare with dense pretraining at the same budget; the others
with the dense model continued for as long as the retraining (the fair ceiling), with the same
distillation where the method distils."""
KD = "distill={weight: 0.3333, teacher: {path: self, placement: sharded}}"
"""The self-distillation of recipes/tiny/ast.yaml and cast.yaml."""


@dataclass(frozen=True)
class Cell:
    """One row of the table: a recipe and its overrides; `initial` reads the step-0 validation."""

    label: str
    recipe: str
    overrides: tuple[str, ...] = ()
    initial: bool = False
    stage: str = "retrain"
    baseline: str = CEILING

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


@dataclass(frozen=True)
class Regime:
    pretrain_steps: int
    retrain_fraction: float
    """Of the pretraining tokens."""
    scratch_cells: bool
    """Whether the from-scratch cells run in this regime."""
    shared_start: bool
    """One pretrained model (the first seed's) retrained with every seed, rather than one per seed."""
    retrain_lr_scale: float = 1.0
    """Multiplies each retraining recipe's lr (so AST and CAST keep their 0.4× of AdamW's)."""
    retrain_lr: float | None = None
    """Every retraining method's lr, replacing the recipe's (and `retrain_lr_scale`)."""
    retrain_batch: int = 16
    """Sequences per retraining step (pretraining: 16); the steps follow from the token budget."""
    cast_auto: bool = False
    """CAST with `sparsity.decay: auto`, and cells of its factor ×⅓ and ×3."""
    title: str = ""
    """What the regime tests, in its section's title."""


PRETRAIN_BATCH, PRETRAIN_PEAK_LR = 16, 2e-3
REGIMES = {"a": Regime(1250, 0.25, scratch_cells=True, shared_start=False),
           "b": Regime(5000, 0.03, scratch_cells=False, shared_start=True, retrain_lr_scale=2 / 15,
                       title="a short-budget stress test"),
           "c": Regime(5000, 0.03, scratch_cells=False, shared_start=True, retrain_lr=PRETRAIN_PEAK_LR / 15,
                       retrain_batch=2, cast_auto=True, title="the papers' proportions")}
"""Regime b retrains a converged model at the CAST paper's rule, the pretraining peak lr / 15 (2e-3 / 15
for the plain recipes' 1e-3; AST and CAST keep their further 0.4×): at regime a's lr its dense continuation
ends worse than its start. Regime c applies the rule to every method as it stands."""
CAST_FACTORS = (1 / 3, 3.0)
CAST_STATISTICS = ("decay", "pruned_weight_share", "pruned_near_zero")
"""Logged at the last step before `finalize`: λ, the share of weight norm² on pruned slots, and the share of
pruned weights below 1% of their layer's kept RMS."""
CHECKPOINT_INTERVAL = 250


def steps_for(pretrain_steps: int, fraction: float, regime: Regime) -> int:
    """The retraining steps of `fraction` of the pretraining tokens, at the regime's retraining batch."""
    return max(1, round(pretrain_steps * fraction * PRETRAIN_BATCH / regime.retrain_batch))


def retrain(recipe: str, steps: int, regime: Regime, scale: float | None = None) -> tuple[str, ...]:
    """The overrides of a retraining cell of `steps` steps: the regime's lr (or the recipe's × `scale`, by default
    the regime's scale) and warm-up."""
    lr = regime.retrain_lr or load_recipe(RECIPES / recipe).optim.lr * (regime.retrain_lr_scale if scale is None
                                                                          else scale)
    warmup = max(1, round(steps * (0.03 if regime.retrain_lr else 0.05)))
    return (f"train.steps={steps}", f"schedule.warmup_steps={warmup}", f"optim.lr={lr:.4g}")


def cast(steps: int, regime: Regime, factor: float | None) -> tuple[str, ...]:
    """A CAST cell's overrides: its recipe's λ, or `decay: auto` times `factor`."""
    auto = () if factor is None else ("sparsity.decay=auto", f"sparsity.decay_auto_factor={factor:.4g}")
    return (*retrain("cast.yaml", steps, regime), *auto)


def cells(retrain_steps: int, pretrain_steps: int, regime: Regime) -> list[Cell]:
    def overrides(recipe: str, scale: float | None = None) -> tuple[str, ...]:
        return retrain(recipe, retrain_steps, regime, scale)

    scratch = (f"train.steps={pretrain_steps}",)
    return [
        Cell(DENSE_PRETRAINED, "dense.yaml", scratch, stage="pretrain"),
        *(Cell(f"one-shot {name}", "retrain.yaml",
               ("train.steps=1", "schedule.warmup_steps=0", f"sparsity={{method: ste, oneshot: {name}}}"),
               initial=True, stage="one-shot") for name in ONESHOT),
        Cell(CEILING, "retrain.yaml", overrides("retrain.yaml")),
        Cell(CEILING_KD, "retrain.yaml", (*overrides("retrain.yaml"), KD)),
        Cell("STE", "ste.yaml", overrides("ste.yaml")),
        Cell("SR-STE", "srste.yaml", overrides("srste.yaml")),
        Cell("AST", "ast.yaml", overrides("ast.yaml"), baseline=CEILING_KD),
        Cell("AST + SLoRB", "ast-slorb.yaml", overrides("ast-slorb.yaml"), baseline=CEILING_KD),
        *([Cell("CAST, λ auto", "cast.yaml", cast(retrain_steps, regime, 1.0), baseline=CEILING_KD),
           *(Cell(f"CAST, λ auto ×{factor:.2g}", "cast.yaml", cast(retrain_steps, regime, factor), baseline=CEILING_KD)
             for factor in CAST_FACTORS)]
          if regime.cast_auto else [Cell("CAST", "cast.yaml", cast(retrain_steps, regime, None), baseline=CEILING_KD)]),
        *([Cell("CAST at its recipe's lr", "cast.yaml", overrides("cast.yaml", 1.0), baseline=CEILING_KD)]
          if regime.retrain_lr_scale != 1 and not regime.retrain_lr else []),
        *([Cell("sparse_pretrain (from scratch)", "sparse-pretrain.yaml", scratch, stage="scratch",
                baseline=DENSE_PRETRAINED),
           Cell("S-STE (from scratch)", "sste.yaml", scratch, stage="scratch", baseline=DENSE_PRETRAINED)]
          if regime.scratch_cells else []),
    ]


def run_cell(cell: Cell, seed: int, workdir: Path, start: Path | None, batch: int,
             threads: int | None = None) -> dict[str, float]:
    """Train one cell (unless its result is already there) and return its `val_ppl` (and, for CAST, the
    `CAST_STATISTICS`); retraining cells run `batch` sequences per step, on `threads` (default: all) threads."""
    out = workdir / f"seed{seed}" / cell.slug
    result = out / "result.json"
    if not result.exists():
        overrides = [
            f"train.seed={seed}", f"train.output_dir={out}", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            "tracking.experiment=quality", f"tracking.run_name={cell.label} seed {seed}",
            "parallel.nproc_per_node=1", "parallel.backend=none", "eval.sequences=null", "eval.interval=100000",
            f"checkpoint.interval={CHECKPOINT_INTERVAL}", "checkpoint.keep=1",
            *(f"train.{key}={PRETRAIN_BATCH if cell.stage in ('pretrain', 'scratch') else batch}"
              for key in ("global_batch", "micro_batch")),
            *([] if cell.stage in ("pretrain", "scratch") else [f"model.pretrained={start}"]),
            *cell.overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or os.cpu_count())}
        out.mkdir(parents=True, exist_ok=True)
        print(f"seed {seed}: {cell.label} (log: {out / 'train.log'})", flush=True)
        with open(out / "train.log", "a") as log:
            subprocess.run([sys.executable, "-m", "sparsedist", "train", str(RECIPES / cell.recipe), *overrides],
                           check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        result.write_text(json.dumps(read_result(workdir, out, cell.initial)))
    return json.loads(result.read_text())


def run_table(table: list[Cell], seeds: list[int], workdir: Path, regime: Regime, jobs: int,
              subdir: Callable[[Cell], str]) -> dict[str, list[dict[str, float]]]:
    """Every cell's results, one per seed in `seeds` order: the pretraining first with every thread, then the other
    cells `jobs` at a time (cells are independent once their start exists), each under `workdir / subdir(cell)`."""
    starts = {}
    for seed in seeds:
        pretrain = next(cell for cell in table if cell.stage == "pretrain")
        cell_seed = seeds[0] if regime.shared_start else seed
        run_cell(pretrain, cell_seed, workdir, None, regime.retrain_batch)
        starts[seed] = workdir / f"seed{cell_seed}" / pretrain.slug / "model"
    threads = max(1, (os.cpu_count() or 1) // jobs)
    for store in {workdir / subdir(cell) for cell in table}:
        create_store(store)
    with ThreadPoolExecutor(jobs) as pool:
        futures = {(cell.label, seed): pool.submit(
            run_cell, cell, seeds[0] if cell.stage == "pretrain" and regime.shared_start else seed,
            workdir / subdir(cell), starts[seed], regime.retrain_batch, threads)
            for seed in seeds for cell in table}
    return {cell.label: [futures[cell.label, seed].result() for seed in seeds] for cell in table}


def create_store(workdir: Path) -> None:
    """The work dir's MLflow store and experiment, made before cells start at once (two processes creating one
    SQLite store race on its schema: one fails with a foreign-key error)."""
    from mlflow.tracking import MlflowClient

    from sparsedist.tracking import experiment_id

    workdir.mkdir(parents=True, exist_ok=True)
    experiment_id(MlflowClient(f"sqlite:///{workdir}/mlflow.db"), "quality")


def mlflow_run(workdir: Path, out: Path):
    """The MLflow client of the work dir's store and the id of the run a cell wrote to `out`."""
    from mlflow.tracking import MlflowClient

    run_id = json.loads(sorted((out / "checkpoints").glob("step_*/trainer.json"))[-1].read_text())["mlflow_run_id"]
    return MlflowClient(f"sqlite:///{workdir}/mlflow.db"), run_id


def read_result(workdir: Path, out: Path, initial: bool) -> dict[str, float]:
    """The cell's validation perplexity (at step 0 with `initial`, else after `finalize`) and the last logged
    `CAST_STATISTICS` it has, from its MLflow run."""
    client, run_id = mlflow_run(workdir, out)
    if initial:
        return {"val_ppl": next(m.value for m in client.get_metric_history(run_id, "val_ppl") if m.step == 0)}
    metrics = client.get_run(run_id).data.metrics
    return {"val_ppl": metrics["final_val_ppl"], **{key: metrics[key] for key in CAST_STATISTICS if key in metrics}}


def mean_sd(values: list[float], spec: str) -> str:
    """`mean ± sd` over seeds (sd "–" for one seed)."""
    spread = format(statistics.stdev(values), spec) if len(values) > 1 else "–"
    return f"{format(statistics.mean(values), spec)} ± {spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="a")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, help="default: the regime's")
    parser.add_argument("--retrain-fraction", type=float, help="default: the regime's")
    parser.add_argument("--workdir", type=Path, help="default: runs/quality (regime a), runs/quality-b (b, c)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once after pretraining (threads shared)")
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    regime = REGIMES[args.regime]
    args.pretrain_steps = args.pretrain_steps or regime.pretrain_steps
    args.retrain_fraction = args.retrain_fraction or regime.retrain_fraction
    args.workdir = args.workdir or Path("runs/quality" if args.regime == "a" else "runs/quality-b")
    retrain_steps = steps_for(args.pretrain_steps, args.retrain_fraction, regime)
    table = cells(retrain_steps, args.pretrain_steps, regime)
    results = run_table(table, args.seeds, args.workdir.resolve(), regime, args.jobs,
                        lambda cell: f"regime-{args.regime}" if cell.stage == "retrain" and args.regime == "c" else "")
    lines = ["| model | validation ppl (mean ± sd) | vs its dense baseline, per seed (mean ± sd) | baseline | seeds |",
             "|---|---|---|---|---|"]
    ppl = {label: [result["val_ppl"] for result in values] for label, values in results.items()}
    for cell in table:
        values = ppl[cell.label]
        ratios = [value / base for value, base in zip(values, ppl[cell.baseline], strict=True)]
        lines.append(f"| {cell.label} | {mean_sd(values, '.2f')} | {mean_sd(ratios, '.3f')}× | {cell.baseline} | "
                     f"{len(values)} |")
    cast_rows = [f"| {label} | " + " | ".join(mean_sd([r[key] for r in values], ".3g") for key in CAST_STATISTICS)
                 + " |" for label, values in results.items() if values and CAST_STATISTICS[0] in values[0]]
    if cast_rows:
        lines += ["", "CAST before `finalize` (the last logged step; mean ± sd over seeds):", "",
                  "| cell | λ | pruned share of weight norm² | pruned weights below 1% of the kept RMS |",
                  "|---|---|---|---|", *cast_rows]
    text = "\n".join(lines)
    print(text)
    command = " ".join(["python bench/quality.py", *sys.argv[1:]])
    title = f"Validation perplexity by method, regime {args.regime}{f', {regime.title}' if regime.title else ''}"
    write_section(args.out, f"{title} (embedded corpus, tiny Llama)", (
        f"Command: `{command}` · pretraining {args.pretrain_steps} steps × {PRETRAIN_BATCH} × 128 tokens · retraining "
        f"{retrain_steps} steps × {regime.retrain_batch} × 128 tokens ({args.retrain_fraction:.0%} of the pretraining "
        "tokens) · whole validation split "
        f"(Hamlet, The Tempest, the Sonnets, Paradise Regained) · seeds {args.seeds}"
        f"{f' (one model pretrained with seed {args.seeds[0]}, retrained with each)' if regime.shared_start else ''}"
        f"{f' · retraining lr {regime.retrain_lr_scale:.3g}× each recipe' if regime.retrain_lr_scale != 1 else ''}"
        f"{f' · every method at lr {regime.retrain_lr:.3g}, 3% warm-up, cosine' if regime.retrain_lr else ''}"
        f".\n\n{text}"))


if __name__ == "__main__":
    main()
