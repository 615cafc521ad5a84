"""The sparse layers' products: the 2:4 kernel (masked dense on CPU), FP8 and their recipe keys.

The FP8 references below cast with torch's float8 types directly, so they check the
quantization (per-tensor scale, formats per operand) as well as the products. GPU tests
compare the hardware paths with those references and are skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from test_methods import first, setup

from sparsedist.sparsity import fp8
from sparsedist.sparsity.layer import sparse_layers
from sparsedist.sparsity.masks import nm_mask
from sparsedist.sparsity.product import Product, has_sparse_tensor_cores
from sparsedist.sparsity.transposable import transposable_mask

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as the product sees it: cast to `dtype` at the scale that maps amax to the format's max."""
    scale = torch.finfo(dtype).max / t.float().abs().max()
    return (t.float() * scale).to(dtype).float() / scale


def operands(rows=24, inner=32, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inner, generator=g)
    w = torch.randn(cols, inner, generator=g)
    return x, w * nm_mask(w), torch.randn(rows, cols, generator=g)


def test_quantize_is_a_real_float8_cast_with_amax_at_the_format_max():
    x = torch.randn(64, 32) * 7
    for dtype in (E4M3, E5M2):
        q, inverse = fp8.quantize(x, dtype)
        assert q.dtype == dtype
        assert q.float().abs().max() == torch.finfo(dtype).max
        torch.testing.assert_close(q.float() * inverse, rounded(x, dtype), rtol=1e-6, atol=0)


def test_fp8_products_use_e4m3_forward_and_e5m2_gradients():
    x, w, g = operands()
    product = Product(fp8=True)
    torch.testing.assert_close(product.forward(x, w), rounded(x, E4M3) @ rounded(w, E4M3).t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(product.grad_input(g, w), rounded(g, E5M2) @ rounded(w, E4M3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(product.grad_weight(g, x), rounded(g.t(), E5M2) @ rounded(x, E4M3),
                               rtol=1e-5, atol=1e-5)
    exact = Product()
    assert not torch.equal(product.forward(x, w), exact.forward(x, w))


def test_semi_structured_on_cpu_is_exactly_the_masked_dense_product():
    torch.manual_seed(0)
    (model_a, dense), (model_b, kernel) = setup("srste"), setup("srste", kernel="semi_structured",
                                                                 kernel_min_features=0)
    assert all(layer.product.semi_structured for name, layer in kernel.layers.items() if "mlp" in name)
    tokens = torch.randint(0, 300, (2, 16))
    for model in (model_a, model_b):
        model(input_ids=tokens, labels=tokens).loss.backward()
    for name, layer in dense.layers.items():
        other = kernel.layers[name]
        assert torch.equal(layer.weight.grad, other.weight.grad), name


def test_the_kernel_goes_to_the_ffn_layers_by_name_and_small_layers_stay_dense():
    def chosen(**sparsity):  # all linears sparse (AST); the kernel goes to the FFN ones only
        model, _ = setup("ast", **sparsity)
        return sorted(name for name, layer in sparse_layers(model) if layer.product.semi_structured)

    assert chosen(kernel="semi_structured", kernel_min_features=33) == []
    ffn = chosen(kernel="semi_structured", kernel_min_features=32)
    assert ffn == sorted(name for name in setup("ast")[1].layers if ".mlp." in name)
    assert chosen(kernel="masked_dense", kernel_min_features=0) == []


@pytest.mark.parametrize("method", ["sste", "cast"])
def test_precision_fp8_reaches_the_ffn_layers_and_trains(method):
    _, exact = setup(method)
    model, fp8_method = setup(method, fp8=True)
    for name, layer in fp8_method.layers.items():
        assert layer.product.fp8 == (".mlp." in name), name
    name = next(name for name in exact.layers if ".mlp." in name)
    x = torch.randn(8, exact.layers[name].in_features)
    a, b = exact.layers[name](x), fp8_method.layers[name](x)
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    tokens = torch.randint(0, 300, (2, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert all(torch.isfinite(layer.weight.grad).all() for layer in fp8_method.layers.values())


def test_gate_and_up_quantize_their_shared_input_once(monkeypatch):
    _, method = setup("ste", fp8=True)
    gate, up = (next(layer for name, layer in method.layers.items() if name.endswith(f".mlp.{part}_proj"))
                for part in ("gate", "up"))
    quantized = []
    real = fp8._quantized
    monkeypatch.setattr(fp8, "_quantized", lambda t, dtype: quantized.append(t.shape) or real(t, dtype))
    x = torch.randn(8, gate.in_features)
    shared = (gate(x) * up(x)).sum()
    assert quantized.count(x.shape) == 1  # the weights are quantized once each besides
    x2 = x.clone()
    separate = (gate(x) * up(x2)).sum()
    assert quantized.count(x.shape) == 2
    torch.testing.assert_close(shared, separate, rtol=0, atol=0)
    x.mul_(2)  # modified in place: quantized again
    gate(x)
    assert quantized.count(x.shape) == 3


def test_sparse_pretrain_layers_run_the_transposed_product_until_the_dense_phase():
    _, method = setup("sparse_pretrain", total_steps=6, kernel="semi_structured", kernel_min_features=0,
                      dense_finetune_fraction=0.5)
    layer = first(method)
    assert layer.product == Product(semi_structured=True, transposable=True)
    method.begin(3)
    assert layer.product.plain


cuda = pytest.mark.skipif(not (torch.cuda.is_available() and has_sparse_tensor_cores(torch.device("cuda"))),
                          reason="needs a CUDA GPU with 2:4 sparse tensor cores (compute capability 8.0+)")


@cuda
def test_gpu_semi_structured_products_match_the_masked_dense_ones():
    x = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    w = w * transposable_mask(w)
    g = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    sparse, dense = Product(semi_structured=True, transposable=True, mvue=False), Product()
    for op, args in (("forward", (x, w)), ("grad_input", (g, w)), ("grad_weight", (g, x))):
        torch.testing.assert_close(getattr(sparse, op)(*args).float(), getattr(dense, op)(*args).float(),
                                   rtol=2e-2, atol=2e-1)


@cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and fp8.hardware_fp8(torch.device("cuda"))),
                    reason="needs FP8 tensor cores (compute capability 8.9+)")
def test_gpu_fp8_products_match_the_emulation():
    x, w, g = (t.to("cuda", torch.bfloat16) for t in operands(256, 512, 1024))
    for product in (Product(fp8=True), Product(fp8=True, semi_structured=True)):
        for op, args, reference in (("forward", (x, w), rounded(x, E4M3) @ rounded(w, E4M3).t()),
                                    ("grad_input", (g, w), rounded(g, E5M2) @ rounded(w, E4M3)),
                                    ("grad_weight", (g, x), rounded(g.t(), E5M2) @ rounded(x, E4M3))):
            torch.testing.assert_close(getattr(product, op)(*args).float(), reference, rtol=2e-2, atol=2e-1)
