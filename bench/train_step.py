"""Time one training step of each sparsity method against the dense baseline, in the same process.

    python bench/train_step.py [--steps 20] [--methods NAME ...] [--out PATH]

On a GPU: a 1.3B Llama (d=2048, ffn=5632, 24 layers, 16 heads), `parallel.mixed_precision: bf16` and
`sparsity.kernel: semi_structured` for every method that has the key; on the CPU: the tiny Llama of recipes/tiny
and a wider variant in fp32 with the masked dense product. Each method converts the model and times one
optimizer step (sparsedist.train.step: the method's begin, forward + backward, the clipped update with its update
hook, its end, the kept forms of W̃ released) on random tokens. Prints a table of milliseconds per step, the ratio
to dense and the bytes of mask state per sparse weight; `--out PATH` also writes it as a section of PATH.
"""

from __future__ import annotations

import argparse
import gc
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from report import write_section

from sparsedist.config.load import validate_recipe
from sparsedist.config.sparsity import METHOD_CONFIGS
from sparsedist.models import model_config
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.student import build_student
from sparsedist.train.losses import lm_loss
from sparsedist.train.step import optimizer_step

METHODS = ("dense", "ste", "srste", "sparse_pretrain", "sste", "ast", "cast")
VOCAB = 8192


class Setting(NamedTuple):
    """The models, compute dtype, FFN product and batch of one device kind."""

    shapes: dict[str, dict]
    precision: str
    kernel: str
    batch: int
    seq: int


GPU = Setting({"1.3B Llama (d=2048, ffn=5632, 24 layers, 16 heads)": dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16)},
    "bf16", "semi_structured", 4, 2048)
CPU = Setting({"tiny (d=128, ffn=384, 4 layers)": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4),
               "small (d=512, ffn=1536, 4 layers)": dict(hidden_size=512, intermediate_size=1536,
                                                          num_hidden_layers=4)},
              "fp32", "masked_dense", 8, 128)


def defaults(device: torch.device) -> Setting:
    return GPU if device.type == "cuda" else CPU


def step_times(shape: dict, method: str, steps: int, device: torch.device, setting: Setting
               ) -> tuple[list[float], float]:
    """Seconds per training step (after 3 warm-up steps) and mask bytes per sparse weight; fp32 master weights,
    `setting`'s compute dtype, and its `sparsity.kernel` where the method has that key."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    kernel = {"kernel": setting.kernel} if "kernel" in METHOD_CONFIGS[method].model_fields else {}
    recipe = validate_recipe({
        "name": f"bench-{method}",
        "model": {"family": "llama", "config": {"num_attention_heads": 4, "num_key_value_heads": 4, **shape,
                                                "max_position_embeddings": setting.seq}},
        "data": {"seq_len": setting.seq, "vocab_size": VOCAB},
        "sparsity": {"method": method, **kernel},
        "parallel": {"backend": "none", "mixed_precision": setting.precision},
        # a run 10× longer than timed: no step reaches a late phase (sparse_pretrain's dense fine-tuning)
        "train": {"steps": 10 * (steps + 3), "global_batch": setting.batch, "micro_batch": setting.batch},
    })
    backend = ParallelBackend(recipe.parallel, Runtime(0, 1, 0, device))
    student = build_student(recipe, backend, model_config(recipe.model, VOCAB, setting.seq, 0))
    tokens = torch.randint(0, VOCAB, (setting.batch, setting.seq + 1), device=device)

    def loss_of(i: int, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return lm_loss(student.model(input_ids=inputs, use_cache=False).logits, labels), {}

    times = []
    for step in range(steps + 3):
        _sync(device)
        start = time.perf_counter()
        optimizer_step(step, student, backend, [(tokens[:, :-1], tokens[:, 1:])], loss_of, recipe.optim.grad_clip)
        _sync(device)
        if step >= 3:
            times.append(time.perf_counter() - start)
    layers = student.method.layers.values()
    weights = sum(layer.weight.numel() for layer in layers)
    mask_bytes = sum(layer.mask.numel() for layer in layers)
    return times, (mask_bytes / weights if weights else 0.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {threads} thread{'s' if threads > 1 else ''}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, help="also write the table as a section of this markdown file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setting = defaults(device)
    methods = ["dense", *(m for m in args.methods if m != "dense")]  # the baseline first
    lines = [
        "| model | method | ms / step (median) | vs dense | mask bytes / sparse weight |",
        "|---|---|---|---|---|",
    ]
    for shape_name, shape in setting.shapes.items():
        dense_ms = None
        for method in methods:
            times, mask_cost = step_times(shape, method, args.steps, device, setting)
            ms = 1000 * statistics.median(times)
            dense_ms = dense_ms or ms
            lines.append(f"| {shape_name} | {method} | {ms:.1f} | {ms / dense_ms:.2f}× | {mask_cost:.3f} |")
            print(lines[-1], flush=True)
    if args.out:
        command = shlex.join(["python", "bench/train_step.py", *(sys.argv[1:] if argv is None else argv)])
        write_section(args.out, "One training step per sparsity method", (
            f"Command: `{command}` · device: {device_name(device)} · torch {torch.__version__} · "
            f"batch {setting.batch} × {setting.seq} tokens, fp32 master weights and AdamW, "
            f"`parallel.mixed_precision: {setting.precision}`, `sparsity.kernel: {setting.kernel}` for the methods "
            f"that have it, {args.steps} timed steps after 3 warm-up steps.\n\n" + "\n".join(lines) + "\n\n"
            + ("The masked dense product (M⊙W in the forward, the mask unpacked from its bits every forward, masks "
               "recomputed on each method's schedule): on the CPU this is pure overhead, the price of training into "
               "the 2:4 pattern before a sparse kernel can pay it back. " if device.type == "cpu" else "")
            + "Masks cost one bit (0.125 byte) per sparse weight."), heading="# Benchmarks")


if __name__ == "__main__":
    main()
