"""MLflow tracking of a run, from rank 0 only (every rank logging would make one run per rank)."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from sparsedist.config.schema import TrackingConfig

log = logging.getLogger(__name__)

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


PEAK_BF16_TFLOPS = {  # dense (not 2:4) bf16 tensor-core peaks from the vendor's data sheets; first match wins
    "H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
}


def peak_flops(cfg: TrackingConfig) -> float | None:
    """Peak FLOP/s of one device for MFU: `tracking.peak_tflops`, else the GPU's by name, else None."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def experiment_id(client, name: str) -> str:
    """The id of the store's experiment `name`, created when it is not there."""
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


class Tracker:
    """One MLflow run, from rank 0 (built with `active=False` every call does nothing).

    Every call becomes an operation that is delivered in order. While the tracking server
    is unreachable, operations queue in memory and in `buffer` (JSON lines, rewritten as the
    queue changes), delivery is retried at most every `retry_seconds`, and training goes on;
    once the server answers, the queue is replayed in order (a run not yet created is created
    first), so no metric is lost, even across a restart of the process: a new Tracker on the
    same buffer takes over its queue. Errors other than an unreachable server are raised.
    """

    def __init__(self, cfg: TrackingConfig, active: bool, buffer: Path | None = None, retry_seconds: float = 30.0):
        self.active = active and cfg.enabled
        self.cfg = cfg
        self.run_id: str | None = None
        self.buffer = buffer
        self.retry_seconds = retry_seconds
        self.pending: list[dict[str, Any]] = []
        self._next_try = 0.0
        if self.active:
            from mlflow.tracking import MlflowClient

            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a down server must not stall steps
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            self.client = MlflowClient(tracking_uri(cfg))
            if buffer is not None and buffer.is_file():
                self.pending = [json.loads(line) for line in buffer.read_text().splitlines() if line]

    def start(self, run_name: str, params: dict[str, str], tags: dict[str, Any], run_id: str | None) -> None:
        """Open a new run, or reopen `run_id` when resuming (or the run a previous process queued)."""
        if run_id is not None:
            self.run_id = run_id
            self._send({"op": "reopen", "run_id": run_id, "tags": _strings(tags)})
        elif any(op["op"] == "create" for op in self.pending):
            self._send({"op": "tags", "tags": _strings(tags)})
        else:
            self._send({"op": "create", "run_name": self.cfg.run_name or run_name,
                        "params": {k: v[:6000] for k, v in params.items()}, "tags": _strings(tags)})

    def set_tags(self, tags: dict[str, object]) -> None:
        self._send({"op": "tags", "tags": _strings(tags)})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._send({"op": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": step,
                        "time": int(time.time() * 1000)})

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status` (trying the server now); what it never took stays in the buffer for a
        later process on the same run directory."""
        self._next_try = 0.0
        self._send({"op": "finish", "status": status})
        if self.pending:
            log.warning("tracking server unreachable: %d operations kept in %s", len(self.pending), self.buffer)

    def _send(self, op: dict[str, Any]) -> None:
        if not self.active:
            return
        self.pending.append(op)
        if time.monotonic() >= self._next_try:
            self._deliver_pending()
        self._persist()

    def _deliver_pending(self) -> None:
        backlog = len(self.pending)
        while self.pending:
            try:
                self._deliver(self.pending[0])
            except Exception as err:
                if not _unreachable(err):
                    raise
                if backlog == len(self.pending):
                    log.warning("tracking server unreachable (%s); buffering to %s", _first_line(err), self.buffer)
                self._next_try = time.monotonic() + self.retry_seconds
                return
            self.pending.pop(0)
        if backlog > 1:
            log.info("tracking server reachable again: %d buffered operations delivered", backlog - 1)

    def _deliver(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "create":
            experiment = experiment_id(self.client, self.cfg.experiment)
            self.run_id = self.client.create_run(experiment, run_name=op["run_name"], tags=op["tags"]).info.run_id
            items = [Param(k, v) for k, v in op["params"].items()]
            for i in range(0, len(items), _BATCH):
                self.client.log_batch(self.run_id, params=items[i : i + _BATCH])
        elif kind == "reopen":
            self.client.update_run(op["run_id"], status="RUNNING")
            self.client.log_batch(op["run_id"], tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "metrics":
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, op["time"], op["step"])
                                                        for k, v in op["metrics"].items()])
        else:
            self.client.set_terminated(self.run_id, status=op["status"])

    def _persist(self) -> None:
        if self.buffer is None:
            return
        if self.pending:
            self.buffer.parent.mkdir(parents=True, exist_ok=True)
            self.buffer.write_text("".join(json.dumps(op) + "\n" for op in self.pending))
        else:
            self.buffer.unlink(missing_ok=True)


def _strings(values: dict[str, object]) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


def _unreachable(err: BaseException) -> bool:
    """Whether `err` (or what caused it) says the server could not be reached, rather than refused the call."""
    import requests

    while err is not None:
        if isinstance(err, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
            return True
        if "Max retries exceeded" in str(err) or "Connection refused" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__
