"""One FFN's forward + backward, dense against 2:4 (STE, transposable, transposable + MVUE), FP8 and FP8 + 2:4.

    python bench/ffn.py [--shapes NAME ...] [--tokens N ...] [--repeats R] [--inject-failure VARIANT]
                        [--step [--step-count N]] [--out PATH]

Each variant's FFN is built from `SparseLinear`s as training builds them: its method's mask (N:M magnitude or
transposable) packed into the layer, its `Product`, W̃'s compressed and quantised forms kept for one step and
released after it with `release_weight_forms`, the call `sparsedist.train.step.optimizer_step` makes after every
update; the compression is timed as its own column. On CUDA the 2:4 products run cuSPARSELt in bf16 (on layers of
at least `kernel_min_features`, as `product_for` chooses); on the CPU they are the masked dense product in fp32
(the recipe refuses `semi_structured` with fp32) and FP8 is emulated, so the CPU figures measure the CPU paths'
overhead, not a speed-up.

Every variant is first checked against an fp32 dense FFN on the same masked weights: the relative error
‖a − b‖/‖b‖ of the output, ∇X and ∇W (the STE gradient reaches the dense W) within a tolerance per operand
format; MVUE's ∇W is an unbiased estimate, reported and not checked. A variant that raises or fails its check
is reported as failed and the run goes on; the exit code is 1 if any failed.

Wall: the least seconds of one step (zero the gradients, forward, backward, release the forms) over `--repeats`
interleaved rounds after a warm-up. Kernel: the mean per step over `--repeats` profiled steps (torch.profiler) of
the device time of every CUDA kernel, or on the CPU of the self CPU time of the matrix products (`GEMMS`): the
rest of the wall time is overhead (mask unpacking, M⊙W, activations, FP8 casts, autograd, Python). Compression:
the mean seconds per step spent making W̃'s kept forms (compressed W̃ and W̃ᵀ, quantised W̃). `--step` adds one
training step of a 1.3B Llama, a tiny one on the CPU (`bench/train_step.py`'s settings: dense against
`sparse_pretrain`). Prints the tables;
`--out PATH` also writes them as a section of PATH.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from report import write_section
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from train_step import defaults, device_name, step_times

from sparsedist.config.sparsity import SparsePretrain
from sparsedist.sparsity.layer import SparseLinear, dense_weight
from sparsedist.sparsity.masks import nm_mask, pack_mask
from sparsedist.sparsity.methods.ste import masked_ste_weight
from sparsedist.sparsity.product import Product, WeightForms, release_weight_forms
from sparsedist.sparsity.transposable import transposable_mask

SHAPES = {  # name: (d, FFN width, gated)
    "tiny": (128, 384, True),
    "gpt2-124m": (768, 3072, False),
    "gpt2-1.5b": (1600, 6400, False),
    "opt-1.3b": (2048, 8192, False),
    "tinyllama-1.1b": (2048, 5632, True),
    "llama2-7b": (4096, 11008, True),
    "llama2-13b": (5120, 13824, True),
    "opt-13b": (5120, 20480, False),
}
CPU_SHAPES, CPU_TOKENS, GPU_TOKENS = ("tiny", "gpt2-124m"), (256,), (8192, 16384)
VARIANTS = {  # name: (forward weight, mask decision or None, product with the 2:4 kernel where the device has it)
    "dense": (dense_weight, None, Product()),
    "2:4 ste": (masked_ste_weight, nm_mask, Product(semi_structured=True)),
    "2:4 transposable": (masked_ste_weight, transposable_mask, Product(semi_structured=True, transposable=True)),
    "2:4 transposable+MVUE": (masked_ste_weight, transposable_mask,
                              Product(semi_structured=True, transposable=True, mvue=True)),
    "fp8": (dense_weight, None, Product(fp8=True)),
    "fp8+2:4": (masked_ste_weight, transposable_mask, Product(semi_structured=True, transposable=True, fp8=True)),
}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, "fp8": 0.15}
"""Relative error allowed against the fp32 reference, by operand format (measured: fp32 ~1e-7, FP8 ~0.06)."""
GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")
KERNEL_MIN_FEATURES = SparsePretrain.model_fields["kernel_min_features"].default
CPU_NOTE = ("On the CPU the 2:4 variants run the masked dense product in fp32 (PyTorch's 2:4 kernels are CUDA-only "
            "and bf16/fp16) and FP8 is emulated: these figures measure the CPU paths' overhead, not a speed-up (every "
            "variant runs the same fp32 GEMMs, so the kernel column's spread is the shared machine's noise). "
            "The GPU targets (≥ 1.5× for 2:4 at d ≥ 2048, ≥ 2× for FP8 + 2:4, on H100/H200) are unmeasured until "
            "`bench/gpu_check.sh` runs on one.")


class TimedForms(WeightForms):
    """A layer's kept forms of W̃ that add the seconds spent making them to `seconds`."""

    def __init__(self, seconds: list[float]):
        super().__init__(keep=True)
        self.seconds = seconds

    def get(self, name: str, make: Callable[[], object]) -> object:
        def timed_make():
            _sync()
            start = time.perf_counter()
            form = make()
            _sync()
            self.seconds[0] += time.perf_counter() - start
            return form

        return super().get(name, timed_make)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def activation(gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (the fused kernel on CUDA, as the models use) or tanh GELU without a gate."""
    if gate is None:
        return F.gelu(up, approximate="tanh")
    if up.is_cuda:
        from sparsedist_kernels.gated import swiglu

        return swiglu(gate, up)
    return F.silu(gate) * up


def ffn(x: torch.Tensor, linears: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    gate = linears["gate"](x) if "gate" in linears else None
    return linears["down"](activation(gate, linears["up"](x)))


def build(shape: str, variant: str, device: torch.device, dtype: torch.dtype) -> nn.ModuleDict:
    """The FFN's `SparseLinear`s of `variant`, masks decided from their weights (seeded: the same in every variant)."""
    d, width, gated = SHAPES[shape]
    transform, decide, product = VARIANTS[variant]
    torch.manual_seed(0)
    layers = nn.ModuleDict()
    for name, (fan_in, fan_out) in {**({"gate": (d, width)} if gated else {}), "up": (d, width),
                                    "down": (width, d)}.items():
        layer = SparseLinear.from_linear(nn.Linear(fan_in, fan_out, bias=False, device=device, dtype=dtype), transform,
                                         product.sized(fan_in, fan_out, KERNEL_MIN_FEATURES), keep_weight_forms=True)
        if decide is not None:
            layer.mask.data = pack_mask(decide(layer.weight.detach()))
        layers[name] = layer
    return layers


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """‖a − b‖/‖b‖ over tensors taken together, in fp32."""
    diff = sum(float((x.detach().float() - y.detach()).square().sum()) for x, y in zip(a, b, strict=True))
    return (diff / sum(float(y.detach().square().sum()) for y in b)) ** 0.5


def check(layers: nn.ModuleDict, variant: str, x: torch.Tensor, grad: torch.Tensor) -> tuple[dict[str, float], str]:
    """One step of the variant against fp32 F.linear on the same W̃: relative errors and the failure ('' if none)."""
    x.grad = None
    out = ffn(x, dict(layers.items()))
    out.backward(grad)
    weights = {name: layer.transform(layer).detach().float().requires_grad_() for name, layer in layers.items()}
    ref_x = x.detach().float().requires_grad_()
    ref = ffn(ref_x, {name: (lambda t, w=w: F.linear(t, w)) for name, w in weights.items()})
    ref.backward(grad.float())
    release_weight_forms(layers)
    errors = {"out": relative([out], [ref]), "∇X": relative([x.grad], [ref_x.grad]),
              "∇W": relative([layer.weight.grad for layer in layers.values()], [w.grad for w in weights.values()])}
    tolerance = TOLERANCE["fp8" if VARIANTS[variant][2].fp8 else x.dtype]
    checked = [key for key in errors if key != "∇W" or not VARIANTS[variant][2].mvue]
    bad = [f"{key} error {errors[key]:.2g} > {tolerance:g}" for key in checked if not errors[key] <= tolerance]
    return errors, "; ".join(bad)


def kernel_seconds(step: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Mean seconds per step of device kernels (CUDA) or of the matrix products' self CPU time (CPU)."""
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            step()
        _sync()
    if device.type == "cuda":
        micros = sum(e.device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA)
    else:
        micros = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in GEMMS)
    return micros / 1e6 / repeats


def ffn_rows(shape: str, tokens: int, repeats: int, device: torch.device, dtype: torch.dtype,
             inject: str | None) -> tuple[list[str], list[str]]:
    """The table rows of every variant at one shape and token count, and the failed variants' names."""
    d, width, gated = SHAPES[shape]
    torch.manual_seed(1)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, d, device=device, dtype=dtype)
    results: dict[str, dict] = {}
    steps = {}
    for variant in VARIANTS:
        try:
            if variant == inject:
                raise RuntimeError("injected failure (--inject-failure)")
            layers = build(shape, variant, device, dtype)
            errors, failure = check(layers, variant, x, grad)

            def step(layers=layers):
                layers.zero_grad(set_to_none=True)
                x.grad = None
                ffn(x, dict(layers.items())).backward(grad)
                release_weight_forms(layers)

            step()
            kernel = kernel_seconds(step, repeats, device)
            seconds = [0.0]
            for layer in layers.values():
                layer.weight_forms = TimedForms(seconds)
            for _ in range(repeats):
                step()
            for layer in layers.values():  # timed without the synchronisations of TimedForms
                layer.weight_forms = WeightForms(keep=True)
            results[variant] = dict(errors=errors, failure=failure, kernel=kernel, compression=seconds[0] / repeats)
            steps[variant] = step
        except Exception as err:  # reported in the table; the other variants go on
            results[variant] = dict(failure=f"raised {type(err).__name__}: {(str(err).splitlines() or [''])[0]}")
    wall = timed(steps, repeats)
    base = results.get("dense", {})
    rows, failed, label = [], [], f"| {shape} | {d} | {width} {'SwiGLU' if gated else 'GELU'} | {tokens}"
    for variant, r in results.items():
        failed += [variant] if r["failure"] else []
        status = f"FAILED: {r['failure']}" if r["failure"] else "ok"
        if "errors" not in r:
            rows.append(f"{label} | {variant} |{' — |' * 8} {status} |")
            continue
        e = r["errors"]
        mvue = " (estimate)" if VARIANTS[variant][2].mvue else ""
        cells = [_ms(wall[variant], wall.get("dense")), _ms(r["kernel"], base.get("kernel")),
                 f"{1000 * r['compression']:.2f}", f"{e['out']:.1e}", f"{e['∇X']:.1e}", f"{e['∇W']:.1e}{mvue}"]
        rows.append(f"{label} | {variant} | {' | '.join(cells)} | {status} |")
    return rows, failed


