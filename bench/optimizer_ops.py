"""Aten operations (on a GPU: kernel launches) per optimizer step of MomentAdam (AST, CAST) and torch's AdamW.

    python bench/optimizer_ops.py [--steps 3] [--out PATH]

Each optimizer runs over every trainable parameter of a Llama converted by its method (AdamW: by no method),
on the CPU, one process, with fixed random gradients. The first step (state creation) is not counted; the
second runs under a TorchDispatchMode that counts every aten operation it sees at the top level (a
`_foreach_*` call counts once, as it is one launch per list of about a hundred tensors or some tens of
millions of elements on a GPU), views (no kernel) apart from the rest. Wall time is the median of `--steps`
further steps without the mode, on this machine's CPU.

Two shapes: "few M" (hidden 512, 1 layer, about 5 M elements) for ops and wall time, and "7B / 256":
Llama-2-7B's layer structure (32 layers, the 7B aspect ratios) with every matrix 16×16 smaller and
MomentAdam's CHUNK divided by 256 too, so that each parameter spans exactly as many chunks as at 7B and the
counted operations are those of a 7B unsharded step; the launch overhead is then estimated at an assumed
5 µs per launch (a typical CUDA launch cost, not measured here). `--out` writes the tables and this command
line to PATH (a markdown file); by default they are only printed.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsedist.config.schema import ModelConfig, OptimConfig, ParallelConfig
from sparsedist.config.sparsity import METHOD_CONFIGS
from sparsedist.models import FAMILIES, build_model, model_config
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity import adam, make_method
from sparsedist.student import param_groups

SHAPES = {
    "few M": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=1, num_attention_heads=8,
                   num_key_value_heads=8, max_position_embeddings=64), 2000, 1),
    "7B / 256": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=64), 2000, 256),
}
"""name: (Llama config, vocabulary, factor by which sizes and CHUNK are divided against the full shape)."""
LAUNCH_US = 5.0
"""Assumed GPU launch cost per kernel (µs): an assumption, not a measurement."""


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.views = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        else:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def build(name: str, shape: str):
    """(model's trainable parameters, optimizer, method or None) for one optimizer line."""
    config, vocab, _ = SHAPES[shape]
    cfg = ModelConfig(family="llama", config=config)
    model = build_model(cfg, model_config(cfg, vocab, 32, 0), seed=0)
    optim = OptimConfig(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    if name.startswith("AdamW"):
        groups = param_groups(model, optim, set())
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                      foreach="foreach" in name)
        return [p for g in groups for p in g["params"]], optimizer, None
    backend = ParallelBackend(ParallelConfig(backend="none"), Runtime(0, 1, 0, torch.device("cpu")))
    method_name = name.split()[-1].lower()
    method = make_method(METHOD_CONFIGS[method_name](method=method_name, refresh_interval=1000), backend, 1000, False)
    method.convert(model, FAMILIES["llama"])
    optimizer = method.make_optimizer(param_groups(model, optim, method.no_decay_parameters()), optim)
    backend.prepare(model, optimizer)
    method.start()
    return [p for g in optimizer.param_groups for p in g["params"]], optimizer, method


def measure(name: str, shape: str, steps: int) -> dict:
    params, optimizer, method = build(name, shape)
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p)

    def step(i: int) -> None:
        if method is not None:
            method.begin(i)
            method.update(i, params)
        optimizer.step()

    step(0)
    count = Count()
    with count:
        step(1)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(2 + i)
        times.append(time.perf_counter() - start)
    elements = sum(p.numel() for p in params) * SHAPES[shape][2]
    return dict(name=name, elements=elements, ops=count.ops, views=count.views, ms=1e3 * statistics.median(times))


def table(shape: str, rows: list[dict]) -> str:
    scaled = SHAPES[shape][2] > 1
    head = ("| optimizer | elements | aten ops per step (views apart) | ops per M elements | "
            + ("est. launch overhead per step at 5 µs (assumed) |" if scaled else "wall ms per step (this CPU) |"))
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        last = f"{r['ops'] * LAUNCH_US / 1e3:.1f} ms" if scaled else f"{r['ms']:.1f}"
        lines.append(f"| {r['name']} | {r['elements'] / 1e6:,.1f} M | {r['ops']:,} (+{r['views']:,} views) | "
                     f"{r['ops'] / (r['elements'] / 1e6):.2f} | {last} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the counted one")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--out", type=Path, help="write the tables and the command line to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    chunk = adam.CHUNK
    out = [f"`{shlex.join(['python', 'bench/optimizer_ops.py', *sys.argv[1:]])}` (MomentAdam CHUNK = {chunk:,}; "
           f"torch {torch.__version__}, CPU, 1 thread)", ""]
    for shape in args.shapes:
        adam.CHUNK = chunk // SHAPES[shape][2]  # same chunks per parameter as at the full shape
        rows = [measure(name, shape, args.steps)
                for name in ("MomentAdam AST", "MomentAdam CAST", "AdamW (for-loop)", "AdamW (foreach)")]
        out += [f"Shape {shape}" + (f" (counts as at the full shape; CHUNK used {adam.CHUNK:,})"
                                    if SHAPES[shape][2] > 1 else ""), "", table(shape, rows), ""]
    adam.CHUNK = chunk
    text = "\n".join(out)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
