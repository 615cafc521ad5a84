"""Sparsity methods in one process, against their definitions."""

from __future__ import annotations

import pytest
import torch

from sparsedist.config.schema import ModelConfig, ParallelConfig, SparsityConfig
from sparsedist.models import FAMILIES, build_model, model_config
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity import SparseLinear, make_method, nm_mask, unpack_mask

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64)


def setup(method: str, **sparsity):
    cfg = ModelConfig(family="llama", config=LLAMA)
    model = build_model(cfg, model_config(cfg, 300, 32, 0), seed=0)
    backend = ParallelBackend(ParallelConfig(backend="none"), Runtime(0, 1, 0, torch.device("cpu")))
    sparse = make_method(SparsityConfig(method=method, **sparsity), backend)
    sparse.convert(model, FAMILIES["llama"])
    sparse.init_state()
    return model, sparse


def test_targets_cover_the_ffn_or_every_block_linear():
    _, ffn = setup("srste")
    assert sorted(ffn.layers) == sorted(f"model.layers.{i}.mlp.{n}" for i in range(2)
                                        for n in ("gate_proj", "up_proj", "down_proj"))
    _, every = setup("ste", targets="all_linear")
    assert len(every.layers) == 14
    model, dense = setup("dense")
    assert not dense.layers and not any(isinstance(m, SparseLinear) for m in model.modules())


def test_initial_masks_are_the_magnitude_masks():
    _, method = setup("ste")
    for layer in method.layers.values():
        assert torch.equal(unpack_mask(layer.mask, layer.in_features), nm_mask(layer.weight))
    assert method.metrics() == {"sparsity": 0.5}


def test_srste_adds_the_masked_decay_once_to_the_gradient():
    _, method = setup("srste", decay=0.01)
    grads = {}
    for name, layer in method.layers.items():
        layer.weight.grad = torch.randn_like(layer.weight)
        grads[name] = layer.weight.grad.clone()
    method.after_backward(step=0)
    for name, layer in method.layers.items():
        mask = unpack_mask(layer.mask, layer.in_features)
        torch.testing.assert_close(layer.weight.grad, grads[name] + 0.01 * (~mask) * layer.weight)


def test_masks_refresh_on_schedule_and_report_flips():
    _, method = setup("ste", refresh_interval=3)
    layer = next(iter(method.layers.values()))
    with torch.no_grad():
        layer.weight.neg_().add_(torch.randn_like(layer.weight))  # new magnitudes, new masks
    before = layer.mask.clone()
    method.after_step(step=0)
    method.after_step(step=1)
    assert torch.equal(layer.mask, before)
    method.after_step(step=2)
    assert not torch.equal(layer.mask, before)
    assert torch.equal(unpack_mask(layer.mask, layer.in_features), nm_mask(layer.weight))
    flips = int((unpack_mask(before, layer.in_features) ^ nm_mask(layer.weight)).sum())
    total = sum(lay.weight.numel() for lay in method.layers.values())
    assert method.metrics()["flip_rate"] == pytest.approx(flips / total)


def test_finalize_hard_prunes_to_exactly_the_mask():
    _, method = setup("srste")
    method.finalize()
    for layer in method.layers.values():
        mask = unpack_mask(layer.mask, layer.in_features)
        assert (layer.weight[~mask] == 0).all() and (layer.weight[mask] != 0).all()
