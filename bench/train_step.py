"""Time one training step of each sparsity method against the dense baseline, in the same process.

    python bench/train_step.py [--steps 20] [--out docs/benchmarks.md]

Builds the tiny Llama of recipes/tiny (and a wider variant), converts it with each method,
and times one optimizer step (sparsedist.train.step: the method's begin, forward + backward, the clipped
update with its update hook, its end) on random tokens. Prints a table
of milliseconds per step and the ratio to dense, plus the bytes of mask state per sparse
weight, and writes it to the output file with this command line.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from report import write_section

from sparsedist.config.load import validate_recipe
from sparsedist.models import model_config
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.student import build_student
from sparsedist.train.losses import lm_loss
from sparsedist.train.step import optimizer_step

SHAPES = {
    "tiny (d=128, ffn=384, 4 layers)": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4),
    "small (d=512, ffn=1536, 4 layers)": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4),
}
METHODS = ("dense", "ste", "srste", "sparse_pretrain", "sste", "ast", "cast")
VOCAB, SEQ, BATCH = 8192, 128, 8


def step_times(shape: dict, method: str, steps: int, device: torch.device, dtype: torch.dtype = torch.float32,
               batch: int = BATCH, seq: int = SEQ, **sparsity) -> tuple[list[float], float]:
    """Seconds per training step (after 3 warm-up steps) and mask bytes per sparse weight; the model's
    weights (and so AdamW's state) in `dtype`, `sparsity` keys over the method's defaults."""
    recipe = validate_recipe({
        "name": f"bench-{method}",
        "model": {"family": "llama", "config": {"num_attention_heads": 4, "num_key_value_heads": 4, **shape,
                                                "max_position_embeddings": seq}},
        "data": {"seq_len": seq, "vocab_size": VOCAB},
        "sparsity": {"method": method, **sparsity},
        "parallel": {"backend": "none"},
        "train": {"steps": steps + 3, "global_batch": batch, "micro_batch": batch},
    })
    backend = ParallelBackend(recipe.parallel, Runtime(0, 1, 0, device))
    student = build_student(recipe, backend, model_config(recipe.model, VOCAB, seq, 0))
    student.model.to(dtype)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), device=device)

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
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = [
        "| model | method | ms / step (median) | vs dense | mask bytes / sparse weight |",
        "|---|---|---|---|---|",
    ]
    for shape_name, shape in SHAPES.items():
        dense_ms = None
        for method in METHODS:
            times, mask_cost = step_times(shape, method, args.steps, device)
            ms = 1000 * statistics.median(times)
            dense_ms = dense_ms or ms
            lines.append(f"| {shape_name} | {method} | {ms:.1f} | {ms / dense_ms:.2f}× | {mask_cost:.3f} |")
    table = "\n".join(lines)
    print(table)
    command = "python " + " ".join(["bench/train_step.py", *sys.argv[1:]])
    write_section(args.out, "One training step per sparsity method", (
        f"Command: `{command}` · device: {device_name(device)} · torch {torch.__version__} · "
        f"batch {BATCH} × {SEQ} tokens, AdamW, {args.steps} timed steps after 3 warm-up steps.\n\n"
        f"{table}\n\n"
        "STE and SR-STE run the masked dense product (M⊙W in the forward, the mask unpacked from its\n"
        "bits every forward, masks recomputed after every step): on CPU this is pure overhead, the\n"
        "price of training into the 2:4 pattern before a sparse kernel can pay it back. Masks cost\n"
        "one bit (0.125 byte) per sparse weight.\n"), heading="# Benchmarks")


if __name__ == "__main__":
    main()
