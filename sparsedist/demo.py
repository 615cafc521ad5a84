"""The main job on the embedded default, end to end on CPU.

1. prepare the Shakespeare + Milton corpus;
2. pretrain the tiny dense Llama (recipes/tiny/dense.yaml) on `nproc` FSDP2 ranks;
3. retrain it to 2:4 with SR-STE (recipes/tiny/srste.yaml) on `nproc` ranks;
4. read the runs back from the MLflow store and print dense, one-shot 2:4 and retrained 2:4 perplexities.

The one-shot figure is the SR-STE run's validation perplexity at step 0: its masks are
the magnitude 2:4 masks of the dense weights, before any retraining.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from sparsedist.config import load_recipe
from sparsedist.config.check import check_recipe
from sparsedist.data import prepare_dataset
from sparsedist.tracking.mlflow_run import tracking_uri

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "tiny"
OUTPUT = Path("runs/demo")
EXPERIMENT = "sparsedist-demo"
QUICK = ["train.steps=4", "train.log_interval=2", "eval.sequences=16", "checkpoint.interval=2", "schedule.warmup_steps=1"]


def run_demo(nproc: int, quick: bool) -> int:
    from sparsedist_launch.torchrun import launch

    if not RECIPES.is_dir():
        print(f"sparsedist demo: needs the repository's recipes ({RECIPES} not found)", file=sys.stderr)
        return 2
    common = [f"parallel.nproc_per_node={nproc}", f"tracking.experiment={EXPERIMENT}", *(QUICK if quick else [])]
    dense_dir, sparse_dir = OUTPUT / "tiny-dense", OUTPUT / "tiny-srste"
    stages = [
        (RECIPES / "dense.yaml", [*common, f"train.output_dir={dense_dir}"]),
        (RECIPES / "srste.yaml", [*common, f"train.output_dir={sparse_dir}", f"model.pretrained={dense_dir / 'model'}"]),
    ]
    first = load_recipe(*map(str, stages[0]))
    check_recipe(first)
    prepare_dataset(first.data, first.train.seed)
    for path, overrides in stages:
        out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("train.output_dir=")))
        shutil.rmtree(out, ignore_errors=True)  # the demo always starts from scratch
        status = launch(load_recipe(path, overrides), str(path), overrides)
        if status:
            print(f"sparsedist demo: {path.name} failed (exit {status})", file=sys.stderr)
            return status
    print_table(dense_dir, sparse_dir, tracking_uri(first.tracking))
    return 0


def _run_id(output_dir: Path) -> str:
    """The MLflow run of a finished run, from the trainer state of its last checkpoint."""
    last = sorted((output_dir / "checkpoints").glob("step_*/trainer.json"))[-1]
    return json.loads(last.read_text())["mlflow_run_id"]


def print_table(dense_dir: Path, sparse_dir: Path, uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    dense_id, sparse_id = _run_id(dense_dir), _run_id(sparse_dir)
    one_shot = next(m.value for m in client.get_metric_history(sparse_id, "val_ppl") if m.step == 0)
    rows = [
        ("dense (pretrained)", client.get_run(dense_id).data.metrics["final_val_ppl"], dense_id),
        ("2:4 one-shot magnitude", one_shot, f"{sparse_id} (step 0)"),
        ("2:4 retrained with SR-STE", client.get_run(sparse_id).data.metrics["final_val_ppl"], sparse_id),
    ]
    print("\n| model | validation perplexity | MLflow run |\n|---|---|---|")
    for name, ppl, run in rows:
        print(f"| {name} | {ppl:.2f} | {run} |")
    print(f"\nOpen them in the MLflow UI: mlflow ui --backend-store-uri {uri}\n")
