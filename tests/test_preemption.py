"""Preemption: a signalled run checkpoints the step it finished, exits 0, and resumes exactly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import MICRO, child_env, metric_history, micro_overrides, train
from sparsedist.train.preemption import Preemption

STEPS = ["train.steps=20", "checkpoint.interval=1000", "eval.interval=1000", "train.micro_batch=2"]


def test_a_signal_is_only_recorded_until_the_ranks_agree():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        preemption = Preemption(torch.device("cpu"))
        assert preemption.agreed() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.agreed() == signal.SIGUSR1  # alone: no process group, no collective
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _mlflow_run(out) -> tuple[str, int]:
    """The status of the only run of a micro run's store, and how many loss values it logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return run.info.status, len(client.get_metric_history(run.info.run_id, "loss"))


def _steps_done(log) -> int:
    """The last step rank 0's progress bar shows."""
    return max((int(n) for n in re.findall(r"(\d+)/20 \[", log.read_text(errors="replace"))), default=0)


def test_sigusr1_stops_a_2_rank_run_with_a_checkpoint_and_the_resumed_run_matches(corpus, tmp_path):
    train(tmp_path, corpus, tmp_path / "straight", *STEPS, nproc=2)

    out, log = tmp_path / "preempted", tmp_path / "preempted.log"
    command = [sys.executable, "-m", "sparsedist", "launch", str(MICRO), "--nproc", "2", "parallel.backend=fsdp2",
               *micro_overrides(corpus, out, *STEPS)]
    env = child_env()
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300
    while _steps_done(log) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # `sparsedist launch` forwards it to both ranks
    assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]

    (checkpoint,) = (out / "checkpoints").glob("step_*")  # checkpoint.interval=1000: the preemption wrote it
    stopped = json.loads((checkpoint / "trainer.json").read_text())["step"]
    assert checkpoint.name == f"step_{stopped:08d}" and 2 <= stopped < 20, "the run ended before the signal"
    assert f"SIGUSR1: stopped after step {stopped}" in log.read_text()
    assert not (out / "model").exists()
    assert _mlflow_run(out) == ("KILLED", stopped)

    train(tmp_path, corpus, out, *STEPS, nproc=2)  # checkpoint.resume=auto
    assert _mlflow_run(out) == ("FINISHED", 20)  # the same run, every step logged once: none ran twice
    straight, resumed = metric_history(tmp_path / "straight", "loss"), metric_history(out, "loss")
    assert resumed == straight and sorted(resumed) == list(range(1, 21))  # bit for bit
    assert metric_history(out, "final_val_loss") == metric_history(tmp_path / "straight", "final_val_loss")
    ours, theirs = load_file(out / "model" / "model.safetensors"), load_file(tmp_path / "straight" / "model" /
                                                                             "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
