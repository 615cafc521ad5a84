"""Soak: a 2-rank sparse run for a fixed wall time, watched for memory growth and checkpoint health.

    python bench/soak.py [--minutes 30] [--checkpoint-interval 300] [--sample-seconds 10] [--out docs/results.md]

`sparsedist launch` runs recipes/tiny/sparse-pretrain.yaml (transposable 2:4 masks,
masked decay, flip-rate monitoring; FSDP2 over gloo) with an unreachable step budget and a
checkpoint every `--checkpoint-interval` steps, keeping the last 3. Every `--sample-seconds`
it records each rank's resident memory (with its child processes) and the step reached;
every new checkpoint folder is timed and sized when it appears. After `--minutes` it sends
the launcher SIGTERM, as a scheduler would: the ranks must checkpoint and exit 0. The last
checkpoint's manifest is then verified. The table goes to `--out`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from memory import device_name  # noqa: E402
from report import write_section  # noqa: E402

from sparsedist.checkpoint.manifest import verify_manifest  # noqa: E402
from sparsedist.config import load_recipe  # noqa: E402
from sparsedist.data import prepare_dataset  # noqa: E402
from sparsedist_launch.local import rank_processes  # noqa: E402

RECIPE = REPO / "recipes" / "tiny" / "sparse-pretrain.yaml"
STEPS = 10_000_000
PROGRESS = re.compile(rf"(\d+)/{STEPS} \[")
MIB = 2**20


def resident(process: psutil.Process) -> int:
    """Resident bytes of a rank and the processes it started."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def step_reached(log: Path) -> int:
    """The last step rank 0's progress bar shows."""
    tail = log.read_bytes()[-4000:].decode(errors="replace")
    return max((int(n) for n in PROGRESS.findall(tail)), default=0)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def soak(minutes: float, interval: int, sample_s: float, workdir: Path) -> dict:
    out, log = workdir / "run", workdir / "soak.log"
    command = [sys.executable, "-m", "sparsedist", "launch", str(RECIPE), f"train.steps={STEPS}",
               f"checkpoint.interval={interval}", "checkpoint.keep=3", "eval.interval=1000000000",
               f"train.output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", "tracking.experiment=soak"]
    recipe = load_recipe(RECIPE, [])
    prepare_dataset(recipe.data.model_copy(update={"dir": REPO / recipe.data.dir}), recipe.train.seed)
    samples, checkpoints, seen = [], [], set()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as stderr:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=stderr, stderr=subprocess.STDOUT)
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < minutes * 60:
            time.sleep(sample_s)
            elapsed = time.monotonic() - started
            ranks = sorted(rank_processes(proc.pid), key=lambda p: p.environ().get("LOCAL_RANK", ""))
            samples.append((elapsed, step_reached(log), [resident(r) for r in ranks]))
            for folder in sorted((out / "checkpoints").glob("step_????????")) if (out / "checkpoints").is_dir() else []:
                if folder.name not in seen and (folder / "trainer.json").is_file():
                    seen.add(folder.name)
                    checkpoints.append((elapsed, int(folder.name.removeprefix("step_")), folder_bytes(folder)))
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=600)
    latest = max((out / "checkpoints").glob("step_????????"), key=lambda p: p.name)
    verify_manifest(latest)  # raises on a torn or corrupt checkpoint
    return {"samples": samples, "checkpoints": checkpoints, "status": status, "latest": latest.name,
            "wall": time.monotonic() - started, "log": log}


def window(samples: list, first: bool) -> list:
    """The samples of minutes 5–10 (first) or of the last 5 minutes; thirds of a run under 15 minutes."""
    span = samples[-1][0]
    lo, hi = ((5 * 60, 10 * 60) if first else (span - 5 * 60, span)) if span >= 15 * 60 else \
        ((span / 3, 2 * span / 3) if first else (2 * span / 3, span))
    return [s for s in samples if lo <= s[0] <= hi]


def summary(part: list) -> tuple[float, float, list[float]]:
    """Minutes it spans (from, to), steps per second in it, mean resident MiB per rank."""
    (t0, step0, _), (t1, step1, _) = part[0], part[-1]
    rss = [sum(s[2][rank] for s in part) / len(part) / MIB for rank in range(2)]
    return (t0 / 60, t1 / 60), (step1 - step0) / max(t1 - t0, 1e-9), rss


def report(result: dict, minutes: float, interval: int, command: str) -> str:
    samples = [s for s in result["samples"] if len(s[2]) == 2]
    (early_span, early_rate, early_rss), (late_span, late_rate, late_rss) = (summary(window(samples, first))
                                                                           for first in (True, False))
    every = max(1, len(samples) // 12)
    rows = samples[::every] + ([samples[-1]] if (len(samples) - 1) % every else [])
    table = ["| minute | step | rank 0 RSS (MiB) | rank 1 RSS (MiB) |", "|---:|---:|---:|---:|"]
    table += [f"| {t / 60:.1f} | {step} | {rss[0] / MIB:.0f} | {rss[1] / MIB:.0f} |" for t, step, rss in rows]
    ckpts = ["| minute | step | size (MiB) |", "|---:|---:|---:|"]
    ckpts += [f"| {t / 60:.1f} | {step} | {size / MIB:.2f} |" for t, step, size in result["checkpoints"]]
    peak = [max(s[2][rank] for s in samples) / MIB for rank in range(2)]
    growth = ", ".join(f"rank {r} {early_rss[r]:.0f} → {late_rss[r]:.0f} MiB ({late_rss[r] / early_rss[r]:.3f}×, "
                       f"peak {peak[r]:.0f})" for r in range(2))
    return f"""Command: `{command}` · device: {device_name()} · recipe `recipes/tiny/sparse-pretrain.yaml`
(transposable 2:4 masks, masked decay, flip rate) on 2 FSDP2 ranks, a checkpoint every {interval} steps
(the last 3 kept), resident memory sampled every few seconds, SIGTERM after {minutes:g} minutes.

- {samples[-1][1]} steps in {samples[-1][0] / 60:.1f} minutes: {early_rate:.2f} steps/s in minutes
  {early_span[0]:.1f}–{early_span[1]:.1f}, {late_rate:.2f} steps/s in minutes {late_span[0]:.1f}–{late_span[1]:.1f}.
- Mean resident memory, the same two windows: {growth}.
- {len(result['checkpoints'])} checkpoints written while running; after SIGTERM the launcher exited
  {result['status']} and the last checkpoint, `{result['latest']}`, passed its manifest check.

{chr(10).join(table)}

Checkpoints as they appeared:

{chr(10).join(ckpts)}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--checkpoint-interval", type=int, default=300, help="steps between checkpoints")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--workdir", type=Path, help="keep the run here (default: a temporary folder, removed)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sparsedist-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = soak(args.minutes, args.checkpoint_interval, args.sample_seconds, workdir)
    if result["status"] != 0:
        print(result["log"].read_text()[-4000:], file=sys.stderr)
        return 1
    command = "python bench/soak.py " + " ".join(sys.argv[1:])
    body = report(result, args.minutes, args.checkpoint_interval, command.strip())
    print(body)
    write_section(args.out, "Soak: memory and checkpoints over a long 2-rank run", body)
    if args.workdir is None:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
