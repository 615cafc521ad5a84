"""Rank failure: a rank killed with SIGKILL mid-run restarts the group, which resumes from the latest
complete checkpoint and ends with the weights and masks of an uninterrupted run, bit for bit.

torchrun restarts the group itself (`--max-restarts`); the DeepSpeed launcher is started again by
`sparsedist launch`. Both are real 2-rank gloo runs of the micro recipe.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import MICRO, checkpoint_model, child_env, micro_overrides, run

STEPS = ["train.steps=16", "checkpoint.interval=4", "checkpoint.keep=10", "eval.interval=1000",
         "train.micro_batch=2"]
LAUNCHES = {  # name: (launch options, overrides)
    "fsdp2-torchrun": (["--launcher", "torchrun"], ["parallel.backend=fsdp2"]),
    "zero2-deepspeed": (["--launcher", "deepspeed"], ["parallel.backend=deepspeed", "parallel.zero_stage=2"]),
}


def launch_command(out, corpus, options: list[str], overrides: list[str]) -> list[str]:
    return ["sparsedist", "launch", str(MICRO), "--nproc", "2", *options, *overrides,
            *micro_overrides(corpus, out, *STEPS)]


def kill_rank_1_after_first_checkpoint(proc: subprocess.Popen, out) -> None:
    """SIGKILL the rank with LOCAL_RANK=1 once the first checkpoint (step 4 of 16) is complete."""
    first = out / "checkpoints" / "step_00000004" / "trainer.json"
    deadline = time.monotonic() + 300
    while not first.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if p.environ().get("LOCAL_RANK") == "1" and "sparsedist" in " ".join(p.cmdline())]
    victim = min(ranks, key=lambda p: p.create_time())  # the rank itself, not a helper process it started
    victim.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("name", LAUNCHES)
def test_a_killed_rank_restarts_the_group_and_the_run_ends_as_if_uninterrupted(corpus, tmp_path, name):
    options, overrides = LAUNCHES[name]
    straight = tmp_path / "straight"
    run(tmp_path, *launch_command(straight, corpus, options, overrides))

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    env = child_env()
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", *launch_command(out, corpus, [*options, "--max-restarts", "1"],
                                                                       overrides)],
                                cwd=tmp_path, env=env, stdout=stderr, stderr=subprocess.STDOUT)
        kill_rank_1_after_first_checkpoint(proc, out)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    text = log.read_text()
    resumed = [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert len(resumed) == 1 and 4 <= resumed[0] < 16, text[-4000:]  # one restart, from a checkpoint
    if name == "zero2-deepspeed":
        assert "the ranks failed (exit" in text and "restart 1 of 1" in text

    final = "checkpoints/step_00000016"
    ours, theirs = checkpoint_model(out / final), checkpoint_model(straight / final)
    assert any(k.endswith("mask") for k in ours) and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]
