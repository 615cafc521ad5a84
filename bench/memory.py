"""Peak memory and step time of each sparsity method against dense, under FSDP2 and ZeRO-3, on 2 ranks.

    python bench/memory.py [--steps 8] [--rounds 3] [--nproc 2] [--out docs/results.md]

Every (backend, method) cell is a fresh `torchrun` of this file's worker: a real Trainer
on the embedded corpus with the model of SHAPE, distillation off, no checkpoints. Per rank
the worker measures the peak memory grown since just before the Trainer was built, the
median step time after 2 warm-up steps, and the mask bits each rank stores per sparse
weight it stores. On a GPU the peak is the allocator's. On the CPU torch keeps no allocator
statistics: the peak is ru_maxrss minus the resident size before the build, taken in a
separate run of MEMORY_STEPS steps (first round only) with glibc told to map every block
over 64 KiB on its own (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident
set at once. The step time comes from the run with the default allocator: under that
setting every large temporary costs fresh page faults (+40% on the dense step here), which
neither glibc's default nor a CUDA caching allocator charges. The table gives the maximum
over ranks and ratios against dense under the same backend, measured in the same
invocation. Every cell runs once per round, rounds one after the other, and the table keeps
each cell's smallest step time and peak: the least disturbed run, since a shared machine's
speed drifts over minutes, and on the 2-core CPU here a cell now and then runs 40% slow.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import write_section  # noqa: E402

RECIPE = HERE.parent / "recipes" / "tiny" / "llama.yaml"
SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
         "num_key_value_heads": 8, "max_position_embeddings": 256}
MEMORY_STEPS = 3
"""Steps of a CPU memory run: the optimizer state exists from the first, and each later step peaks alike."""
METHODS = ("dense", "ste", "srste", "sparse_pretrain", "sste", "ast", "cast")
BACKENDS = {"FSDP2": ["parallel.backend=fsdp2"], "ZeRO-3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (NCCL)"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, gloo)"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(out: Path, overrides: list[str], steps: int) -> None:
    """One cell, on this rank: build, train `steps`, report to `out` from rank 0."""
    import torch

    from sparsedist.config import load_recipe
    from sparsedist.parallel import init_runtime, shutdown
    from sparsedist.train.trainer import Trainer

    runtime = init_runtime()
    cuda = runtime.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    trainer = Trainer(load_recipe(RECIPE, overrides), runtime)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    peak -= base
    backend, layers = trainer.backend, trainer.method.layers.values()
    mask_bytes = sum(backend.stored_numel(layer.mask) for layer in layers)
    weights = sum(backend.stored_numel(layer.weight) for layer in layers)
    values = torch.tensor([peak, statistics.median(times[2:]), 8 * mask_bytes / max(1, weights)],
                          dtype=torch.float64)
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    if runtime.is_main:
        out.write_text(json.dumps(dict(zip(("peak_bytes", "step_s", "mask_bits"), values.tolist(), strict=True))))
    shutdown()


def run_cell(backend: list[str], method: str, steps: int, nproc: int, workdir: Path, memory: bool) -> dict:
    """Step time, mask bits and peak of one cell; on the CPU the peak comes from a run of its own, made
    only if `memory` (the first round: a peak repeats to 0.1% there, a step time does not)."""
    cell = run_worker(backend, method, steps, nproc, workdir, {})
    if device_name().startswith("CPU"):
        del cell["peak_bytes"]
        if memory:
            cell["peak_bytes"] = run_worker(backend, method, MEMORY_STEPS, nproc, workdir,
                                            {"MALLOC_MMAP_THRESHOLD_": "65536"})["peak_bytes"]
    return cell


def run_worker(backend: list[str], method: str, steps: int, nproc: int, workdir: Path, env: dict) -> dict:
    out = workdir / f"{backend[0].split('=')[1]}-{method}.json"
    out.unlink(missing_ok=True)
    overrides = [
        *backend, f"parallel.nproc_per_node={nproc}", f"sparsity={{method: {method}}}",
        f"model.config={json.dumps(SHAPE)}", "data.seq_len=256", "train.global_batch=8", "train.micro_batch=4",
        f"train.steps={steps}", "schedule.warmup_steps=0", f"train.output_dir={workdir / 'run'}",
        "checkpoint.interval=100000", "checkpoint.resume=never", "checkpoint.export=false",
        "eval.interval=100000", "tracking.enabled=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **env}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    str(Path(__file__).resolve()), "--worker", str(out), "--steps", str(steps), *overrides],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results.md"))
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-memory"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, overrides, args.steps)
    args.workdir.mkdir(parents=True, exist_ok=True)
    lines = ["| backend | method | peak memory (MiB) | vs dense | step (s) | vs dense | mask bits / weight, per rank |",
             "|---|---|---|---|---|---|---|"]
    best: dict[tuple[str, str], dict] = {}
    for round_ in range(args.rounds):
        for name, backend in BACKENDS.items():
            for method in METHODS:
                cell = run_cell(backend, method, args.steps, args.nproc, args.workdir, memory=round_ == 0)
                kept = best.setdefault((name, method), cell)
                kept.update({key: min(value, kept[key]) for key, value in cell.items() if key != "mask_bits"})
                print(name, method, cell, flush=True)
    for name in BACKENDS:
        dense = best[(name, "dense")]
        for method in METHODS:
            cell = best[(name, method)]
            lines.append(f"| {name} | {method} | {cell['peak_bytes'] / 2**20:.0f} | "
                         f"{cell['peak_bytes'] / dense['peak_bytes']:.3f}× | {cell['step_s']:.2f} | "
                         f"{cell['step_s'] / dense['step_s']:.3f}× | "
                         f"{cell['mask_bits']:.2f} |" if method != "dense" else
                         f"| {name} | dense | {cell['peak_bytes'] / 2**20:.0f} | 1× | {cell['step_s']:.2f} | 1× | – |")
    print("\n".join(lines))
    command = " ".join(["python bench/memory.py", *sys.argv[1:]])
    cpu = device_name().startswith("CPU")
    write_section(args.out, "Memory and step time by method and backend", (
        f"Command: `{command}` · {args.nproc} ranks on {device_name()} · "
        f"Llama d={SHAPE['hidden_size']}, ffn={SHAPE['intermediate_size']}, {SHAPE['num_hidden_layers']} layers, "
        f"vocab 8192, 8 × 256 tokens per step, fp32 · each method with its recipe defaults (targets: "
        "FFN; AST and CAST: all linear layers), no distillation · peak memory: the largest growth of "
        "resident memory of a rank from just before the run is built; step: median after 2 warm-up "
        f"steps, maximum over ranks, the smallest of {args.rounds} rounds"
        + (f"; on the CPU the step time runs with the default allocator and the peak in a {MEMORY_STEPS}-step "
           "run of the first round with MALLOC_MMAP_THRESHOLD_=65536" if cpu else "; peak: the smallest over rounds")
        + ".\n\n" + "\n".join(lines)))


if __name__ == "__main__":
    main()
