"""`sparsedist slurm render`: a ready sbatch script for a recipe, from slurm/job.sbatch.in.

The job runs one `sparsedist launch` per node (torchrun, c10d rendezvous on the first node),
checkpoints and requeues itself on USR1, and resumes from its latest checkpoint in an output
directory fixed at render time. `--sweep KEY=V1,V2,...` makes it a job array: task i runs the
i-th point of the grid of all sweeps (the last one varying fastest) into `<output_dir>/task_<i>`.

No value reaches the shell unquoted: `#SBATCH` lines (read by sbatch before any shell runs) only
take values matching narrow patterns, and every word of the commands is `shlex.quote`d.
"""

from __future__ import annotations

import itertools
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from sparsedist.config import load_recipe
from sparsedist.errors import SlurmError
from sparsedist.preflight import check_recipe

TEMPLATE = Path(__file__).resolve().parent.parent / "slurm" / "job.sbatch.in"
SAFE = re.compile(r"[\w.,:@+=/-]+")  # a value fit for an #SBATCH line: no blanks, quotes or newlines
TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE")
RANGE = r"\d+(-\d+(:\d+)?)?"
ARRAY = re.compile(rf"{RANGE}(,{RANGE})*(%\d+)?")
OPTION = re.compile(r"--[a-z][a-z-]*(=[\w.,:@+=/-]+)?")


@dataclass
class Job:
    """What `sparsedist slurm render` was asked for."""

    recipe: Path
    overrides: list[str]
    nodes: int
    gpus_per_node: int = 0
    procs_per_node: int | None = None
    """Ranks per node without GPUs (default 1); with GPUs, one per GPU."""
    cpus_per_node: int | None = None
    partition: str | None = None
    time: str | None = None
    array: str | None = None
    """Which sweep points to run, and at most how many at once (`0-9%2`); default: all."""
    sweep: list[str] = field(default_factory=list)
    signal_seconds: int = 300
    sbatch: list[str] = field(default_factory=list)
    """More `#SBATCH` options, e.g. `--account=abc`."""
    max_restarts: int = 0
    """How often each node's torchrun starts its ranks again after one dies (`launch --max-restarts`)."""


def sweep_points(sweep: list[str]) -> list[list[str]]:
    """The overrides of each array task (none without sweeps): the grid of `KEY=V1,V2,...` sweeps,
    the last key varying fastest."""
    axes = []
    for spec in sweep:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise SlurmError(f"--sweep {spec!r}: expected KEY=V1,V2,...")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(point) for point in itertools.product(*axes)] if axes else []


def _checked(name: str, value: str, pattern: re.Pattern[str]) -> str:
    if not pattern.fullmatch(value):
        raise SlurmError(f"{name} {value!r}: not a value an #SBATCH line can take")
    return value


def _words(words: list[str]) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def render(job: Job, cwd: Path | None = None) -> str:
    """The job script. Validates every task's recipe; creates the output directory (Slurm writes its log there)."""
    cwd = (cwd or Path.cwd()).resolve()
    counts = [job.nodes, *(n for n in (job.procs_per_node, job.cpus_per_node) if n is not None)]
    if min(counts) < 1 or job.gpus_per_node < 0:
        raise SlurmError("--nodes, --procs-per-node and --cpus-per-node must be at least 1, --gpus-per-node at least 0")
    if job.gpus_per_node and job.procs_per_node is not None:
        raise SlurmError("--procs-per-node is for CPU jobs (--gpus-per-node 0); GPU jobs run one rank per GPU")
    if job.array and not job.sweep:
        raise SlurmError("--array needs --sweep: every task would run the same recipe into the same directory")
    if not 0 < job.signal_seconds < 65536:
        raise SlurmError(f"--signal-seconds {job.signal_seconds}: expected 1 to 65535")
    path = (cwd / job.recipe).resolve()
    nproc = job.gpus_per_node or job.procs_per_node or 1
    layout = [f"parallel.nnodes={job.nodes}", f"parallel.nproc_per_node={nproc}"]
    recipe = load_recipe(path, [*job.overrides, *layout])
    out = cwd / recipe.train.output_dir
    points = sweep_points(job.sweep)
    tasks = [[*point, f"train.output_dir={out / f'task_{i}'}"] for i, point in enumerate(points)] or \
        [[f"train.output_dir={out}"]]
    for task in tasks:
        check_recipe(load_recipe(path, [*job.overrides, *layout, *task]))

    name = re.sub(r"[^\w.-]", "_", recipe.name)[:64] or "sparsedist"
    sbatch = [f"--job-name={name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus_per_node:
        sbatch.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.cpus_per_node:
        sbatch.append(f"--cpus-per-task={job.cpus_per_node}")
    if job.time:
        sbatch.append(f"--time={_checked('--time', job.time, TIME)}")
    if job.partition:
        sbatch.append(f"--partition={_checked('--partition', job.partition, SAFE)}")
    if points:
        sbatch.append(f"--array={_checked('--array', job.array or f'0-{len(points) - 1}', ARRAY)}")
    _checked("working directory", str(cwd), SAFE)
    _checked("train.output_dir", str(out), SAFE)
    sbatch += [f"--signal=B:USR1@{job.signal_seconds}", "--requeue", "--open-mode=append", f"--chdir={cwd}",
               f"--output={out / ('slurm-%A_%a.out' if points else 'slurm-%j.out')}",
               *(_checked("--sbatch", option, OPTION) for option in job.sbatch)]

    if points:
        cases = [f"    {i}) task=({_words(task)}) ;;" for i, task in enumerate(tasks)]
        task_lines = "\n".join(['case "${SLURM_ARRAY_TASK_ID:-}" in', *cases,
                                f'    *) echo "array task ${{SLURM_ARRAY_TASK_ID:-}}: not a sweep point '
                                f'(0-{len(tasks) - 1})" >&2; exit 2 ;;', "esac"])
    else:
        task_lines = f"task=({_words(tasks[0])})"
    launch = [sys.executable, "-m", "sparsedist", "launch", path, "--nproc", nproc,
              "--nnodes", job.nodes, "--max-restarts", job.max_restarts, *job.overrides]
    out.mkdir(parents=True, exist_ok=True)
    return Template(TEMPLATE.read_text()).substitute(
        recipe_name=name, sbatch_lines="\n".join(f"#SBATCH {line}" for line in sbatch),
        signal_seconds=job.signal_seconds, task_lines=task_lines, launch=_words(launch))
