"""Start the ranks of a validated recipe on this node, with torchrun or the DeepSpeed launcher.

One node: `torchrun --standalone`, or `deepspeed` on this node. Several nodes
(`parallel.nnodes > 1`): torchrun with c10d rendezvous, run once on every node with the same
endpoint and id (the Slurm job does that), or the `deepspeed` launcher on one node with a
hostfile (it starts the other nodes' ranks over pdsh/ssh).

While the ranks run, SIGTERM and SIGUSR1 sent to this process reach each rank once as SIGUSR1
(a preemption: they checkpoint and exit 0, see sparsedist/train/preemption.py), as soon as the
rank handles it: a rank still starting up, or already exiting, would ignore it or die of it
(Linux: the rank's SigCgt mask in /proc tells). The launcher's children inherit an ignored
SIGUSR1, since Slurm signals every process of a job step: torchrun must survive it.

A rank that dies (`--max-restarts N`): torchrun stops the others and starts the group again,
up to N times; the DeepSpeed launcher, which also stops every rank when one fails, is started
again by this process. Either way the new ranks resume from the latest complete checkpoint
(`checkpoint.resume: auto`); the steps since then run again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from sparsedist.config import Recipe, recipe_hash

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
POLL_S = 1.0
ENDPOINT = re.compile(r"[\w.-]+:\d+")


@dataclass(frozen=True)
class Nodes:
    """Where the ranks of a multi-node run meet; all fields unused on one node without them."""

    rdzv_endpoint: str | None = None
    """HOST:PORT: torchrun's c10d store (on that host), or the DeepSpeed master address and port."""
    rdzv_id: str | None = None
    """The rendezvous id shared by every node's torchrun (default: recipe name and hash)."""
    hostfile: Path | None = None
    """deepspeed: an MPI-style hostfile (`host slots=N` per line) naming every node."""


def torchrun_command(recipe: Recipe, recipe_path: str, overrides: list[str], nodes: Nodes = Nodes(),
                     max_restarts: int = 0) -> list[str]:
    """torchrun with one process per rank of this node, each running `sparsedist train`; a failed group
    starts again up to `max_restarts` times.

    `--standalone` on one node without an endpoint; otherwise c10d rendezvous at the endpoint.
    """
    if nodes.rdzv_endpoint is None:
        placement = ["--standalone"]
    else:
        rdzv_id = nodes.rdzv_id or f"{recipe.name}-{recipe_hash(recipe)}"
        placement = [f"--nnodes={recipe.parallel.nnodes}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={nodes.rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    return [
        sys.executable, "-m", "torch.distributed.run",
        *placement, f"--nproc-per-node={recipe.parallel.nproc_per_node}", f"--max-restarts={max_restarts}",
        "-m", "sparsedist", "train", recipe_path, *overrides,
    ]


def deepspeed_command(recipe: Recipe, recipe_path: str, overrides: list[str], nodes: Nodes = Nodes()) -> list[str]:
    """The `deepspeed` launcher; ranks read LOCAL_RANK from the environment.

    With a hostfile the ranks of the other nodes start over pdsh, which carries only a few
    variables: each rank's command then starts with `env` and the rank environment.
    """
    parallel = recipe.parallel
    train = ["sparsedist", "train", recipe_path, *overrides]
    if nodes.hostfile is None:
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={parallel.nproc_per_node}",
                "--no_local_rank", "--module", *train]
    master = []
    if nodes.rdzv_endpoint is not None:
        host, port = nodes.rdzv_endpoint.rsplit(":", 1)
        master = [f"--master_addr={host}", f"--master_port={port}"]
    env = [f"{k}={v}" for k, v in rank_variables(parallel.nproc_per_node).items()]
    return [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={nodes.hostfile}",
            f"--num_nodes={parallel.nnodes}", f"--num_gpus={parallel.nproc_per_node}", *master,
            "--no_local_rank", "--no_python", "env", *env, sys.executable, "-u", "-m", *train]


def rank_variables(nproc_per_node: int) -> dict[str, str]:
    """The conventional rank environment: this node's CPUs split between its ranks, NCCL errors raised
    (not hung on) and NCCL warnings shown, and a process group store of the ranks' own rather than
    torchrun's rendezvous store: on the shared one, a restarted group can read the keys of the
    failed attempt and hang in init_process_group (pytorch/pytorch#135712; seen under gloo with
    torch 2.13). Values already in the environment win."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    defaults = {"OMP_NUM_THREADS": str(max(1, cpus // nproc_per_node)),
                "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return {k: os.environ.get(k, v) for k, v in defaults.items()}


def rank_environment(recipe: Recipe) -> dict[str, str]:
    """The launch environment: this process's, with `rank_variables` added."""
    return {**os.environ, **rank_variables(recipe.parallel.nproc_per_node)}


