"""Every Triton kernel in kernels/ compiles to a cubin for sm_80 and sm_90, without a GPU.

`triton.compile` of a kernel's `ASTSource` for `GPUTarget("cuda", cc, 32)` runs Triton's whole
pipeline (TTIR, TTGIR, LLVM IR, PTX) and its bundled ptxas; it rejects code that Triton's
interpreter runs (two `return`s of different types under a constexpr branch, for one). Under
`TRITON_INTERPRET=1`, which tests/conftest.py sets without a GPU, `@triton.jit` gives
interpreter objects, so each kernel module compiles in a subprocess without it (this file run
as a script), with a fresh Triton cache, so that every case really compiles.

The launches are the wrappers' own: the subprocess calls each public wrapper on small CPU
tensors of every dtype it accepts (and every scale kind of `soft_threshold`, small and large
seeds and offsets of `mvue24`, both gated activations forward and backward) with
`JITFunction.run` replaced by a recorder, then derives each launch's signature, constexprs,
`tt.divisibility` attributes and options with Triton's own launcher code (its binder and
`_pack_args`, private to Triton 3.9) for the target. Each
distinct launch compiles for sm_80 and sm_90 as specialised (16-byte-aligned pointers, sizes
divisible by 16), and for sm_90 with nothing known about alignment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

CCS = (80, 90)
UNALIGNED_CC = 90
MODULES = ("gated", "mvue", "soft_threshold")


def _gated_calls() -> None:
    import torch

    from sparsedist_kernels import gated

    for dtype in gated._DTYPES:
        for activation in (gated.swiglu, gated.geglu):
            gate, up = (torch.zeros(64, dtype=dtype, requires_grad=True) for _ in range(2))
            activation(gate, up).backward(torch.zeros(64, dtype=dtype))


def _mvue_calls() -> None:
    import torch

    from sparsedist_kernels import mvue

    for dtype in mvue._DTYPES:
        grad = torch.zeros(16, 64, dtype=dtype)
        for seed in (5, 2**62 - 1):  # training draws a seed below 2**62: i64 from 2**31 on
            for offset in (0, 2**40):
                mvue.mvue24(grad, seed, offset)


def _soft_threshold_calls() -> None:
    import torch

    from sparsedist_kernels import soft_threshold

    for dtype in soft_threshold._DTYPES:
        weight = torch.zeros(16, 64, dtype=dtype)
        soft_threshold.soft_threshold(weight)
        for scale_dtype in soft_threshold._SCALE_DTYPES:
            soft_threshold.soft_threshold(weight, torch.ones((), dtype=scale_dtype))


def _launches(module: str) -> list[tuple]:
    """(kernel, args, kwargs) of every launch `module`'s wrappers make in `_<module>_calls`, run on the CPU."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    globals()[f"_{module}_calls"]()
    return launches


def _compile_all(module: str) -> None:
    """Compile every distinct launch of `module` (one JSON line each); run without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    done = set()
    for fn, args, kwargs in _launches(module):
        for cc in CCS:
            target = GPUTarget("cuda", cc, 32)
            backend = make_backend(target)
            bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
                *args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            for known in (attrs, {}) if cc == UNALIGNED_CC else (attrs,):
                key = repr((fn.__name__, cc, signature, constexprs, known, options))
                if key in done:
                    continue
                done.add(key)
                described = ", ".join(f"{fn.arg_names[i]}={getattr(v, 'name', v)}" for (i,), v in constexprs.items())
                result = {"case": f"{fn.__name__}({', '.join(v for v in signature.values() if v != 'constexpr')}; "
                                  f"{described})", "cc": cc, "aligned": known is attrs}
                try:
                    compiled = triton.compile(ASTSource(fn, signature, constexprs, known), target=target,
                                              options=options.__dict__)
                    result["cubin"] = len(compiled.asm.get("cubin", b""))
                except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
                    cause = f"{error.__cause__!r} in " if error.__cause__ is not None else ""
                    result["error"] = f"{cause}{type(error).__name__}: {error}"[:2000]
                print(json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Each module's compilations, as many modules at a time as there are CPUs."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, without its warning

    def compile_module(module: str) -> subprocess.CompletedProcess:
        cache = tmp_path_factory.mktemp(f"triton-{module}")
        return subprocess.run([sys.executable, __file__, module], env={**env, "TRITON_CACHE_DIR": str(cache)},
                              capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=min(len(MODULES), os.cpu_count() or 1)) as pool:
        return dict(zip(MODULES, pool.map(compile_module, MODULES), strict=True))


@pytest.mark.parametrize("module", MODULES)
def test_every_kernel_compiles_to_a_cubin_for_sm80_and_sm90(module: str, compiled) -> None:
    done = compiled[module]
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["cc"] for r in results} == set(CCS), done.stdout
    failed = [f"{r['case']} sm_{r['cc']} aligned={r['aligned']}: {r.get('error')}"
              for r in results if not r.get("cubin")]
    if failed:
        pytest.fail(f"{len(failed)} of {len(results)} compilations failed:\n" + "\n".join(failed), pytrace=False)


if __name__ == "__main__":
    _compile_all(sys.argv[1])
