"""Soak: a 2-rank sparse run for a fixed wall time, watched for memory growth and checkpoint health.

    python bench/soak.py [--minutes 30] [--checkpoint-interval 400] [--sample-seconds 10] [--out docs/results.md]

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

from sparsedist.checkpoint import verify_manifest  # noqa: E402
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


def report(result: dict, minutes: float, interval: int, command: str) -> str:
    samples = [s for s in result["samples"] if len(s[2]) == 2]
    every = max(1, len(samples) // 12)
    rows = [samples[i] for i in range(0, len(samples), every)] + ([samples[-1]] if (len(samples) - 1) % every else [])
    table = ["| minute | step | rank 0 RSS (MiB) | rank 1 RSS (MiB) |", "|---:|---:|---:|---:|"]
    table += [f"| {t / 60:.1f} | {step} | {rss[0] / MIB:.0f} | {rss[1] / MIB:.0f} |" for t, step, rss in rows]
    ckpts = ["| minute | step | size (MiB) |", "|---:|---:|---:|"]
    ckpts += [f"| {t / 60:.1f} | {step} | {size / MIB:.2f} |" for t, step, size in result["checkpoints"]]
    settled = [s for s in samples if s[0] >= 5 * 60] or samples
    first, last = settled[0], samples[-1]
    growth = [(b - a) / MIB for a, b in zip(first[2], last[2], strict=True)]
    rate_early = first[1] / first[0]
    rate_late = (last[1] - settled[len(settled) // 2][1]) / max(1e-9, last[0] - settled[len(settled) // 2][0])
    return f"""Command: `{command}` (device: {device_name()}). Recipe `recipes/tiny/sparse-pretrain.yaml` on
2 FSDP2 ranks, checkpoint every {interval} steps (last 3 kept), stopped with SIGTERM after {minutes:g} minutes.

- Steps: {last[1]} in {last[0] / 60:.1f} minutes; {rate_early:.2f} steps/s over the first {first[0] / 60:.1f}
  minutes, {rate_late:.2f} steps/s over the second half of the run.
- Resident memory from minute {first[0] / 60:.1f} to the end: rank 0 {growth[0]:+.0f} MiB
  ({first[2][0] / MIB:.0f} → {last[2][0] / MIB:.0f}), rank 1 {growth[1]:+.0f} MiB
  ({first[2][1] / MIB:.0f} → {last[2][1] / MIB:.0f}).
- Checkpoints: {len(result['checkpoints'])} written while running; after SIGTERM the launcher exited
  {result['status']} and the last checkpoint, `{result['latest']}`, passed its manifest check.

{chr(10).join(table)}

Checkpoints as they appeared:

{chr(10).join(ckpts)}
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--checkpoint-interval", type=int, default=400, help="steps between checkpoints")
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
