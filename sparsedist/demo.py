"""The main job on the embedded default, end to end on CPU.

1. prepare the Shakespeare + Milton corpus;
2. pretrain the tiny dense Llama (recipes/tiny/dense.yaml) on `nproc` FSDP2 ranks;
3. retrain it to 2:4 with SR-STE (recipes/tiny/srste.yaml);
4. continue it dense for the same steps (recipes/tiny/retrain.yaml, dense): the
   control that separates what 2:4 costs from what the extra tokens give;
5. read the runs back from the MLflow store and print the table.

The one-shot figure is the SR-STE run's validation perplexity at step 0: its masks are the
magnitude 2:4 masks of the dense weights, before any retraining.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from sparsedist.config import Recipe, load_recipe
from sparsedist.data import prepare_dataset
from sparsedist.preflight import check_recipe
from sparsedist.tracking.mlflow_run import tracking_uri

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "tiny"
OUTPUT = Path("runs/demo")
EXPERIMENT = "sparsedist-demo"
QUICK = ["train.steps=4", "train.log_interval=2", "eval.sequences=16", "checkpoint.interval=2",
         "schedule.warmup_steps=1"]


@dataclass
class Stage:
    recipe_path: Path
    output_dir: Path
    overrides: list[str]


def run_demo(nproc: int, quick: bool) -> int:
    from sparsedist_launch.local import launch

    if not RECIPES.is_dir():
        print(f"sparsedist demo: needs the repository's recipes ({RECIPES} not found)", file=sys.stderr)
        return 2
    common = [f"parallel.nproc_per_node={nproc}", f"tracking.experiment={EXPERIMENT}", *(QUICK if quick else [])]
    dense, sparse, control = OUTPUT / "tiny-dense", OUTPUT / "tiny-srste", OUTPUT / "tiny-dense-continued"
    start = f"model.pretrained={dense / 'model'}"
    stages = [
        Stage(RECIPES / "dense.yaml", dense, []),
        Stage(RECIPES / "srste.yaml", sparse, [start]),
        Stage(RECIPES / "retrain.yaml", control, [start, "tracking.run_name=tiny-dense-continued"]),
    ]
    for stage in stages:
        stage.overrides = [*common, f"train.output_dir={stage.output_dir}", *stage.overrides]
    first = load_recipe(stages[0].recipe_path, stages[0].overrides)
    check_recipe(first)  # the later stages start from the first one's export and are checked at launch
    prepare_dataset(first.data, first.train.seed)
    for stage in stages:
        shutil.rmtree(stage.output_dir, ignore_errors=True)  # the demo always starts from scratch
        recipe = load_recipe(stage.recipe_path, stage.overrides)
        status = launch(recipe, str(stage.recipe_path), stage.overrides)
        if status:
            print(f"sparsedist demo: {stage.recipe_path.name} failed (exit {status})", file=sys.stderr)
            return status
    print_table(first, dense, sparse, control)
    return 0


def _run_id(output_dir: Path) -> str:
    """The MLflow run of a finished run, from the trainer state of its last checkpoint."""
    last = sorted((output_dir / "checkpoints").glob("step_*/trainer.json"))[-1]
    return json.loads(last.read_text())["mlflow_run_id"]


def print_table(recipe: Recipe, dense: Path, sparse: Path, control: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(recipe.tracking)
    client = MlflowClient(uri)
    runs = {name: client.get_run(_run_id(path)) for name, path in (("dense", dense), ("sparse", sparse),
                                                                    ("control", control))}
    sparse_id = runs["sparse"].info.run_id
    one_shot = next(m.value for m in client.get_metric_history(sparse_id, "val_ppl") if m.step == 0)
    pretrain_tokens = int(runs["dense"].data.tags["tokens"])
    extra_tokens = int(runs["sparse"].data.tags["tokens"])
    rows = [
        ("dense, pretrained", runs["dense"], None, pretrain_tokens),
        ("2:4 one-shot magnitude pruning", runs["sparse"], one_shot, pretrain_tokens),
        ("2:4 retrained with SR-STE", runs["sparse"], None, pretrain_tokens + extra_tokens),
        ("dense, continued as long (control)", runs["control"], None, pretrain_tokens + extra_tokens),
    ]
    print("\n| model | validation perplexity | tokens trained | MLflow run |\n|---|---|---|---|")
    for name, run, ppl, tokens in rows:
        ppl = run.data.metrics["final_val_ppl"] if ppl is None else ppl
        print(f"| {name} | {ppl:.2f} | {tokens:,} | {run.info.run_id} |")
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    shown = os.path.relpath(mlflow_cli) if mlflow_cli.is_relative_to(Path.cwd()) else str(mlflow_cli)
    print(f"\nOpen the runs in the MLflow UI: {shown} ui --backend-store-uri {uri}\n")
