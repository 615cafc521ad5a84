"""`sparsedist launch`: the commands it builds (one node, several nodes, the deepspeed hostfile),
its rank environment, its refusals, and the preemption signals it forwards to the ranks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import MICRO
from sparsedist.cli import main
from sparsedist.config import load_recipe, recipe_hash
from sparsedist_launch import local
from sparsedist_launch.local import (
    Nodes,
    deepspeed_command,
    rank_processes,
    rank_variables,
    torchrun_command,
    wait_forwarding,
)

PY = sys.executable
TRAIN = ["-m", "sparsedist", "train", "r.yaml", "a.b=1"]


RANK_VARIABLES = ("OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_DEBUG",
                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")


def recipe(*overrides: str):
    return load_recipe(MICRO, ["parallel.backend=fsdp2", "parallel.nproc_per_node=2", "train.micro_batch=2",
                               *overrides])


def test_one_node_torchrun_is_standalone():
    assert torchrun_command(recipe(), "r.yaml", ["a.b=1"]) == [
        PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0", *TRAIN]
    assert "--max-restarts=3" in torchrun_command(recipe(), "r.yaml", [], max_restarts=3)


def test_several_nodes_meet_at_a_c10d_rendezvous():
    r = recipe("parallel.nnodes=3")
    assert torchrun_command(r, "r.yaml", ["a.b=1"], Nodes("node-1.cluster:29400", "job42")) == [
        PY, "-m", "torch.distributed.run", "--nnodes=3", "--rdzv-backend=c10d",
        "--rdzv-endpoint=node-1.cluster:29400", "--rdzv-id=job42", "--nproc-per-node=2", "--max-restarts=0", *TRAIN]
    # without an id every node derives the same one from the recipe
    command = torchrun_command(r, "r.yaml", [], Nodes("node-1:29400"))
    assert f"--rdzv-id=micro-{recipe_hash(r)}" in command


def test_deepspeed_launcher_on_one_node_and_with_a_hostfile(tmp_path, monkeypatch):
    r = recipe("parallel.backend=deepspeed")
    assert deepspeed_command(r, "r.yaml", ["a.b=1"]) == [
        PY, "-m", "deepspeed.launcher.runner", "--num_gpus=2", "--no_local_rank", "--module",
        "sparsedist", "train", "r.yaml", "a.b=1"]
    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    hosts = tmp_path / "hostfile"
    r = recipe("parallel.backend=deepspeed", "parallel.nnodes=3")
    # pdsh carries only a few variables to the other nodes: the rank environment travels in the command
    assert deepspeed_command(r, "r.yaml", ["a.b=1"], Nodes("node-1:29500", hostfile=hosts)) == [
        PY, "-m", "deepspeed.launcher.runner", f"--hostfile={hosts}", "--num_nodes=3", "--num_gpus=2",
        "--master_addr=node-1", "--master_port=29500", "--no_local_rank", "--no_python",
        "env", "OMP_NUM_THREADS=8", "TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "NCCL_DEBUG=WARN",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", PY, "-u", "-m", "sparsedist", "train", "r.yaml", "a.b=1"]


def test_rank_environment_splits_the_cpus_and_keeps_what_is_set(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    for key in RANK_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    assert rank_variables(4) == {"OMP_NUM_THREADS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
                                 "NCCL_DEBUG": "WARN", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    assert rank_variables(2)["OMP_NUM_THREADS"] == "3"
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    env = local.rank_environment(recipe())
    assert env["NCCL_DEBUG"] == "INFO" and env["OMP_NUM_THREADS"] == "5"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["PATH"] == os.environ["PATH"]


@pytest.mark.parametrize("overrides, launcher, nodes, message", [
    (["parallel.nnodes=3"], "torchrun", Nodes(),
     "parallel.nnodes=3 needs --rdzv-endpoint HOST:PORT (run it on every node)"),
    ([], "torchrun", Nodes("node-1"), "--rdzv-endpoint 'node-1': expected HOST:PORT"),
    ([], "torchrun", Nodes(hostfile="hosts"),
     "--hostfile is for --launcher deepspeed; torchrun runs on every node with --rdzv-endpoint"),
    (["parallel.nnodes=3", "parallel.backend=deepspeed"], "deepspeed", Nodes(),
     "parallel.nnodes=3 with --launcher deepspeed needs --hostfile"),
    ([], "deepspeed", Nodes(), "--launcher deepspeed needs parallel.backend deepspeed, not fsdp2"),
])
def test_refusals_start_nothing(monkeypatch, capsys, overrides, launcher, nodes, message):
    monkeypatch.setattr(subprocess, "Popen", None)  # starting anything would raise
    assert local.launch(recipe(*overrides), "r.yaml", [], launcher, nodes) == 2
    assert capsys.readouterr().err == f"sparsedist launch: {message}\n"


def test_cli_passes_the_nodes_and_the_layout(monkeypatch):
    seen = {}

    def fake_launch(r, path, overrides, launcher, nodes, max_restarts):
        seen.update(world=r.parallel.world_size, overrides=overrides, launcher=launcher, nodes=nodes,
                    restarts=max_restarts)
        return 0

    monkeypatch.setattr(local, "launch", fake_launch)
    assert main(["launch", str(MICRO), "parallel.backend=fsdp2", "--nproc", "2", "--nnodes", "3",
                 "--rdzv-endpoint", "node-1:29400", "--rdzv-id", "job42", "--max-restarts", "2",
                 "train.micro_batch=2"]) == 0
    assert seen == {"world": 6, "launcher": "torchrun", "nodes": Nodes("node-1:29400", "job42"), "restarts": 2,
                    "overrides": ["parallel.backend=fsdp2", "train.micro_batch=2", "parallel.nproc_per_node=2",
                                  "parallel.nnodes=3"]}


# A node of fake ranks: for a second each would die of SIGUSR1 (still starting up), then it exits 0 on it.
FAKE_RANK = ("import signal, sys, time; time.sleep(1); "
             "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(0)); time.sleep(60); sys.exit(3)")
FAKE_NODE = ("import os, subprocess, sys; "
             f"ranks = [subprocess.Popen([sys.executable, '-c', {FAKE_RANK!r}], "
             "env={**os.environ, 'LOCAL_RANK': str(i)}) for i in range(2)]; "
             "sys.exit(max(r.wait() for r in ranks))")


def test_rank_processes_are_the_topmost_with_local_rank():
    child = "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    node = ("import os, subprocess, sys, time; "
            f"[subprocess.Popen([sys.executable, '-c', {child!r}], env={{**os.environ, 'LOCAL_RANK': str(i)}}) "
            "for i in range(2)]; time.sleep(30)")
    with subprocess.Popen([sys.executable, "-c", node], start_new_session=True) as proc:
        try:
            deadline = time.monotonic() + 20
            while len(descendants := local.psutil.Process(proc.pid).children(recursive=True)) < 4:
                assert time.monotonic() < deadline, descendants
                time.sleep(0.05)
            ranks = rank_processes(proc.pid)
            assert sorted(p.ppid() for p in ranks) == [proc.pid, proc.pid]
            assert all(p.cmdline()[:2] == [sys.executable, "-c"] for p in ranks)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_reaches_the_ranks_as_sigusr1_once_they_handle_it(monkeypatch):
    monkeypatch.setattr(local, "POLL_S", 0.2)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    proc = subprocess.Popen([sys.executable, "-c", FAKE_NODE])
    threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()  # while the ranks cannot take it
    started = time.monotonic()
    assert wait_forwarding(proc) == (0, True)  # the node (not signalled: it would die) saw both ranks exit 0
    assert 0.9 < time.monotonic() - started < 10
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == handlers


def test_the_deepspeed_launcher_is_started_again_after_a_failure_but_not_after_a_preemption(tmp_path, monkeypatch,
                                                                                            capsys):
    r = recipe("parallel.backend=deepspeed")
    tries = tmp_path / "tries"
    fails_twice = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.write_text(p.read_text() + 'x') "
                   "if p.exists() else p.write_text('x'); sys.exit(0 if len(p.read_text()) > 2 else 9)")
    monkeypatch.setattr(local, "deepspeed_command", lambda *args: [sys.executable, "-c", fails_twice, str(tries)])
    assert local.launch(r, "r.yaml", [], "deepspeed", max_restarts=1) == 9
    assert tries.read_text() == "xx"
    tries.unlink()
    assert local.launch(r, "r.yaml", [], "deepspeed", max_restarts=2) == 0
    assert tries.read_text() == "xxx"
    assert "restart 2 of 2, from the latest complete checkpoint" in capsys.readouterr().err

    runs = []  # a failure after a forwarded preemption signal: the job is going away
    monkeypatch.setattr(local, "run_forwarding", lambda command, recipe: runs.append(command) or (1, True))
    assert local.launch(r, "r.yaml", [], "deepspeed", max_restarts=5) == 1 and len(runs) == 1
