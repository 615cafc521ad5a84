"""Zero-shot tasks through EleutherAI's lm-evaluation-harness (`lm_eval.simple_evaluate`).

A plain exported directory runs as the harness's `hf` model on its local path
(`pretrained=DIR`); a compressed directory is first loaded back to a dense model by sparsedist
and handed to the same class (`HFLM(pretrained=model)`). Tasks come from the harness's registry
(their data fetched from the Hugging Face Hub on first use) or from `include_path`, a folder of
task YAML files. A checkpoint is exported first by the caller (`sparsedist.export.exported`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsedist.errors import EvalError
from sparsedist.eval.compress import is_compressed
from sparsedist.eval.load import check_model_dir, load_model


def run_tasks(path: Path, tasks: list[str], include_path: Path | None = None, limit: int | None = None,
              batch_size: int = 4, device: str = "cpu") -> dict[str, Any]:
    """The harness's results (`results`, `versions`, `n-samples`, ...) of the model directory `path`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    path = check_model_dir(path)

    manager = TaskManager(include_path=str(include_path), include_defaults=False) if include_path else None
    if manager is None or not set(tasks) <= set(manager.all_tasks):  # indexing the harness's own tasks takes ~10 s
        manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    if is_compressed(path):
        model, tokenizer = load_model(path, device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        out = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    else:
        args = {"pretrained": str(path), "device": device, "dtype": "float32"}
        out = simple_evaluate(model="hf", model_args=args, tasks=tasks, batch_size=batch_size,
                              limit=limit, task_manager=manager, log_samples=False)
    return {key: out[key] for key in ("results", "versions", "n-samples", "configs") if key in out}


def result_rows(results: dict[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every numeric metric of the harness's `results`."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, comma, _ = key.partition(",")  # metrics are "name,filter"; other keys are metadata
            if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(key.replace(name, f"{name}_stderr", 1))
            rows.append((task, name, float(value), stderr if isinstance(stderr, (int, float)) else None))
    return rows
