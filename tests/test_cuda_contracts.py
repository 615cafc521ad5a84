"""The products' calls into PyTorch's CUDA-only 2:4 and FP8 kernels meet those kernels' contracts, on the CPU.

Each entry point the products call is replaced by a checker that enforces the rules read from PyTorch 2.13's
source and then computes the product on the CPU, so the calls an H100 would get are made here with the same
shapes, dtypes and strides (the device checks are patched to say CUDA 9.0):

- torch/sparse/semi_structured.py: `to_sparse_semi_structured` builds `SparseSemiStructuredTensorCUSPARSELT`
  unless `_FORCE_CUTLASS` (so cuSPARSELt on every GPU); `_validate_device_dim_dtype_shape`: 2-D, contiguous,
  a dtype of `_DTYPE_SHAPE_CONSTRAINTS` (e4m3, int8, fp16, bf16: no fp32), rows and columns multiples of
  `sparse_min_rows`/`sparse_min_cols`. Its `cusparselt_mm` op pads the dense operand itself and passes it
  transposed (`dense.t()`) for `F.linear`, as is for `A @ dense`.
- aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp: `_cslt_sparse_mm` reads a contiguous dense B as
  row-major and any other B as the transpose of a row-major one, with no further stride check (so B must be
  contiguous or exactly transposed: a column slice or an expanded gradient is misread); a one-element
  `alpha` is read back to the host (`alpha_tensor.item<float>()`), a vector one scales the rows of A.
  PyTorch's own FP8 tests pass B column-major.
- torch/_meta_registrations.py, `_check_scaled_mm_sizes`: `_scaled_mm`'s mat1 row-major, mat2 column-major,
  mat1.size(1) and both sizes of mat2 multiples of 16, FP8 operands, fp32 one-element scales.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_methods import LLAMA, prepared_optimizer
from test_product import rounded
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from sparsedist.config.schema import ModelConfig, OptimConfig, ParallelConfig
from sparsedist.config.sparsity import METHOD_CONFIGS
from sparsedist.models import FAMILIES, build_model, model_config
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity import fp8, make_method, product
from sparsedist.sparsity.masks import nm_mask
from sparsedist.sparsity.mvue import mvue24
from sparsedist.sparsity.product import Product
from sparsedist.sparsity.transposable import transposable_mask
from sparsedist.train.step import optimizer_step

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
CUSPARSELT = torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS


def _check_compressible(name: str, t: torch.Tensor) -> None:
    """cuSPARSELt's rules for a tensor to compress (checked outside any dispatch mode: they stand in for the kernel)."""
    with _disable_current_modes():
        _check_compressible_now(name, t)


def _check_compressible_now(name: str, t: torch.Tensor) -> None:
    assert t.dim() == 2 and t.is_contiguous(), f"{name}: a {t.dim()}-D tensor of strides {t.stride()}"
    assert t.dtype in CUSPARSELT, f"{name}: cuSPARSELt has no {t.dtype}"
    limits = CUSPARSELT[t.dtype]
    assert t.shape[0] % limits.sparse_min_rows == 0 and t.shape[1] % limits.sparse_min_cols == 0, (name, t.shape)
    assert ((t.reshape(-1, 4) != 0).sum(1) <= 2).all(), f"{name}: not 2:4 along its rows"


def _column_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(0) == 1 and t.stride(1) == t.shape[0]


class Compressed(torch.Tensor):
    """What the fake `to_sparse_semi_structured` returns: the dense tensor, checking each product's dense operand."""

    calls: list

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        plain = [a.as_subclass(torch.Tensor) if isinstance(a, Compressed) else a for a in args]
        if func in (F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
            dense = plain[0] if func is F.linear or not isinstance(args[0], Compressed) else plain[1]
            assert dense.is_contiguous(), f"cuSPARSELt would misread a dense operand of strides {dense.stride()}"
            cls.calls.append(("sparse_mm", tuple(dense.shape), dense.dtype))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*plain, **(kwargs or {}))


