"""A scaling ladder on the CPU: 4 tiny Llamas × 3 token budgets, dense and CAST, then the three laws fitted.

    python bench/ladder.py [--workdir runs/ladder] [--out docs/results.md]

Every cell is a real run through `sparsedist train` from scratch on the embedded corpus (one
process, 16 × 128 tokens per step, validation every quarter of the run), logged to an MLflow
store under the work dir (experiment `ladder`); finished cells are skipped when the ladder
runs again. CAST trains with its recipe settings (AdamS, masks every 10 steps, weight
scaling, final hard prune) without distillation, since there is no dense start to distil
from. Then `sparsedist.scaling` fits, on that experiment: the `tokens` law per model and
method, the `chinchilla` law per method (final losses, largest N·D held out) and the `gap`
law of CAST against dense; the held-out errors, the parameters and the plots (docs/figures/)
go to `--out` with this command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SIZES = {  # name: (hidden, ffn, layers, heads)
    "d32": (32, 96, 2, 2),
    "d64": (64, 192, 2, 2),
    "d96": (96, 288, 3, 3),
    "d128": (128, 384, 4, 4),
}
STEPS = (100, 200, 400)
METHODS = {"dense": "sparsity={method: dense}",
           "cast": "sparsity={method: cast, targets: all_linear, refresh_interval: 10, decay: 1.0e-4}"}


def run_cell(size: str, steps: int, method: str, workdir: Path) -> float:
    """Train one cell unless an earlier invocation finished it; the seconds its run took (written to `done`)."""
    out = workdir / f"{size}-{steps}-{method}"
    if (out / "done").exists():
        return float((out / "done").read_text())
    hidden, ffn, layers, heads = SIZES[size]
    config = (f"model.config={{hidden_size: {hidden}, intermediate_size: {ffn}, num_hidden_layers: {layers}, "
              f"num_attention_heads: {heads}, num_key_value_heads: {heads}, max_position_embeddings: 256}}")
    overrides = [
        config, METHODS[method], f"train.steps={steps}", "train.global_batch=16", "train.micro_batch=16",
        f"schedule.warmup_steps={steps // 20}", f"eval.interval={steps // 4}", "eval.sequences=64",
        f"checkpoint.interval={steps}", "checkpoint.keep=1", "checkpoint.export=false",
        "parallel.backend=none", "parallel.nproc_per_node=1", f"train.output_dir={out}",
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", "tracking.experiment=ladder",
        f"tracking.run_name={size} {steps} steps {method}",
    ]
    out.mkdir(parents=True, exist_ok=True)
    print(f"{size} × {steps} steps, {method} (log: {out / 'train.log'})", flush=True)
    started = time.monotonic()
    with open(out / "train.log", "a") as log:
        subprocess.run([sys.executable, "-m", "sparsedist", "train", str(REPO / "recipes/tiny/llama.yaml"),
                        *overrides], check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
    seconds = time.monotonic() - started
    (out / "done").write_text(f"{seconds:.1f}")
    return seconds


def fit_all(workdir: Path, figures: Path) -> str:
    """Fit the three laws on the ladder's runs; returns the markdown of the results."""
    from sparsedist.scaling.fit import fit_law
    from sparsedist.scaling.laws import get_law
    from sparsedist.scaling.plot import plot_fits
    from sparsedist.scaling.points import datasets
    from sparsedist.scaling.runs import load_runs

    records = load_runs(f"sqlite:///{workdir / 'mlflow.db'}", "ladder")
    figures.mkdir(parents=True, exist_ok=True)
    parts = []
    for law_name, method in (("tokens", "dense"), ("tokens", "cast"), ("chinchilla", "dense"),
                             ("chinchilla", "cast"), ("gap", "cast")):
        law = get_law(law_name)
        fits = [fit_law(law, d.points, d.label, d.n_params) for d in datasets(law, records, method)]
        plot = plot_fits(fits, figures / f"ladder-{law_name}-{method}.png")
        summaries = "\n".join(fit.summary() for fit in fits)
        parts.append(f"**{law_name}, {method}** ([plot](figures/{plot.name})):\n\n```\n{summaries}\n```")
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/ladder"))
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    seconds = [run_cell(size, steps, method, workdir) for steps in STEPS for size in SIZES for method in METHODS]
    wall = f"{len(seconds)} runs, {sum(seconds) / 60:.1f} minutes in all"
    body = fit_all(workdir, args.out.parent / "figures")
    sizes = ", ".join(f"{name} (d={h}, ffn={f}, {n} layers)" for name, (h, f, n, _) in SIZES.items())
    command = shlex.join(["python", "bench/ladder.py", *sys.argv[1:]])
    write_section(args.out, "Scaling ladder: tiny Llamas × token budgets, dense and CAST", (
        f"Command: `{command}` · CPU ({os.cpu_count()} cores), one process per run, {wall} · models {sizes}, "
        "vocab 8192 · "
        f"{', '.join(map(str, STEPS))} steps of 16 × 128 tokens, from scratch on the embedded corpus · "
        f"CAST: {METHODS['cast']}, no distillation · fits by `sparsedist.scaling` (docs/scaling.md): "
        "Huber on log-loss, L-BFGS-B from a grid of starts, 95% bootstrap intervals, the largest budget held "
        "out.\n\n" + body))
    print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    main()