def refusal(recipe: Recipe, launcher: str, nodes: Nodes) -> str | None:
    """Why this launch cannot start (one line), or None."""
    parallel = recipe.parallel
    if launcher == "deepspeed" and parallel.backend != "deepspeed":
        return f"--launcher deepspeed needs parallel.backend deepspeed, not {parallel.backend}"
    if nodes.rdzv_endpoint is not None and not ENDPOINT.fullmatch(nodes.rdzv_endpoint):
        return f"--rdzv-endpoint {nodes.rdzv_endpoint!r}: expected HOST:PORT"
    if launcher == "torchrun" and nodes.hostfile is not None:
        return "--hostfile is for --launcher deepspeed; torchrun runs on every node with --rdzv-endpoint"
    if launcher == "torchrun" and parallel.nnodes > 1 and nodes.rdzv_endpoint is None:
        return f"parallel.nnodes={parallel.nnodes} needs --rdzv-endpoint HOST:PORT (run it on every node)"
    if launcher == "deepspeed" and parallel.nnodes > 1 and nodes.hostfile is None:
        return f"parallel.nnodes={parallel.nnodes} with --launcher deepspeed needs --hostfile"
    return None


def launch(recipe: Recipe, recipe_path: str, overrides: list[str], launcher: str = "torchrun",
           nodes: Nodes = Nodes(), max_restarts: int = 0) -> int:
    """Run the recipe's ranks on this node to completion with `launcher`, starting a failed group again up
    to `max_restarts` times; returns the exit status."""
    reason = refusal(recipe, launcher, nodes)
    if reason:
        print(f"sparsedist launch: {reason}", file=sys.stderr)
        return 2
    if launcher == "torchrun":
        return run_forwarding(torchrun_command(recipe, recipe_path, overrides, nodes, max_restarts), recipe)[0]
    command = deepspeed_command(recipe, recipe_path, overrides, nodes)
    for attempt in range(max_restarts + 1):
        status, signalled = run_forwarding(command, recipe)
        if status == 0 or signalled:  # a preempted or cancelled job is not restarted
            break
        if attempt < max_restarts:
            print(f"sparsedist launch: the ranks failed (exit {status}); restart {attempt + 1} of {max_restarts}, "
                  "from the latest complete checkpoint", file=sys.stderr)
    return status


def run_forwarding(command: list[str], recipe: Recipe) -> tuple[int, bool]:
    """Run a launcher command with the rank environment; its exit status, and whether a preemption signal
    was forwarded to it."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # inherited by the launcher and the starting ranks
    try:
        proc = subprocess.Popen(command, env=rank_environment(recipe))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    with proc:
        return wait_forwarding(proc)


def wait_forwarding(proc: subprocess.Popen) -> tuple[int, bool]:
    """Wait for `proc`; after a SIGTERM or SIGUSR1, send SIGUSR1 once to each of its ranks that handles it.
    Returns the exit status and whether such a signal came."""
    requested, signalled = False, set()

    def deliver() -> None:
        for rank in rank_processes(proc.pid):
            if rank.pid not in signalled and catches(rank.pid, signal.SIGUSR1):
                try:
                    rank.send_signal(signal.SIGUSR1)
                    signalled.add(rank.pid)
                except psutil.Error:
                    pass  # exited meanwhile

    def forward(signum: int, frame: object) -> None:
        nonlocal requested
        requested = True
        deliver()

    previous = {sig: signal.signal(sig, forward) for sig in PREEMPT_SIGNALS}
    try:
        while True:
            try:
                return proc.wait(timeout=POLL_S), requested  # a handler does not end a blocking wait: poll
            except subprocess.TimeoutExpired:
                if requested:
                    deliver()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (its SigCgt mask in /proc; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            caught = next(line.split()[1] for line in status if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught, 16) >> (sig - 1) & 1)


def rank_processes(pid: int) -> list[psutil.Process]:
    """The rank processes under `pid`: the topmost descendants whose environment holds LOCAL_RANK
    (their own children inherit it, and must not be signalled)."""
    def is_rank(process: psutil.Process) -> bool:
        try:
            return "LOCAL_RANK" in process.environ()
        except psutil.Error:
            return False

    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = {p.pid: p for p in descendants if is_rank(p)}
    return [p for p in ranks.values() if p.ppid() not in ranks]