class Kernels:
    """The fakes and what each was called with."""

    def __init__(self):
        self.calls: list[tuple] = []
        Compressed.calls = self.calls

    def to_sparse_semi_structured(self, t):
        assert not torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
        _check_compressible("to_sparse_semi_structured", t)
        self.calls.append(("compress", tuple(t.shape), t.dtype))
        return t.clone().as_subclass(Compressed)

    def _cslt_compress(self, t):
        _check_compressible("_cslt_compress", t)
        self.calls.append(("cslt_compress", tuple(t.shape), t.dtype))
        return t.clone()

    def _cslt_sparse_mm(self, a, b, bias=None, alpha=None, out_dtype=None, transpose_result=False, alg_id=0):
        with _disable_current_modes():  # the kernel's work: no read-back of the project's
            return self._cslt_sparse_mm_now(a, b, alpha, out_dtype, transpose_result)

    def _cslt_sparse_mm_now(self, a, b, alpha, out_dtype, transpose_result):
        assert b.is_contiguous() or b.t().is_contiguous(), f"B of strides {b.stride()} is misread"
        if b.dtype == E4M3:
            assert _column_major(b), f"FP8 B must be column-major, not strides {b.stride()}"
        limits = CUSPARSELT[b.dtype]
        assert b.shape[0] % limits.dense_min_rows == 0 and b.shape[1] % limits.dense_min_cols == 0, b.shape
        assert alpha is None or (alpha.dtype == torch.float32 and alpha.shape == (a.shape[0],)), (
            "a one-element alpha is read back to the host")
        self.calls.append(("cslt_sparse_mm", tuple(b.shape), b.dtype, transpose_result))
        out = a.float() @ b.float()
        out = out if alpha is None else out * alpha[:, None]
        out = out.t().contiguous() if transpose_result else out
        return out.to(out_dtype or b.dtype)

    def _scaled_mm(self, a, b, scale_a, scale_b, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False):
        assert a.stride(1) == 1 and a.stride(0) >= a.shape[1], f"mat1 must be row-major, strides {a.stride()}"
        assert _column_major(b), f"mat2 must be column-major, strides {b.stride()}"
        assert a.shape[1] % 16 == 0 and b.shape[0] % 16 == 0 and b.shape[1] % 16 == 0, (a.shape, b.shape)
        assert {a.dtype, b.dtype} <= {E4M3, E5M2} and (a.dtype, b.dtype) != (E5M2, E5M2), (a.dtype, b.dtype)
        for scale in (scale_a, scale_b):
            assert scale.dtype == torch.float32 and scale.numel() == 1
        self.calls.append(("scaled_mm", tuple(a.shape), tuple(b.shape), use_fast_accum))
        return ((a.float() @ b.float()) * scale_a * scale_b).to(out_dtype)


@pytest.fixture
def kernels(monkeypatch) -> Kernels:
    fakes = Kernels()
    monkeypatch.setattr(product, "has_sparse_tensor_cores", lambda device: True)
    monkeypatch.setattr(fp8, "hardware_fp8", lambda device: True)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fakes.to_sparse_semi_structured)
    for name in ("_cslt_compress", "_cslt_sparse_mm", "_scaled_mm"):
        monkeypatch.setattr(torch, name, getattr(fakes, name))
    return fakes


class ReadBacks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-2) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=rtol * b.float().abs().max().item())


def test_semi_structured_products_pass_contiguous_bf16_operands(kernels):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w = (w * transposable_mask(w)).bfloat16()
    x = torch.randn(48, 256, generator=g).bfloat16()[:, :128]  # a column slice: strides (256, 1)
    grad = torch.randn(1, 64, generator=g).bfloat16().expand(48, 64)  # an expanded gradient: strides (0, 1)
    sparse = Product(semi_structured=True, transposable=True, mvue=True)
    _close(sparse.forward(x, w), x.float() @ w.float().t())
    _close(sparse.grad_input(grad, w), grad.float() @ w.float())
    torch.manual_seed(1)
    out = sparse.grad_weight(grad, x)
    torch.manual_seed(1)
    _close(out, mvue24(grad.t().float()) @ x.float())
    compressed = [call[1] for call in kernels.calls if call[0] == "compress"]
    assert compressed == [(64, 128), (128, 64), (64, 48)]  # W̃, W̃ᵀ, MVUE24(∇Zᵀ)
    assert [call[0] for call in kernels.calls].count("sparse_mm") == 3


def test_semi_structured_multiplies_in_autocast_dtype_and_refuses_fp32(kernels):
    w = torch.randn(32, 64)
    w, x = w * nm_mask(w), torch.randn(16, 64)
    with pytest.raises(TypeError, match="set parallel.mixed_precision: bf16"):
        Product(semi_structured=True).forward(x, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Product(semi_structured=True).forward(x, w)
    assert out.dtype == torch.bfloat16 and kernels.calls[0] == ("compress", (32, 64), torch.bfloat16)
    odd = torch.randn(24, 64).bfloat16()  # 24 rows: not a multiple of cuSPARSELt's 16, the masked dense product
    Product(semi_structured=True).forward(x.bfloat16(), odd * nm_mask(odd))
    assert len([c for c in kernels.calls if c[0] == "compress"]) == 1


def test_fp8_two_four_forward_passes_column_major_b_and_reads_nothing_back(kernels):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w, x = (w * nm_mask(w)).bfloat16(), torch.randn(40, 128, generator=g).bfloat16()
    with ReadBacks() as reads:
        out = Product(fp8=True, semi_structured=True).forward(x, w)
    assert reads.count == 0
    assert out.shape == (40, 64) and out.is_contiguous()
    _close(out, rounded(x, E4M3) @ rounded(w, E4M3).t())
    assert kernels.calls == [("cslt_compress", (64, 128), E4M3), ("cslt_sparse_mm", (128, 48), E4M3, True)]


def test_fp8_dense_products_meet_scaled_mm_rules_at_any_width(kernels):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 72, generator=g)  # neither 40 nor 72 is a multiple of 16: padded, then cut back
    w, x = (w * nm_mask(w)).bfloat16(), torch.randn(24, 72, generator=g).bfloat16()
    grad = torch.randn(24, 40, generator=g).bfloat16()
    p = Product(fp8=True)
    _close(p.forward(x, w), rounded(x, E4M3) @ rounded(w, E4M3).t())
    _close(p.grad_input(grad, w), rounded(grad, E5M2) @ rounded(w, E4M3))
    _close(p.grad_weight(grad, x), rounded(grad.t(), E5M2) @ rounded(x, E4M3))
    assert [call[3] for call in kernels.calls] == [True, False, False]  # fast accumulation in the forward only


