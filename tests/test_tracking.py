"""Tracking survives an unreachable server: a real `mlflow server`, down at the start, up, down, up again."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from sparsedist.config.schema import TrackingConfig
from sparsedist.tracking import Tracker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on 127.0.0.1 over a sqlite store that outlives its restarts."""

    def __init__(self, root, port: int):
        self.root, self.port, self.process = root, port, None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'store.db'}", "--default-artifact-root",
             str(self.root / "artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start in 90 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path, free_port())
    yield server
    if server.process and server.process.poll() is None:
        server.stop()


def test_metrics_logged_while_the_server_is_down_are_replayed_in_order(server, tmp_path):
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{server.port}", experiment="outage")
    buffer = tmp_path / "run" / "tracking-buffer.jsonl"
    tracker = Tracker(cfg, active=True, buffer=buffer, retry_seconds=0)
    tracker.start("outage", {"train.steps": "6"}, {"method": "srste"}, run_id=None)  # server not started yet
    tracker.log_metrics({"loss": 5.0}, step=1)
    assert tracker.run_id is None and len(buffer.read_text().splitlines()) == 2

    server.start()
    tracker.log_metrics({"loss": 4.0}, step=2)  # replays the queue, then delivers this
    assert tracker.run_id is not None and not buffer.exists()
    server.stop()
    for step in (3, 4):
        tracker.log_metrics({"loss": 5.0 - step}, step=step)
    tracker.set_tags({"tokens": 1024})
    assert len(buffer.read_text().splitlines()) == 3

    # the process ends while the server is down; a new one on the same run directory takes the queue over
    tracker.finish()
    successor = Tracker(cfg, active=True, buffer=buffer, retry_seconds=0)
    server.start()
    successor.start("outage", {}, {"method": "srste"}, run_id=tracker.run_id)
    successor.finish()
    assert not buffer.exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "6" and run.data.tags["tokens"] == "1024"
    history = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss"))
    assert history == [(1, 5.0), (2, 4.0), (3, 2.0), (4, 1.0)]
    assert len(client.search_runs([run.info.experiment_id])) == 1
