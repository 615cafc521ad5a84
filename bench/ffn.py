"""Forward + backward time of one FFN: dense vs 2:4, FP8 and FP8 + 2:4, as ratios against dense in the same run.

    python bench/ffn.py [--shapes NAME ...] [--tokens N ...] [--repeats R] [--step] [--out docs/benchmarks.md]

Each FFN is built from `SparseLinear`s exactly as training uses them: the 2:4 variants
unpack the transposable mask from its bits, form M⊙W and compress it in every forward (and
W̃ᵀ in the backward), so those overheads are in the figures. The mask decision itself runs
once per refresh interval; its time is a column of its own. `--step` adds one training step
of a 1.3B-parameter Llama (dense vs STE with the 2:4 kernel, bf16; GPU only). The defaults
are all shapes at 8k and 16k tokens on a GPU, two small shapes at 2k tokens on the CPU,
where the 2:4 kernel is the masked dense product and FP8 is emulated: there the table shows
the CPU paths' overhead, not a speed-up. Writes its section of docs/benchmarks.md with the
command and the device.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from report import write_section
from torch import nn
from train_step import device_name, step_times

from sparsedist.sparsity.layer import SparseLinear, dense_weight
from sparsedist.sparsity.masks import pack_mask
from sparsedist.sparsity.methods.ste import masked_ste_weight
from sparsedist.sparsity.product import Product
from sparsedist.sparsity.transposable import transposable_mask

SHAPES = {  # name: (d, FFN width, gated)
    "gpt2-124m": (768, 3072, False),
    "gpt2-1.5b": (1600, 6400, False),
    "opt-1.3b": (2048, 8192, False),
    "tinyllama-1.1b": (2048, 5632, True),
    "llama2-7b": (4096, 11008, True),
    "llama2-13b": (5120, 13824, True),
    "opt-13b": (5120, 20480, False),
}
CPU_SHAPES = ("gpt2-124m", "tinyllama-1.1b")
VARIANTS = {  # name: (forward weight, product)
    "dense": (dense_weight, Product()),
    "2:4": (masked_ste_weight, Product(semi_structured=True, transposable=True)),
    "fp8": (dense_weight, Product(fp8=True)),
    "fp8+2:4": (masked_ste_weight, Product(semi_structured=True, transposable=True, fp8=True)),
}
CPU_NOTE = ("On the CPU the 2:4 columns run the masked dense product (PyTorch's 2:4 kernels are CUDA-only) "
            "and FP8 is emulated: they measure the CPU paths' overhead, not a speed-up. The GPU targets (≥ 1.5× "
            "for 2:4 at d ≥ 2048, ≥ 2× for FP8 + 2:4, on H100/H200) need this command on a GPU.")
STEP_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16)


class FFN(nn.Module):
    """down(act(up(x))) or down(silu(gate(x))·up(x)), every linear a SparseLinear with a transposable 2:4 mask."""

    def __init__(self, d: int, width: int, gated: bool, variant: str, device: torch.device, dtype: torch.dtype):
        super().__init__()
        transform, product = VARIANTS[variant]
        shapes = {"gate": (d, width), "up": (d, width), "down": (width, d)} if gated else \
            {"up": (d, width), "down": (width, d)}
        self.gated = gated
        for name, (fan_in, fan_out) in shapes.items():
            layer = SparseLinear.from_linear(nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype),
                                             transform, product)
            layer.mask.data = pack_mask(transposable_mask(layer.weight.detach()))
            self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down(F.gelu(self.up(x), approximate="tanh"))
        if x.is_cuda:
            from sparsedist_kernels.gated import swiglu

            return self.down(swiglu(self.gate(x), self.up(x)))
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """The least seconds of each `fn()` over `repeats` rounds that call every fn once in turn, after a
    warm-up round: interleaved, so a disturbance of the machine does not fall on one variant only."""
    times = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def ffn_row(name: str, tokens: int, repeats: int, device: torch.device, dtype: torch.dtype) -> str:
    d, width, gated = SHAPES[name]
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d, device=device, dtype=dtype)
    steps = {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        ffn = FFN(d, width, gated, variant, device, dtype)

        def step(ffn=ffn):
            ffn.zero_grad(set_to_none=True)
            x.grad = None
            ffn(x).backward(grad)

        steps[variant] = step
    seconds = timed(steps, repeats, device)
    weights = [torch.randn(width, d, device=device, dtype=dtype) for _ in range(3 if gated else 2)]
    refresh = timed({"masks": lambda: [transposable_mask(w) for w in weights]}, max(1, repeats // 2), device)["masks"]
    dense = seconds["dense"]
    cells = " | ".join(f"{1000 * s:.1f} ({dense / s:.2f}×)" for s in seconds.values())
    kind = f"SwiGLU {width}" if gated else f"4d GELU {width}"
    return f"| {name} | {d} | {kind} | {tokens} | {cells} | {1000 * refresh:.1f} |"


def step_row(steps: int, device: torch.device) -> str:
    """One training step of a 1.3B Llama, dense vs STE on the 2:4 kernel (FFN layers), bf16 weights and AdamW."""
    ms = {}
    for method, sparsity in (("dense", {}), ("ste", {"kernel": "semi_structured"})):
        times, _ = step_times(STEP_MODEL, method, steps, device, dtype=torch.bfloat16, batch=8, seq=2048,
                              **sparsity)
        ms[method] = 1000 * statistics.median(times)
    return (f"| 1.3B Llama (d=2048, SwiGLU 5632, 24 layers), 8 × 2048 tokens | {ms['dense']:.1f} | "
            f"{ms['ste']:.1f} | {ms['dense'] / ms['ste']:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step", action="store_true", help="also time a 1.3B model's training step (GPU only)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.step and device.type != "cuda":
        parser.error("--step: the 1.3B step needs a GPU (bf16 weights, AdamW and activations exceed this machine)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = args.shapes or (list(SHAPES) if device.type == "cuda" else list(CPU_SHAPES))
    tokens = args.tokens or ([8192, 16384] if device.type == "cuda" else [2048])
    header = " | ".join(f"{variant} ms (speed-up)" for variant in VARIANTS)
    lines = [f"| FFN | d | width | tokens | {header} | mask refresh ms |",
             "|---" * (5 + len(VARIANTS)) + "|"]
    for name in shapes:
        for count in tokens:
            lines.append(ffn_row(name, count, args.repeats, device, dtype))
            print(lines[-1], flush=True)
    body = "\n".join(lines)
    if device.type == "cpu":
        body += "\n\n" + CPU_NOTE
    if args.step:
        step = ["| model | dense ms / step | 2:4 ms / step | speed-up |", "|---|---|---|---|", step_row(5, device)]
        print(step[-1])
        body += "\n\nOne training step (forward, backward, AdamW):\n\n" + "\n".join(step)
    command = shlex.join(["python", "bench/ffn.py", *sys.argv[1:]])
    write_section(args.out, "One FFN: dense, 2:4, FP8, FP8 + 2:4", (
        f"Command: `{command}` · device: {device_name(device)} · torch {torch.__version__} · "
        f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} operands · the least of {args.repeats} interleaved "
        "rounds after a warm-up round.\n"
        "Each cell is forward + backward of the whole FFN (the input gradient included), mask unpacking, "
        "M⊙W and compression included; speed-up = dense time / variant time, measured in the same run. "
        "Mask refresh: the transposable 2:4 masks of the FFN's weights, paid once per refresh interval. "
        "Which product runs where: docs/kernels.md.\n\n" + body), heading="# Benchmarks")


if __name__ == "__main__":
    main()
