"""MomentAdam's batched foreach update against the per-element formulas, in float64, across chunk sizes."""

from __future__ import annotations

import pytest
import torch

from sparsedist.config.schema import ModelConfig, OptimConfig, ParallelConfig
from sparsedist.config.sparsity import METHOD_CONFIGS
from sparsedist.models import FAMILIES, build_model, model_config
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity import adam, make_method, unpack_mask
from sparsedist.student import param_groups

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64)
STEPS, TOTAL, DECAY = 5, 8, 0.3
CFG = OptimConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def trained(name: str):
    """A tiny float64 Llama under `name` (masks fixed), STEPS optimizer steps of seeded random gradients; returns
    the parameters before and after, the gradients of each step, each parameter's flat mask (ones where dense)
    and weight decay, and the method."""
    cfg = ModelConfig(family="llama", config=LLAMA)
    model = build_model(cfg, model_config(cfg, 300, 32, 0), seed=0)
    backend = ParallelBackend(ParallelConfig(backend="none"), Runtime(0, 1, 0, torch.device("cpu")))
    extra = dict(decay_warmup=4) if name == "ast" else {}
    method = make_method(METHOD_CONFIGS[name](method=name, decay=DECAY, refresh_interval=1000, **extra), backend,
                         TOTAL, False)
    method.convert(model, FAMILIES["llama"])
    model.double()
    optimizer = method.make_optimizer(param_groups(model, CFG, method.no_decay_parameters()), CFG)
    backend.prepare(model, optimizer)
    method.start()
    masks = {id(layer.weight): unpack_mask(layer.mask, layer.in_features).reshape(-1).double()
             for layer in method.layers.values()}
    params = [(p, group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone().reshape(-1) for p, _ in params]
    grads = []
    for step in range(STEPS):
        method.begin(step)
        torch.manual_seed(step)
        for p, _ in params:
            p.grad = torch.randn_like(p)
        grads.append([p.grad.clone().reshape(-1) for p, _ in params])
        method.update(step, [p for p, _ in params])
        optimizer.step()
    after = [p.detach().reshape(-1) for p, _ in params]
    flat_masks = [masks.get(id(p), torch.ones(p.numel(), dtype=torch.float64)) for p, _ in params]
    return before, after, grads, flat_masks, [wd for _, wd in params], method


def reference(name: str, method, w, grads, mask, wd):
    """The update written element by element: m from g, u from m (AST or CAST), v from u², step from u."""
    (b1, b2), lr, eps = CFG.betas, CFG.lr, CFG.eps
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        if name == "ast":
            u = m + method.decay_at(t - 1) * (1 - mask) * w
        else:
            alpha = t / TOTAL
            u = torch.where(mask.bool(), m, (1 - alpha) * m + alpha * DECAY * torch.sign(w))
        v = b2 * v + (1 - b2) * u * u
        w = w * (1 - lr * wd) - lr * (u / (1 - b1**t)) / (torch.sqrt(v / (1 - b2**t)) + eps)
    return w


@pytest.mark.parametrize("name", ["ast", "cast"])
@pytest.mark.parametrize("chunk", [1000, 1 << 24])
def test_batched_update_equals_the_per_element_formulas(monkeypatch, name, chunk):
    monkeypatch.setattr(adam, "CHUNK", chunk)
    before, after, grads, masks, decays, method = trained(name)
    sizes = {w.numel() for w in before}
    assert len(sizes) >= 3 and max(sizes) > 2 * 1000  # several sizes; with chunk 1000 some span several chunks
    assert any(not m.all() for m in masks) and any(m.all() for m in masks)  # sparse and dense parameters
    for i, (w0, w1, mask, wd) in enumerate(zip(before, after, masks, decays, strict=True)):
        expected = reference(name, method, w0, [g[i] for g in grads], mask, wd)
        torch.testing.assert_close(w1, expected, rtol=1e-12, atol=1e-14)


def test_batches_are_consecutive_and_bounded():
    pieces = [(None, None, torch.empty(n), None, None, None) for n in (3, 4, 2, 5, 1, 1, 5)]
    packed = adam.batches(pieces, 5)
    assert [[p[2].numel() for p in batch] for batch in packed] == [[3], [4], [2], [5], [1, 1], [5]]
    assert [p for batch in packed for p in batch] == pieces
