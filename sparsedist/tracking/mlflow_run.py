"""MLflow tracking of a run, from rank 0 only (every rank logging would make one run per rank)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from sparsedist.config.schema import TrackingConfig

DEFAULT_URI = "sqlite:///mlruns.db"
_BATCH = 100  # MLflow's limit of params per log_batch call


def tracking_uri(cfg: TrackingConfig) -> str:
    """The recipe's URI, else $MLFLOW_TRACKING_URI, else a sqlite file in the working directory."""
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def git_revision() -> str:
    """The sparsedist source revision, with `-dirty` when it has uncommitted changes."""
    source = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=source, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


class Tracker:
    """One MLflow run. Built with `active=False` (ranks other than 0) every call does nothing."""

    def __init__(self, cfg: TrackingConfig, active: bool):
        self.active = active and cfg.enabled
        self.cfg = cfg
        self.run_id: str | None = None
        if self.active:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri(cfg))

    def start(self, run_name: str, params: dict[str, str], tags: dict[str, str], run_id: str | None) -> None:
        """Open a new run, or reopen `run_id` when resuming."""
        if not self.active:
            return
        from mlflow.entities import Param

        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(tags)
            return
        experiment = self.client.get_experiment_by_name(self.cfg.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.cfg.experiment)
        run = self.client.create_run(experiment_id, run_name=self.cfg.run_name or run_name,
                                     tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, object]) -> None:
        if self.active:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active and metrics:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)
