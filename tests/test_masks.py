"""N:M mask primitives and the sparse linear layer, checked against their definitions."""

from __future__ import annotations

import itertools

import pytest
import torch

from sparsedist.sparsity import count_flips, mask_digest, nm_mask, pack_mask, unpack_mask
from sparsedist.sparsity.layer import SparseLinear
from sparsedist.sparsity.methods.ste import masked_ste_weight


def brute_force_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n largest |w| per group; among equals the lower index, by sorting (index as tie-breaker)."""
    out = torch.zeros_like(weight, dtype=torch.bool)
    for r in range(weight.shape[0]):
        for g in range(0, weight.shape[1], m):
            group = [(-abs(float(weight[r, g + i])), i) for i in range(m)]
            for _, i in sorted(group)[:n]:
                out[r, g + i] = True
    return out


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (2, 8), (4, 8)])
def test_nm_mask_keeps_the_largest_per_group(n, m):
    torch.manual_seed(0)
    weight = torch.randn(7, 3 * m)
    mask = nm_mask(weight, n, m)
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    assert (mask.reshape(7, -1, m).sum(-1) == n).all()
    assert torch.equal(mask, brute_force_mask(weight, n, m))


def test_nm_mask_breaks_ties_towards_the_lower_index():
    weight = torch.tensor([[1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 3.0, -3.0, 2.0]])
    assert nm_mask(weight).tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False, True, True, False],
    ]


def test_nm_mask_on_all_equal_magnitude_patterns_matches_brute_force():
    values = torch.tensor(list(itertools.product([0.0, 1.0, -1.0, 2.0], repeat=4)))
    assert torch.equal(nm_mask(values), brute_force_mask(values, 2, 4))


def test_empty_shards_have_empty_masks():
    """A rank may hold no rows of a small weight (2 rows on 3 ranks)."""
    empty = torch.empty(0, 8)
    assert nm_mask(empty).shape == (0, 8)
    assert pack_mask(nm_mask(empty)).shape == (0, 1)
    assert unpack_mask(pack_mask(nm_mask(empty)), 8).shape == (0, 8)


def test_nm_mask_refuses_rows_without_whole_groups():
    with pytest.raises(ValueError, match="no whole groups of 4"):
        nm_mask(torch.randn(3, 6))


@pytest.mark.parametrize("cols", [4, 8, 12, 68, 1])
def test_pack_unpack_round_trip(cols):
    mask = torch.rand(5, cols) > 0.5
    bits = pack_mask(mask)
    assert bits.dtype == torch.uint8 and bits.shape == (5, (cols + 7) // 8)
    assert torch.equal(unpack_mask(bits, cols), mask)


def test_packed_bit_order_is_lsb_first():
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[0, 0] = mask[0, 3] = True
    assert pack_mask(mask).tolist() == [[0b00001001]]


def test_flip_count_and_digest():
    a = torch.rand(6, 16) > 0.5
    b = a.clone()
    b[0, :3] = ~b[0, :3]
    b[5, 15] = ~b[5, 15]
    assert count_flips(pack_mask(a), pack_mask(b)) == 4
    assert mask_digest(pack_mask(a)) == mask_digest(pack_mask(a.clone()))
    assert mask_digest(pack_mask(a)) != mask_digest(pack_mask(b))


def test_ste_forward_masks_and_backward_passes_straight_through():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 3)
    layer = SparseLinear.from_linear(linear, masked_ste_weight)
    assert layer.weight is linear.weight and not layer.mask.requires_grad
    mask = nm_mask(layer.weight)
    layer.mask.data.copy_(pack_mask(mask))
    x = torch.randn(5, 8)
    y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight * mask, layer.bias))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    # STE: the dense weight receives dL/dW̃ = grad_outᵀ·x in full, pruned positions included.
    torch.testing.assert_close(layer.weight.grad, grad_out.t() @ x)
    assert (layer.weight.grad[~mask] != 0).all()
