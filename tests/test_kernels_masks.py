"""Triton mask kernels against their torch references in `sparsedist.sparsity`, bit for bit.

Under `TRITON_INTERPRET=1` (no GPU) the kernels run on CPU tensors; shapes stay small and odd
(partial bytes, partial blocks) and the inputs hold ties, so a wrong tie rule fails.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from sparsedist.sparsity import TRANSPOSABLE_PATTERNS, nm_mask, pack_mask, transposable_mask, unpack_mask
from sparsedist_kernels.masks import masked_decay_, nm_prune, transposable_mask_bits

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN, INF = float("nan"), float("inf")


def _ties(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values in {-3, ..., 3}: equal magnitudes (and zeros of both signs once pruned) are common."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=gen).to(dtype).to(DEVICE)


def _normal(shape: tuple[int, int], dtype: torch.dtype, seed: int, spread: int = 0) -> torch.Tensor:
    """Normal values scaled by 2^U(-spread, spread)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-spread, spread + 1, shape, generator=gen).float())
    return (torch.randn(shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtypes, shapes, NaN positions and other bytes (tells -0.0 from 0.0; NaN signs and payloads are the
    platform's: inf·0 gives 0xFFC0 in numpy's bf16 but 0x7FC0 in torch's)."""
    nan = a.isnan()
    return (a.dtype == b.dtype and a.shape == b.shape and torch.equal(nan, b.isnan())
            and torch.equal(a[~nan].view(torch.uint8), b[~nan].view(torch.uint8)))


def _ties_to_higher(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """nm_mask with the opposite tie rule: the reference on groups reversed."""
    rows, cols = weight.shape
    flipped = nm_mask(weight.reshape(rows, -1, m).flip(-1).reshape(rows, cols), n, m)
    return flipped.reshape(rows, -1, m).flip(-1).reshape(rows, cols)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "m"), [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (5, 8)])
def test_nm_prune_matches_reference(dtype: torch.dtype, n: int, m: int) -> None:
    for seed, shape in enumerate([(12, 40), (20, 24 if m == 8 else 20)]):
        ties = _ties(shape, dtype, seed)
        assert not torch.equal(_ties_to_higher(ties, n, m), nm_mask(ties, n, m)), "the ties decide nothing"
        for weight in (ties, _normal(shape, dtype, seed, spread=8)):
            pruned, bits = nm_prune(weight, n, m)
            mask = nm_mask(weight, n, m)
            assert torch.equal(bits, pack_mask(mask)), (shape, weight)
            assert _same_bits(pruned, weight * mask)


def test_nm_prune_breaks_ties_to_the_lower_index() -> None:
    weight = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, 0.5, 0.5, 0.5]], device=DEVICE)
    pruned, bits = nm_prune(weight)
    assert bits.tolist() == [[0b0011_0011]]
    assert _same_bits(pruned, torch.tensor([[1.0, -1.0, 0.0, -0.0, 2.0, 0.5, 0.0, 0.0]], device=DEVICE))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on inf·0
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nm_prune_non_finite_as_reference(dtype: torch.dtype) -> None:
    """A NaN is never outranked and outranks nothing: it is kept and its group keeps n more; a pruned inf -> NaN."""
    weight = _normal((4, 16), dtype, 0)
    weight[0, :4] = torch.tensor([NAN, 1.0, 2.0, 3.0])
    weight[1, :4] = torch.tensor([INF, -INF, INF, 1.0])
    weight[2, 4:8] = NAN
    weight[3, 8:12] = torch.tensor([1.0, NAN, NAN, 0.0])
    pruned, bits = nm_prune(weight)
    mask = nm_mask(weight)
    assert torch.equal(bits, pack_mask(mask))
    assert mask[0, :4].tolist() == [True, False, True, True] and mask[2, 4:8].all()
    assert _same_bits(pruned, weight * mask)


@pytest.mark.parametrize(("shape", "dtype", "kwargs"), [
    ((16,), torch.float32, {}),
    ((4, 16), torch.float64, {}),
    ((4, 16), torch.int32, {}),
    ((4, 12), torch.float32, {"n": 1, "m": 3}),
    ((4, 16), torch.float32, {"n": 2, "m": 16}),
    ((4, 10), torch.float32, {}),
    ((4, 16), torch.float32, {"n": 5, "m": 4}),
    ((4, 16), torch.float32, {"block_cols": 4}),
])
def test_nm_prune_rejects(shape: tuple[int, ...], dtype: torch.dtype, kwargs: dict) -> None:
    with pytest.raises(ValueError, match="nm_prune"):
        nm_prune(torch.zeros(shape, device=DEVICE).to(dtype), **kwargs)


def test_nm_prune_rejects_non_contiguous() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        nm_prune(torch.zeros(16, 8, device=DEVICE).t())


