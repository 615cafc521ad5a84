"""Validation perplexity of every method on the embedded corpus, over seeds, against dense.

    python bench/quality.py --regime a|b [--seeds 0 1 2] [--pretrain-steps N] [--retrain-fraction F]

Regime a: the dense model trained 1250 steps (a few epochs), retrained to 2:4 with 25% of its
tokens. Regime b: trained 5000 steps (close to convergence), retrained with 3% (the papers
retrain converged models with 0.4–2%); its from-scratch cells are those of regime a. Regime a
pretrains once per seed; regime b, like the papers (one released checkpoint, retrained), pretrains
once with the first seed and retrains that model with every seed, so its spread is the
retraining's alone.

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


REGIMES = {"a": Regime(1250, 0.25, scratch_cells=True, shared_start=False),
           "b": Regime(5000, 0.03, scratch_cells=False, shared_start=True, retrain_lr_scale=2 / 15)}
"""Regime b retrains a converged model at the CAST paper's rule, the pretraining peak lr / 15 (2e-3 / 15
for the plain recipes' 1e-3): at regime a's lr its dense continuation ends worse than its start."""
CHECKPOINT_INTERVAL = 250


def cells(retrain_steps: int, pretrain_steps: int, scratch_cells: bool, lr_scale: float = 1.0) -> list[Cell]:
    def retrain(recipe: str, scale: float = lr_scale) -> tuple[str, ...]:
        lr = load_recipe(RECIPES / recipe).optim.lr * scale
        return (f"train.steps={retrain_steps}", f"schedule.warmup_steps={max(1, retrain_steps // 20)}",
                f"optim.lr={lr:.4g}")

    scratch = (f"train.steps={pretrain_steps}",)
    return [
        Cell(DENSE_PRETRAINED, "dense.yaml", scratch, stage="pretrain"),
        *(Cell(f"one-shot {name}", "retrain.yaml",
               ("train.steps=1", "schedule.warmup_steps=0", f"sparsity={{method: ste, oneshot: {name}}}"),
               initial=True, stage="one-shot") for name in ONESHOT),
        Cell(CEILING, "retrain.yaml", retrain("retrain.yaml")),
        Cell(CEILING_KD, "retrain.yaml", (*retrain("retrain.yaml"), KD)),
        Cell("STE", "ste.yaml", retrain("ste.yaml")),
        Cell("SR-STE", "srste.yaml", retrain("srste.yaml")),
        Cell("AST", "ast.yaml", retrain("ast.yaml"), baseline=CEILING_KD),
        Cell("AST + SLoRB", "ast-slorb.yaml", retrain("ast-slorb.yaml"), baseline=CEILING_KD),
        Cell("CAST", "cast.yaml", retrain("cast.yaml"), baseline=CEILING_KD),
        *([Cell("CAST at its recipe's lr", "cast.yaml", retrain("cast.yaml", 1.0), baseline=CEILING_KD)]
          if lr_scale != 1 else []),  # AdamS moves a masked weight ≤ Σ lr_t·t/T in all: a scaled lr may not reach 0
        *([Cell("sparse_pretrain (from scratch)", "sparse-pretrain.yaml", scratch, stage="scratch",
                baseline=DENSE_PRETRAINED),
           Cell("S-STE (from scratch)", "sste.yaml", scratch, stage="scratch", baseline=DENSE_PRETRAINED)]
          if scratch_cells else []),
    ]


def run_cell(cell: Cell, seed: int, workdir: Path, start: Path) -> float:
    """Train one cell (unless its result is already there) and return its validation perplexity."""
    out = workdir / f"seed{seed}" / cell.slug
    result = out / "result.json"
    if not result.exists():
        overrides = [
            f"train.seed={seed}", f"train.output_dir={out}", f"tracking.uri=sqlite:///{workdir}/mlflow.db",
            "tracking.experiment=quality", f"tracking.run_name={cell.label} seed {seed}",
            "parallel.nproc_per_node=1", "parallel.backend=none", "eval.sequences=null", "eval.interval=100000",
            f"checkpoint.interval={CHECKPOINT_INTERVAL}", "checkpoint.keep=1", "train.global_batch=16",
            "train.micro_batch=16",
            *([] if cell.stage in ("pretrain", "scratch") else [f"model.pretrained={start}"]),
            *cell.overrides,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
        out.mkdir(parents=True, exist_ok=True)
        print(f"seed {seed}: {cell.label} (log: {out / 'train.log'})", flush=True)
        with open(out / "train.log", "a") as log:
            subprocess.run([sys.executable, "-m", "sparsedist", "train", str(RECIPES / cell.recipe), *overrides],
                           check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        result.write_text(json.dumps({"val_ppl": read_ppl(workdir, out, cell.initial)}))
    return json.loads(result.read_text())["val_ppl"]


def mlflow_run(workdir: Path, out: Path):
    """The MLflow client of the work dir's store and the id of the run a cell wrote to `out`."""
    from mlflow.tracking import MlflowClient

    run_id = json.loads(sorted((out / "checkpoints").glob("step_*/trainer.json"))[-1].read_text())["mlflow_run_id"]
    return MlflowClient(f"sqlite:///{workdir}/mlflow.db"), run_id


