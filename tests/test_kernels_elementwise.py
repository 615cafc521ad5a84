"""The elementwise Triton kernels (soft threshold, MVUE24, gated activations) against their torch references.

Under `TRITON_INTERPRET=1` (no GPU) the tensors live on the CPU, otherwise on the GPU. The
interpreter truncates float32 to bfloat16 where a GPU rounds to nearest, so bfloat16 results
there are allowed one ulp where a GPU gives the reference's bits.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from sparsedist.sparsity import mvue24_inclusion_probabilities  # noqa: E402
from sparsedist.sparsity import soft_threshold as reference_soft_threshold  # noqa: E402
from sparsedist_kernels.gated import geglu, swiglu  # noqa: E402
from sparsedist_kernels.mvue import mvue24  # noqa: E402
from sparsedist_kernels.soft_threshold import soft_threshold  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
HALF = (torch.bfloat16, torch.float16)
ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
TRUNCATES = {torch.bfloat16: DEVICE == "cpu", torch.float16: False}  # the interpreter's float32 -> bfloat16


def _weight(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Gaussian entries with exact ties and zeros mixed in (small integers in about a third of the groups)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    ties = torch.randint(-2, 3, shape, generator=gen).float()
    use_ties = torch.rand((*shape[:-1], shape[-1] // 4, 1), generator=gen) < 0.35
    w = torch.where(use_ties, ties.reshape(use_ties.shape[:-1] + (4,)), w.reshape(use_ties.shape[:-1] + (4,)))
    return w.reshape(shape).to(DEVICE, dtype)


# soft_threshold


@pytest.mark.parametrize("shape", [(12, 40), (1, 4), (7, 8)])
def test_soft_threshold_float32_matches_reference_bit_for_bit(shape):
    w = _weight(shape)
    ref = reference_soft_threshold(w)
    assert torch.equal(soft_threshold(w), ref)
    assert torch.equal(soft_threshold(w, 1.37), 1.37 * ref)
    beta = torch.tensor(1.4821, device=DEVICE)
    assert torch.equal(soft_threshold(w, beta), beta * ref)
    assert torch.equal(soft_threshold(w, -0.5), -0.5 * ref)


@pytest.mark.parametrize("dtype", HALF)
def test_soft_threshold_half_exact_at_scale_one_and_within_one_rounding(dtype):
    w = _weight((12, 40), dtype)
    ref = reference_soft_threshold(w)
    out = soft_threshold(w)
    assert out.dtype == dtype
    if TRUNCATES[dtype]:
        torch.testing.assert_close(out.float(), ref.float(), rtol=ULP[dtype], atol=0)
    else:
        assert torch.equal(out, ref)
    # scaled: the reference rounds S(W) then the product, the kernel the product only
    for scale in (1.37, torch.tensor(1.25, device=DEVICE, dtype=dtype)):
        out = soft_threshold(w, scale)
        assert torch.equal(out != 0, ref != 0)
        torch.testing.assert_close(out.float(), (scale * ref).float(), rtol=2 * ULP[dtype], atol=0)


def test_soft_threshold_keeps_two_per_group_and_copies_strided_weights():
    w = torch.randn(40, 12, device=DEVICE)
    out = soft_threshold(w.t())
    assert torch.equal(out, reference_soft_threshold(w.t().contiguous()))
    assert ((out.reshape(12, 10, 4) != 0).sum(-1) <= 2).all()


@pytest.mark.parametrize(
    ("weight", "scale", "message"),
    [
        (torch.randn(8), 1.0, "not 2-D"),
        (torch.randn(4, 6), 1.0, "whole groups of 4"),
        (torch.randn(4, 8, dtype=torch.float64), 1.0, "unsupported dtype"),
        (torch.ones(4, 8, dtype=torch.int32), 1.0, "unsupported dtype"),
        (torch.randn(4, 8), torch.ones(1), "0-dim"),
    ],
)
def test_soft_threshold_rejects_bad_arguments(weight, scale, message):
    with pytest.raises(ValueError, match=message):
        soft_threshold(weight.to(DEVICE), scale)


# mvue24


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF])
@pytest.mark.parametrize("shape", [(12, 40), (3, 5, 16)])
def test_mvue24_keeps_two_per_group_scaled_by_inclusion_probability(shape, dtype):
    g = _weight(shape, dtype, seed=1)
    out = mvue24(g, seed=123)
    assert out.shape == g.shape and out.dtype == dtype
    groups_in, groups_out = g.reshape(-1, 4), out.reshape(-1, 4)
    assert torch.equal((groups_out != 0).sum(-1), (groups_in != 0).sum(-1).clamp(max=2))
    kept = out != 0
    assert (g[kept] != 0).all()
    expected = g.to(torch.promote_types(dtype, torch.float32)) / mvue24_inclusion_probabilities(g)
    if dtype in HALF:
        torch.testing.assert_close(out[kept], expected[kept].to(dtype), rtol=ULP[dtype], atol=0)
    else:
        torch.testing.assert_close(out[kept], expected[kept], rtol=1e-5, atol=0)


def test_mvue24_returns_groups_with_at_most_two_nonzeros_unchanged():
    g = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, -3.0, 0.0, 0.0, 1e-30, 0.0, 0.0, 5.0],
                      [2.0, 0.0, -7.0, 0.0, 0.0, 0.0, 0.0, 1.5, -0.0, 4.0, 4.0, 0.0]], device=DEVICE)
    for seed in range(5):
        assert torch.equal(mvue24(g, seed), g)


def test_mvue24_is_deterministic_in_seed_and_offset_counts_groups():
    g = torch.randn(12, 40, device=DEVICE)
    out = mvue24(g, seed=5)
    assert torch.equal(mvue24(g, seed=5), out)
    assert not torch.equal(mvue24(g, seed=6), out)
    assert not torch.equal(mvue24(g, seed=5, offset=1), out)
    # a shard of whole rows, offset by its first group, draws what the whole tensor draws there
    assert torch.equal(mvue24(g[4:9], seed=5, offset=4 * 10), out[4:9])
    assert torch.equal(mvue24(g.reshape(3, 4, 40), seed=5), out.reshape(3, 4, 40))


def test_mvue24_is_unbiased_with_the_inclusion_probabilities():
    row = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0, 0.1, -0.2, 0.3, 1.0, 1.0, 1.0, 1.0, 5.0, -1.0, 0.0, 2.0],
                       device=DEVICE)
    n = 8000  # identical rows: each gets its own Philox counters
    out = mvue24(row.repeat(n, 1), seed=2024).double()
    p = mvue24_inclusion_probabilities(row).double()
    g = row.double()
    frequency = (out != 0).double().mean(0)
    assert ((frequency - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (frequency, p)
    variance = g**2 * (1 / p.where(p > 0, 1) - 1)
    assert ((out.mean(0) - g).abs() <= 5 * (variance / n).sqrt() + 1e-12).all(), (out.mean(0), g)


@pytest.mark.parametrize(
    ("grad", "seed", "offset", "message"),
    [
        (torch.tensor(1.0), 0, 0, "no whole groups"),
        (torch.randn(3, 6), 0, 0, "no whole groups"),
        (torch.ones(2, 4, dtype=torch.int64), 0, 0, "unsupported dtype"),
        (torch.randn(2, 4), -1, 0, "seed must be"),
        (torch.randn(2, 4), 1.5, 0, "seed must be"),
        (torch.randn(2, 4), True, 0, "seed must be"),
        (torch.randn(2, 4), 0, -4, "offset must be"),
    ],
)
def test_mvue24_rejects_bad_arguments(grad, seed, offset, message):
    with pytest.raises(ValueError, match=message):
        mvue24(grad.to(DEVICE), seed, offset)


# gated activations

GATED = {
    "swiglu": (swiglu, lambda gate, up: F.silu(gate) * up),
    "geglu": (geglu, lambda gate, up: F.gelu(gate, approximate="tanh") * up),
}


def _gated_inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(shape, generator=gen)).to(DEVICE, dtype).requires_grad_()
    up = torch.randn(shape, generator=gen).to(DEVICE, dtype).requires_grad_()
    return gate, up


def _forward_backward(fn, gate, up, d_out):
    gate, up = gate.detach().requires_grad_(), up.detach().requires_grad_()
    out = fn(gate, up)
    out.backward(d_out)
    return out.detach(), gate.grad, up.grad


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("shape", [(12, 40), (3, 5, 16), (7,)])
def test_gated_float32_matches_torch_autograd(name, shape):
    fn, ref = GATED[name]
    gate, up = _gated_inputs(shape, torch.float32)
    d_out = torch.randn(shape, device=DEVICE)
    # against float64 autograd: for gates below about -5 the float32 reference's 1 + tanh cancels
    want = _forward_backward(ref, gate.double(), up.double(), d_out.double())
    for got, w in zip(_forward_backward(fn, gate, up, d_out), want, strict=True):
        torch.testing.assert_close(got, w.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("dtype", HALF)
def test_gated_half_rounds_the_float32_result_once(name, dtype):
    fn, ref = GATED[name]
    gate, up = _gated_inputs((12, 40), dtype)
    d_out = torch.randn(12, 40, device=DEVICE).to(dtype)
    got = _forward_backward(fn, gate, up, d_out)
    want = _forward_backward(ref, gate.float(), up.float(), d_out.float())
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, rtol=ULP[dtype], atol=1e-5)


@pytest.mark.parametrize("name", GATED)
def test_gated_gradcheck_float64(name):
    fn, ref = GATED[name]
    gate, up = _gated_inputs((3, 4), torch.float64)
    assert torch.autograd.gradcheck(fn, (gate, up))
    torch.testing.assert_close(fn(gate, up), ref(gate, up), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", GATED)
def test_gated_accepts_strided_halves_and_partial_grads(name):
    fn, ref = GATED[name]
    fused = torch.randn(6, 32, device=DEVICE, requires_grad=True)
    gate, up = fused.chunk(2, dim=-1)  # non-contiguous views, as from one fused projection
    fn(gate, up).sum().backward()
    got = fused.grad
    fused.grad = None
    ref(*fused.chunk(2, dim=-1)).sum().backward()
    torch.testing.assert_close(got, fused.grad, rtol=1e-5, atol=1e-6)
    up_only = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    fn(torch.randn(6, 16, device=DEVICE), up_only).sum().backward()
    assert up_only.grad is not None


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize(
    ("gate", "up", "message"),
    [
        (torch.randn(4, 8), torch.randn(4, 4), "differ"),
        (torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float16), "share a dtype"),
        (torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32), "share a dtype"),
    ],
)
def test_gated_rejects_bad_arguments(name, gate, up, message):
    with pytest.raises(ValueError, match=f"{name}: .*{message}"):
        GATED[name][0](gate.to(DEVICE), up.to(DEVICE))