def _tied_best_blocks(weight: torch.Tensor) -> int:
    """Number of 4x4 blocks whose best score several patterns reach (where the tie rule decides)."""
    rows, cols = weight.shape
    blocks = weight.abs().double().reshape(rows // 4, 4, cols // 4, 4).transpose(1, 2).reshape(-1, 16)
    scores = blocks @ TRANSPOSABLE_PATTERNS.to(weight.device).reshape(-1, 16).T.double()
    return int(((scores == scores.max(1, keepdim=True).values).sum(1) > 1).sum())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposable_mask_bits_matches_reference(dtype: torch.dtype) -> None:
    for seed, shape in enumerate([(12, 20), (20, 40), (16, 24)]):
        ties = _ties(shape, dtype, seed)
        assert _tied_best_blocks(ties) > 0
        for weight in (ties, _normal(shape, dtype, seed, spread=12)):
            assert torch.equal(transposable_mask_bits(weight), pack_mask(transposable_mask(weight))), (shape, weight)


def test_transposable_mask_bits_breaks_ties_to_the_first_pattern() -> None:
    bits = transposable_mask_bits(torch.ones(4, 12, device=DEVICE))  # every pattern ties: pattern 0 everywhere
    assert bits.tolist() == [[0x33, 0x03]] * 2 + [[0xCC, 0x0C]] * 2


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_transposable_mask_bits_non_finite_as_reference() -> None:
    """A NaN block takes pattern 0; an inf block the first pattern leaving an inf out (its score is inf·0 = NaN)."""
    weight = _normal((8, 16), torch.float32, 1)
    weight[0, 0] = INF
    weight[1, 5] = NAN
    weight[4:8, 8:12] = torch.tensor([[INF, 1.0, 2.0, INF], [1.0, 1.0, 1.0, 1.0], [0.0, INF, 0.0, 3.0],
                                      [-INF, 0.0, 0.0, 0.0]])
    weight[6, 12] = -INF
    bits = transposable_mask_bits(weight)
    assert torch.equal(bits, pack_mask(transposable_mask(weight)))
    assert not unpack_mask(bits, 16)[0, 0]


@pytest.mark.parametrize(("shape", "dtype"), [((16,), torch.float32), ((4, 18), torch.float32),
                                              ((6, 16), torch.float32), ((4, 16), torch.float64)])
def test_transposable_mask_bits_rejects(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="transposable_mask_bits"):
        transposable_mask_bits(torch.zeros(shape, device=DEVICE).to(dtype))
    with pytest.raises(ValueError, match="transposable_mask_bits"):
        transposable_mask_bits(torch.zeros(8, 16, device=DEVICE), block_rows=1, block_bytes=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("decay", [0.1, -3e-4])
def test_masked_decay_matches_torch(dtype: torch.dtype, decay: float) -> None:
    for seed, (rows, cols) in enumerate([(12, 20), (20, 44)]):
        weight = _normal((rows, cols), dtype, seed, spread=4)
        grad = _normal((rows, cols), torch.float32, seed + 100)
        gen = torch.Generator().manual_seed(seed)
        mask = (torch.rand(rows, cols, generator=gen) < 0.5).to(DEVICE)
        bits = pack_mask(mask)
        expected = grad + decay * weight.float() * ~unpack_mask(bits, cols)
        in_dtype = grad + decay * weight * ~unpack_mask(bits, cols)
        before = grad.clone()
        assert masked_decay_(grad, weight, bits, decay) is None
        assert _same_bits(grad, expected)
        assert torch.equal(grad[mask], before[mask]) and not torch.equal(grad[~mask], before[~mask])
        if dtype == torch.float32:
            assert _same_bits(grad, in_dtype)
        else:
            unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
            rounding = unit * (decay * weight.float()).abs().clamp(min=torch.finfo(dtype).smallest_normal)
            bound = rounding + 2.0**-23 * expected.abs()
            assert ((grad - in_dtype).abs() <= bound).all()


@pytest.mark.parametrize("case", ["grad_dtype", "weight_dtype", "bits_dtype", "weight_shape", "bits_shape",
                                  "non_contiguous"])
def test_masked_decay_rejects(case: str) -> None:
    grad, weight = torch.zeros(8, 12, device=DEVICE), torch.zeros(8, 12, device=DEVICE)
    bits = torch.zeros(8, 2, dtype=torch.uint8, device=DEVICE)
    args = {
        "grad_dtype": (grad.bfloat16(), weight, bits),
        "weight_dtype": (grad, weight.double(), bits),
        "bits_dtype": (grad, weight, bits.to(torch.int8)),
        "weight_shape": (grad, weight[:, :8].contiguous(), bits),
        "bits_shape": (grad, weight, torch.zeros(8, 12, dtype=torch.uint8, device=DEVICE)),
        "non_contiguous": (torch.zeros(12, 8, device=DEVICE).t(), weight, bits),
    }[case]
    with pytest.raises(ValueError, match="masked_decay_"):
        masked_decay_(*args, 0.1)