def read_ppl(workdir: Path, out: Path, initial: bool) -> float:
    client, run_id = mlflow_run(workdir, out)
    if initial:
        return next(m.value for m in client.get_metric_history(run_id, "val_ppl") if m.step == 0)
    return client.get_run(run_id).data.metrics["final_val_ppl"]


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
    parser.add_argument("--workdir", type=Path, help="default: runs/quality (regime a), runs/quality-b")
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    regime = REGIMES[args.regime]
    args.pretrain_steps = args.pretrain_steps or regime.pretrain_steps
    args.retrain_fraction = args.retrain_fraction or regime.retrain_fraction
    args.workdir = args.workdir or Path("runs/quality" if args.regime == "a" else f"runs/quality-{args.regime}")
    retrain_steps = max(1, round(args.pretrain_steps * args.retrain_fraction))
    table = cells(retrain_steps, args.pretrain_steps, regime.scratch_cells, regime.retrain_lr_scale)
    results: dict[str, list[float]] = {cell.label: [] for cell in table}
    for seed in args.seeds:
        start = None
        for cell in table:
            cell_seed = args.seeds[0] if cell.stage == "pretrain" and regime.shared_start else seed
            ppl = run_cell(cell, cell_seed, args.workdir.resolve(), start)
            results[cell.label].append(ppl)
            if cell.stage == "pretrain":
                start = args.workdir.resolve() / f"seed{cell_seed}" / cell.slug / "model"
    lines = ["| model | validation ppl (mean ± sd) | vs its dense baseline, per seed (mean ± sd) | baseline | seeds |",
             "|---|---|---|---|---|"]
    for cell in table:
        values = results[cell.label]
        ratios = [value / base for value, base in zip(values, results[cell.baseline], strict=True)]
        lines.append(f"| {cell.label} | {mean_sd(values, '.2f')} | {mean_sd(ratios, '.3f')}× | {cell.baseline} | "
                     f"{len(values)} |")
    text = "\n".join(lines)
    print(text)
    command = " ".join(["python bench/quality.py", *sys.argv[1:]])
    write_section(args.out, f"Validation perplexity by method, regime {args.regime} (embedded corpus, tiny Llama)", (
        f"Command: `{command}` · pretraining {args.pretrain_steps} steps × 16 × 128 tokens · retraining "
        f"{retrain_steps} steps ({args.retrain_fraction:.0%} of the pretraining tokens) · whole validation split "
        f"(Hamlet, The Tempest, the Sonnets, Paradise Regained) · seeds {args.seeds}"
        f"{f' (one model pretrained with seed {args.seeds[0]}, retrained with each)' if regime.shared_start else ''}"
        f"{f' · retraining lr {regime.retrain_lr_scale:.3g}× each recipe' if regime.retrain_lr_scale != 1 else ''}"
        f".\n\n{text}"))


if __name__ == "__main__":
    main()