def _ms(seconds: float, dense: float | None) -> str:
    """'ms | speed-up against dense'."""
    return f"{1000 * seconds:.2f} | " + (f"{dense / seconds:.2f}×" if dense and seconds else "—")


def timed(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """The least seconds of each step over `repeats` rounds that call every step once in turn, after a warm-up
    round: interleaved, so a disturbance of the machine does not fall on one variant only."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            _sync()
            start = time.perf_counter()
            step()
            _sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def step_table(steps: int, device: torch.device) -> tuple[str, str]:
    """One training step, dense against `sparse_pretrain` (train_step.py's settings for this device), and its
    description."""
    setting = defaults(device)
    shape_name, shape = next(iter(setting.shapes.items()))
    ms = {method: 1000 * statistics.median(step_times(shape, method, steps, device, setting)[0])
          for method in ("dense", "sparse_pretrain")}
    table = ("| model | tokens | dense ms / step | sparse_pretrain ms / step | speed-up |\n|---|---|---|---|---|\n"
             f"| {shape_name} | {setting.batch} × {setting.seq} | {ms['dense']:.1f} | {ms['sparse_pretrain']:.1f} | "
             f"{ms['dense'] / ms['sparse_pretrain']:.2f}× |")
    return table, (f"One training step (`sparsedist.train.step.optimizer_step`: forward, backward, AdamW), median "
                   f"of {steps} after 3 warm-up steps, `parallel.mixed_precision: {setting.precision}`, "
                   f"`sparse_pretrain` with `sparsity.kernel: {setting.kernel}` (transposable masks: the forward "
                   "and input-gradient products sparse where the kernel runs).")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inject-failure", choices=list(VARIANTS), help="make this variant raise (tests the report)")
    parser.add_argument("--step", action="store_true", help="also time one training step of a 1.3B Llama "
                        "(a tiny one on the CPU)")
    parser.add_argument("--step-count", type=int, default=5, help="timed steps of --step")
    parser.add_argument("--out", type=Path, help="also write the tables as a section of this markdown file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines = ["| FFN | d | width | tokens | variant | wall ms | speed-up | kernel ms | speed-up | compression ms / step "
             "| out error | ∇X error | ∇W error | check |", "|---" * 14 + "|"]
    failed = []
    for shape in args.shapes or (list(SHAPES)[1:] if device.type == "cuda" else list(CPU_SHAPES)):
        for tokens in args.tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS):
            rows, bad = ffn_rows(shape, tokens, args.repeats, device, dtype, args.inject_failure)
            lines += rows
            failed += [f"{shape}/{tokens}/{variant}" for variant in bad]
            print("\n".join(rows), flush=True)
    kernel = "device time of all CUDA kernels" if device.type == "cuda" else \
        f"self CPU time of {', '.join(GEMMS)} (one thread)"
    body = (f"Command: `{shlex.join(['python', 'bench/ffn.py', *(sys.argv[1:] if argv is None else argv)])}` · "
            f"device: {device_name(device)} · torch {torch.__version__} · {str(dtype).removeprefix('torch.')} "
            f"operands.\nWall: the least of {args.repeats} interleaved fwd + bwd steps after a warm-up; kernel: "
            f"{kernel}, mean of {args.repeats} profiled steps; speed-up = dense / variant in the same run; "
            "compression: making W̃'s kept forms once per step; errors: ‖variant − fp32 dense on the same W̃‖/‖fp32‖ "
            f"(tolerance fp32 {TOLERANCE[torch.float32]:g}, bf16 {TOLERANCE[torch.bfloat16]:g}, FP8 "
            f"{TOLERANCE['fp8']:g}; MVUE's ∇W is an unbiased estimate, not checked).\n\n" + "\n".join(lines))
    if device.type == "cpu":
        body += "\n\n" + CPU_NOTE
    if args.step:
        table, about = step_table(args.step_count, device)
        print(table, flush=True)
        body += f"\n\n{about}\n\n{table}"
    if args.out:
        write_section(args.out, "One FFN: dense, 2:4, FP8, FP8 + 2:4", body, heading="# Benchmarks")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
