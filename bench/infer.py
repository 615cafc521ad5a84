"""Prefill and decode time of an exported 2:4 model against a dense one.

    python bench/infer.py [--dense DIR] [--sparse DIR] [--batch B] [--prompt P] [--new N] [--reps R]

Defaults: the demo's dense control and its SR-STE 2:4 model (runs/demo; `make demo`), same
architecture. Prefill is one forward of B prompts of P tokens; decode is N greedy tokens one at
a time with the KV cache, reported per token. Medians of R repetitions after one warm-up.

On CUDA both models run in bf16, and the 2:4 model runs a second time with every 2:4 linear
weight converted by `torch.sparse.to_sparse_semi_structured` (PyTorch's semi-structured
kernels). On CPU there is no semi-structured kernel: both models run the dense path in fp32
(the 2:4 model's zeros are multiplied like any weight) and the table says so. Ratios are
against the dense model in the same run. Writes the table with this command line to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_section  # noqa: E402
from train_step import device_name  # noqa: E402

from sparsedist.eval.compress import is_24  # noqa: E402
from sparsedist.eval.load import load_model  # noqa: E402

DEMO = Path("runs/demo")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def to_semi_structured(model: nn.Module) -> int:
    """Convert every 2:4 linear weight to PyTorch's semi-structured sparse tensor; returns how many."""
    from torch.sparse import to_sparse_semi_structured

    converted = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and is_24(module.weight):
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
            converted += 1
    return converted


@torch.inference_mode()
def timings(model: nn.Module, prompts: torch.Tensor, new: int, reps: int) -> tuple[float, float]:
    """Median seconds of one prefill of `prompts` and of one decoded token."""
    device = prompts.device
    prefill, decode = [], []
    for rep in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=prompts, use_cache=True)
        sync(device)
        middle = time.perf_counter()
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(new):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        sync(device)
        if rep:  # the first round warms up
            prefill.append(middle - start)
            decode.append((time.perf_counter() - middle) / new)
    return statistics.median(prefill), statistics.median(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, default=DEMO / "tiny-dense-continued" / "model")
    parser.add_argument("--sparse", type=Path, default=DEMO / "tiny-srste" / "model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    runs = [("dense", args.dense, False), ("2:4, dense path", args.sparse, False)]
    if device.type == "cuda":
        runs.append(("2:4, semi-structured kernels", args.sparse, True))
    rows, base = [], None
    for label, path, sparse in runs:
        model, _ = load_model(path, device)
        model = model.to(dtype)
        converted = to_semi_structured(model) if sparse else 0
        vocab = model.config.vocab_size
        prompts = torch.randint(0, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
        prefill, decode = timings(model, prompts.to(device), args.new, args.reps)
        base = base or (prefill, decode)
        rows.append(f"| {label} | {converted} | {1000 * prefill:.2f} | {base[0] / prefill:.2f}× | "
                    f"{1000 * decode:.2f} | {base[1] / decode:.2f}× |")
        print(rows[-1], flush=True)
        del model
    table = "\n".join(["| model | linears on sparse kernels | prefill (ms) | speed-up | decode (ms / token) | "
                       "speed-up |", "|---|---|---|---|---|---|", *rows])
    note = ("On CPU PyTorch has no semi-structured kernel: both models run the dense path in fp32, so the 2:4 "
            "row measures only the run-to-run spread; the sparse row needs a CUDA GPU (bf16)."
            if device.type == "cpu" else
            "The 2:4 model runs twice: dense path, then its 2:4 linear weights as semi-structured tensors.")
    command = "python " + " ".join(["bench/infer.py", *sys.argv[1:]])
    write_section(args.out, "Inference: prefill and decode, 2:4 against dense", (
        f"Command: `{command}` · device: {device_name(device)} · torch {torch.__version__} · {dtype} · "
        f"dense: `{args.dense}` · 2:4: `{args.sparse}` · prefill: {args.batch} × {args.prompt} tokens · decode: "
        f"{args.new} greedy tokens with the KV cache, batch {args.batch} · medians of {args.reps} after a warm-up; "
        f"speed-up: dense time / this time.\n\n{table}\n\n{note}\n"), heading="# Benchmarks")


if __name__ == "__main__":
    main()
