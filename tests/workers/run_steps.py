"""Run under torchrun (or alone): training jobs of one recipe on one backend; report their full models.

argv: output .pt file, jobs as JSON, recipe, overrides shared by the jobs. A job is
{"steps": steps to run, "resume": checkpoint folder or null, "start": its step, "overrides": [...]}:
it restores the checkpoint with checkpoint.load_state (no manifest or recipe check), runs
steps [start, start + steps), writing checkpoints every `checkpoint.interval` steps like the
trainer. Rank 0 writes {job: {"state": every full model tensor on the CPU (weights and packed
masks), "norms": the gradient norm of each step}}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sparsedist.checkpoint.checkpointer import load_state
from sparsedist.config import load_recipe
from sparsedist.parallel import init_runtime, shutdown
from sparsedist.train.trainer import Trainer


def main() -> None:
    out, jobs, recipe_path, *overrides = sys.argv[1:]
    runtime = init_runtime()
    report = {}
    for name, job in json.loads(jobs).items():
        recipe = load_recipe(recipe_path, [*overrides, *job.get("overrides", []), f"train.output_dir={out}.{name}"])
        trainer = Trainer(recipe, runtime)
        if job.get("resume"):
            load_state(Path(job["resume"]), trainer.backend, trainer.method.store, trainer.model, trainer.optimizer)
        norms = []
        for step in range(job.get("start", 0), job.get("start", 0) + job["steps"]):
            norms.append(trainer.train_step(step)["grad_norm"])
            if (step + 1) % recipe.checkpoint.interval == 0:
                trainer._save(step + 1)
        report[name] = {"state": trainer.student.full_state(), "norms": norms}
    if runtime.is_main:
        torch.save(report, out)
    shutdown()


if __name__ == "__main__":
    main()