def _sparse_pretrain(gathers: bool, fp8_products: bool = False):
    cfg = ModelConfig(family="llama", config=LLAMA)
    model = build_model(cfg, model_config(cfg, 300, 32, 0), seed=0)
    backend = ParallelBackend(ParallelConfig(backend="none", mixed_precision="bf16"),
                              Runtime(0, 1, 0, torch.device("cpu")))
    backend.gathers_parameters = gathers  # as under FSDP2 and ZeRO-3
    method = make_method(METHOD_CONFIGS["sparse_pretrain"](method="sparse_pretrain", kernel="semi_structured",
                                                           kernel_min_features=0), backend, 10, fp8_products)
    method.convert(model, FAMILIES["llama"])
    optimizer = prepared_optimizer(model, method, OptimConfig())
    method.start()
    return SimpleNamespace(model=model, method=method, optimizer=optimizer), backend


def _steps(student, backend, steps: int = 2, micro: int = 3) -> None:
    torch.manual_seed(0)
    batches = [(t, t) for t in torch.randint(0, 300, (micro, 2, 16))]
    for step in range(steps):
        optimizer_step(step, student, backend, batches,
                       lambda i, inputs, labels: (student.model(input_ids=inputs, labels=labels).loss, {}), 1.0)


@pytest.mark.parametrize("gathers", [False, True])
def test_w_and_its_transpose_are_compressed_once_per_step_where_parameters_stay_whole(kernels, gathers):
    student, backend = _sparse_pretrain(gathers)
    ffn = len(student.method.layers)  # sparse_pretrain's FFN layers, all on the kernel
    _steps(student, backend)
    per_step = 2 * ffn * (3 if gathers else 1)  # W̃ and W̃ᵀ; made at every use when the weights are gathered
    assert len([c for c in kernels.calls if c[0] == "compress"]) == 2 * per_step
    assert all(not layer.weight_forms._kept for layer in student.method.layers.values())  # released


def test_the_compressed_path_trains_as_the_masked_dense_one(kernels, monkeypatch):
    compressed, _ = _sparse_pretrain(False), None
    _steps(*compressed)
    monkeypatch.setattr(product, "has_sparse_tensor_cores", lambda device: False)
    dense = _sparse_pretrain(False)
    _steps(*dense)
    for name, layer in compressed[0].method.layers.items():
        torch.testing.assert_close(layer.weight, dense[0].method.layers[name].weight, rtol=1e-3, atol=1e-4)


def test_fp8_quantises_w_once_per_step_and_each_x_and_gradient_once_per_micro_batch(monkeypatch):
    student, backend = _sparse_pretrain(False, fp8_products=True)
    made = []
    quantize = fp8.quantize
    monkeypatch.setattr(fp8, "quantize", lambda t, dtype: made.append(dtype) or quantize(t, dtype))
    _steps(student, backend, steps=2, micro=3)
    layers = len(student.method.layers)
    inputs = 2 * layers // 3  # per block gate and up read one X, down another
    assert made.count(E4M3) == 2 * (layers + 3 * inputs)  # W̃ once a step, each distinct X once per micro-batch
    assert made.count(E5M2) == 2 * layers * 3  # ∇Z once per micro-batch, for both gradient products


def test_the_fused_quantisation_gives_the_eager_bits():
    x = torch.randn(33, 80, dtype=torch.bfloat16) * 5
    for q, reference in zip(fp8.fused_quantize()(x, E4M3), fp8._quantized(x, E4M3), strict=True):
        assert torch.equal(q.view(torch.uint8) if q.dtype == E4M3 else q, reference.view(torch.uint8)
                           if reference.dtype == E4M3 else reference)
