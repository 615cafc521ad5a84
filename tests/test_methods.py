"""Sparsity methods in one process, each against a hand-written reference of its equations."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from sparsedist.config.schema import ModelConfig, OptimConfig, ParallelConfig
from sparsedist.config.sparsity import METHOD_CONFIGS
from sparsedist.models import FAMILIES, build_model, model_config
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity import SparseLinear, make_method, nm_mask, pack_mask, unpack_mask
from sparsedist.sparsity.methods.cast import expanded_scale
from sparsedist.sparsity.soft_threshold import soft_threshold
from sparsedist.sparsity.transposable import transposable_mask
from sparsedist.student import param_groups

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=64)


def setup(method: str, total_steps: int = 100, fp8: bool = False, **sparsity):
    """A tiny Llama converted by `method`, its optimizer prepared on the one-process backend, first masks."""
    cfg = ModelConfig(family="llama", config=LLAMA)
    model = build_model(cfg, model_config(cfg, 300, 32, 0), seed=0)
    backend = ParallelBackend(ParallelConfig(backend="none"), Runtime(0, 1, 0, torch.device("cpu")))
    sparse = make_method(METHOD_CONFIGS[method](method=method, **sparsity), backend, total_steps, fp8)
    sparse.convert(model, FAMILIES["llama"])
    prepared_optimizer(model, sparse, OptimConfig())
    sparse.start()
    return model, sparse


def prepared_optimizer(model, method, cfg: OptimConfig) -> torch.optim.Optimizer:
    optimizer = method.make_optimizer(param_groups(model, cfg, method.no_decay_parameters()), cfg)
    method.backend.prepare(model, optimizer)
    return optimizer


def before_update(method, step: int) -> None:
    """What the backend does once gradients are reduced and clipped: the method's update hook."""
    tensors = [p for group in method.backend.optimizer.param_groups for p in group["params"]]
    method.update(step, tensors)


def mask_of(layer: SparseLinear) -> torch.Tensor:
    return unpack_mask(layer.mask, layer.in_features)


def first(method) -> SparseLinear:
    return next(iter(method.layers.values()))


def fake_gradients(method, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    grads = {}
    for name, layer in method.layers.items():
        layer.weight.grad = torch.randn_like(layer.weight)
        grads[name] = layer.weight.grad.clone()
    return grads


# --- shared behaviour -------------------------------------------------------------------

def test_targets_follow_the_recipe_and_the_papers_defaults():
    _, ffn = setup("srste")
    assert sorted(ffn.layers) == sorted(f"model.layers.{i}.mlp.{n}" for i in range(2)
                                        for n in ("gate_proj", "up_proj", "down_proj"))
    _, every = setup("ste", targets="all_linear")
    assert len(every.layers) == 14
    assert len(setup("ast")[1].layers) == len(setup("cast")[1].layers) == 14  # AST and CAST: every block linear
    model, dense = setup("dense")
    assert not dense.layers and not any(isinstance(m, SparseLinear) for m in model.modules())


def test_initial_masks_are_the_magnitude_masks():
    _, method = setup("ste")
    for layer in method.layers.values():
        assert torch.equal(mask_of(layer), nm_mask(layer.weight))
    assert method.metrics()["sparsity"] == 0.5


def test_masks_refresh_on_schedule_and_report_flips():
    _, method = setup("ste", refresh_interval=3)
    layer = first(method)
    with torch.no_grad():
        layer.weight.neg_().add_(torch.randn_like(layer.weight))  # new magnitudes, new masks
    before = layer.mask.clone()
    method.end(0)
    method.end(1)
    assert torch.equal(layer.mask, before)
    method.end(2)
    assert torch.equal(mask_of(layer), nm_mask(layer.weight))
    flips = int((unpack_mask(before, layer.in_features) ^ nm_mask(layer.weight)).sum())
    total = sum(lay.weight.numel() for lay in method.layers.values())
    assert flips and method.metrics()["flip_rate"] == pytest.approx(flips / total)


def test_pruned_weight_share_is_the_norm_share_off_the_mask():
    _, method = setup("srste")
    pruned = sum(float((lay.weight.detach()[~mask_of(lay)] ** 2).sum()) for lay in method.layers.values())
    total = sum(float((lay.weight.detach() ** 2).sum()) for lay in method.layers.values())
    assert method.metrics()["pruned_weight_share"] == pytest.approx(pruned / total)


def test_pruned_near_zero_counts_pruned_weights_small_against_their_layers_kept_rms():
    _, method = setup("srste")
    near = pruned = 0
    with torch.no_grad():
        for i, layer in enumerate(method.layers.values()):
            mask = mask_of(layer)
            rms = float(layer.weight[mask].square().mean().sqrt())
            small = ~mask & (torch.rand_like(layer.weight) < 0.3 + 0.1 * i)  # a different share per layer
            layer.weight[small] = 0.009 * rms * torch.sign(layer.weight[small])  # just inside 0.01·rms
            layer.weight[~mask & ~small] = layer.weight[~mask & ~small].clamp(min=0.011 * rms)  # just outside
            near, pruned = near + int(small.sum()), pruned + int((~mask).sum())
    assert torch.equal(mask_of(first(method)), nm_mask(first(method).weight)), "the zeros stayed off the mask"
    assert method.metrics()["pruned_near_zero"] == pytest.approx(near / pruned)


# --- STE and SR-STE ---------------------------------------------------------------------

def test_ste_forward_masks_and_backward_passes_straight_through():
    _, method = setup("ste")
    layer = first(method)
    x = torch.randn(5, layer.in_features)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, layer.weight * mask_of(layer)))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, grad_out.t() @ x)  # pruned positions included


def test_srste_adds_the_masked_decay_once_to_the_gradient():
    _, method = setup("srste", decay=0.01)
    grads = fake_gradients(method)
    before_update(method, step=0)
    for name, layer in method.layers.items():
        torch.testing.assert_close(layer.weight.grad, grads[name] + 0.01 * (~mask_of(layer)) * layer.weight)


def test_finalize_hard_prunes_to_exactly_the_mask():
    _, method = setup("srste")
    method.finalize()
    for layer in method.layers.values():
        assert (layer.weight[~mask_of(layer)] == 0).all() and (layer.weight[mask_of(layer)] != 0).all()


# --- sparse_pretrain (ICML'24) ----------------------------------------------------------

def test_sparse_pretrain_masks_are_transposable_and_decay_then_turn_dense():
    _, method = setup("sparse_pretrain", total_steps=12, dense_finetune_fraction=0.25, decay=0.02)
    for layer in method.layers.values():
        assert torch.equal(mask_of(layer), transposable_mask(layer.weight))
    assert method.dense_from == 9
    grads = fake_gradients(method)
    before_update(method, step=8)
    layer = first(method)
    name = next(iter(method.layers))
    torch.testing.assert_close(layer.weight.grad, grads[name] + 0.02 * (~mask_of(layer)) * layer.weight)
    x = torch.randn(3, layer.in_features)
    method.begin(8)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * mask_of(layer)))
    method.begin(9)  # the dense phase: full W, no decay, no refresh
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    grads = fake_gradients(method, seed=1)
    before_update(method, step=9)
    torch.testing.assert_close(layer.weight.grad, grads[name])
    before = {n: lay.weight.clone() for n, lay in method.layers.items()}
    method.finalize()
    assert all(torch.equal(lay.weight, before[n]) for n, lay in method.layers.items()), "the final model is dense"


def test_sparse_pretrain_mvue_weight_gradient_is_unbiased():
    _, method = setup("sparse_pretrain", mvue=True)
    layer = first(method)
    x = torch.randn(16, layer.in_features)
    grad_out = torch.randn(16, layer.out_features)
    exact = grad_out.t() @ x
    total = torch.zeros_like(exact)
    draws = 400
    torch.manual_seed(0)
    for _ in range(draws):
        layer.weight.grad = None
        layer(x).backward(grad_out)
        total += layer.weight.grad
    single = layer.weight.grad
    assert not torch.allclose(single, exact)  # one draw is an estimate...
    assert (total / draws - exact).abs().mean() < 0.1 * exact.abs().mean()  # ...whose mean is the exact gradient


# --- S-STE ------------------------------------------------------------------------------

def test_sste_forward_is_scaled_soft_threshold_with_frozen_beta_and_identity_backward():
    _, method = setup("sste")
    layer = first(method)
    s = soft_threshold(layer.weight.detach())
    beta = float((layer.weight.detach() * s).sum() / (s * s).sum())
    assert float(layer.beta) == pytest.approx(beta, rel=1e-5)
    assert "beta" in dict(layer.named_buffers()) and "beta" in layer.state_dict()  # persistent
    x = torch.randn(4, layer.in_features)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, beta * s), rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(layer.weight.grad, grad_out.t() @ x)  # no β, no mask factor
    with torch.no_grad():
        layer.weight.mul_(3.0)
    method.end(0)
    assert float(layer.beta) == pytest.approx(beta, rel=1e-5), "β is computed once, never again"


def test_sste_forward_through_the_triton_kernel_matches_the_torch_path(monkeypatch):
    """The CUDA path (the soft-threshold kernel, here in Triton's interpreter) through the layer's own forward."""
    pytest.importorskip("triton")
    module = importlib.import_module("sparsedist.sparsity.soft_threshold")  # the package re-exports the function

    _, method = setup("sste")
    layer = first(method)
    x = torch.randn(4, layer.in_features)
    reference = layer(x)
    reference.backward(torch.ones_like(reference))
    reference_grad, layer.weight.grad = layer.weight.grad, None
    weight = layer.weight.detach()
    calls = []
    monkeypatch.setattr(module, "_use_kernel", lambda w: calls.append(w.shape) or True)
    fused = layer(x)
    assert calls, "the kernel path did not run"
    assert torch.equal(fused, reference)  # fp32 weight and β: bit for bit
    fused.backward(torch.ones_like(fused))
    assert torch.equal(layer.weight.grad, reference_grad)  # still the identity STE
    for dtype in (torch.bfloat16, torch.float16):  # the kernel rounds once, the reference twice
        w = weight.to(dtype)
        kernel_out = module.scaled_soft_threshold(w, layer.beta)
        monkeypatch.setattr(module, "_use_kernel", lambda w: False)
        torch_out = module.scaled_soft_threshold(w, layer.beta)
        monkeypatch.setattr(module, "_use_kernel", lambda w: True)
        assert kernel_out.dtype == torch_out.dtype == dtype
        assert torch.equal(kernel_out != 0, torch_out != 0)
        torch.testing.assert_close(kernel_out.float(), torch_out.float(), rtol=2.0**-6, atol=0)


def test_sste_finalize_delivers_the_forward_weights():
    _, method = setup("sste")
    layer = first(method)
    x = torch.randn(4, layer.in_features)
    before = layer(x).detach()
    method.finalize()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    assert float(layer.beta) == 1.0
    assert ((layer.weight != 0).reshape(layer.out_features, -1, 4).sum(-1) <= 2).all()


# --- AST --------------------------------------------------------------------------------

def reference_moment_adam(w, g_steps, u_of, lr, betas, eps, wd):
    """The AST / AdamS update written out: m from g, u from m, v from u², step from u."""
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, g in enumerate(g_steps, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        u = u_of(t, w, m)
        v = betas[1] * v + (1 - betas[1]) * u * u
        w = w * (1 - lr * wd) - lr / (1 - betas[0] ** t) * u / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return w


def run_optimizer(method, model, steps: int, cfg: OptimConfig, after_step=None):
    """`steps` optimizer steps on seeded random gradients; `after_step(step, optimizer)` after each update."""
    optimizer = prepared_optimizer(model, method, cfg)
    layer = first(method)
    w0 = layer.weight.detach().clone()
    grads = []
    for step in range(steps):
        method.begin(step)
        torch.manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        grads.append(layer.weight.grad.clone())
        before_update(method, step)
        optimizer.step()
        if after_step is not None:
            after_step(step, optimizer)
    return layer, w0, grads


def test_ast_optimizer_puts_the_annealed_decay_inside_the_moments():
    model, method = setup("ast", decay=0.05, decay_warmup=4, refresh_interval=1000)
    cfg = OptimConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    layer, w0, grads = run_optimizer(method, model, 6, cfg)
    mask = mask_of(layer)
    assert [method.decay_at(s) for s in (0, 3, 5)] == pytest.approx([0.05 / 4, 0.05, 0.05])
    _, share = setup("ast", total_steps=40, decay=0.05, decay_warmup=0.25)  # T₀ = 10 of 40 steps
    assert [share.decay_at(s) for s in (0, 4, 9, 30)] == pytest.approx([0.005, 0.025, 0.05, 0.05])

    def u_of(t, w, m):
        return m + 0.05 * min(t / 4, 1.0) * (w * ~mask)

    expected = reference_moment_adam(w0, grads, u_of, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-5, atol=1e-7)


def test_ast_slorb_branch_starts_from_the_pruned_block_means():
    _, method = setup("ast", slorb=True, slorb_k=16)
    layer = first(method)
    pruned = layer.weight * ~mask_of(layer)
    expected_s = pruned.reshape(layer.out_features, -1, 16).mean(-1)
    torch.testing.assert_close(layer.branch.s, expected_s)
    x = torch.randn(3, layer.in_features)
    block_sums = x.reshape(3, -1, 16).sum(-1)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * mask_of(layer)) + block_sums @ expected_s.t(),
                               rtol=1e-5, atol=1e-6)
    extra = sum(p.numel() for lay in method.layers.values() for p in lay.branch.parameters())
    base = sum(lay.weight.numel() for lay in method.layers.values())
    assert extra / base == pytest.approx(0.125)  # k = 16: 12.5% extra parameters


# --- CAST -------------------------------------------------------------------------------

def test_cast_adams_decays_pruned_slots_through_the_smoothed_moment_only():
    model, method = setup("cast", total_steps=8, decay=0.3, refresh_interval=1000)
    cfg = OptimConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    layer, w0, grads = run_optimizer(method, model, 5, cfg)
    mask = mask_of(layer)

    def u_of(t, w, m):  # μ̃, with α_t = t/T; w is θ_{t−1}
        alpha = t / 8
        return torch.where(mask, m, (1 - alpha) * m + alpha * 0.3 * w.sign())

    expected = reference_moment_adam(w0, grads, u_of, cfg.lr, cfg.betas, cfg.eps, 0.0)
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=1e-5, atol=1e-7)


def test_cast_decay_auto_is_the_mean_corrected_momentum_on_pruned_slots_after_the_first_updates():
    model, method = setup("cast", total_steps=40, decay="auto", decay_auto_steps=3, decay_auto_factor=2.0,
                          refresh_interval=1000)
    cfg = OptimConfig(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    optimizers = []

    def end(step, optimizer):
        assert method.decay is None
        method.end(step)
        optimizers.append(optimizer)

    layer, w0, grads = run_optimizer(method, model, 3, cfg, after_step=end)
    optimizer = optimizers[-1]
    pruned = [(optimizer.state[lay.weight]["exp_avg"], ~mask_of(lay)) for lay in method.layers.values()]
    mean = sum(float(m[p].abs().sum()) for m, p in pruned) / sum(int(p.sum()) for _, p in pruned)
    assert method.decay == pytest.approx(2.0 * mean / (1 - 0.9**3))
    assert method.metrics()["decay"] == method.decay
    no_decay = reference_moment_adam(w0, grads, lambda t, w, m: torch.where(mask_of(layer), m, (1 - t / 40) * m),
                                     cfg.lr, cfg.betas, cfg.eps, 0.0)
    torch.testing.assert_close(layer.weight.detach(), no_decay, rtol=1e-5, atol=1e-7)  # λ = 0 while measuring

    _, resumed = setup("cast", total_steps=40, decay="auto", decay_auto_steps=3)
    resumed.load_host_state(method.host_state())
    assert resumed.decay == method.decay and not resumed._measuring(3)


def test_cast_stored_momentum_is_the_raw_gradient_ema():
    model, method = setup("cast", total_steps=4, decay=0.5)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.0)
    optimizer = prepared_optimizer(model, method, cfg)
    layer = first(method)
    method.begin(3)  # α = 1: μ̃ on pruned slots is pure decay
    layer.weight.grad = torch.randn_like(layer.weight)
    before_update(method, 3)
    optimizer.step()
    torch.testing.assert_close(optimizer.state[layer.weight]["exp_avg"], 0.1 * layer.weight.grad)


def test_cast_forward_is_dense_with_learnable_scales_that_never_change_the_kept_pattern():
    _, method = setup("cast")
    layer = first(method)
    assert tuple(layer.scale.shape) == (layer.out_features, 2)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))  # A = 1: the dense forward
    with torch.no_grad():
        layer.scale.uniform_(0.1, 3.0)
    half = layer.in_features // 2
    scaled = torch.cat([layer.weight[:, :half] * layer.scale[:, :1], layer.weight[:, half:] * layer.scale[:, 1:]], 1)
    torch.testing.assert_close(layer(x), F.linear(x, scaled))
    assert torch.equal(nm_mask(scaled), nm_mask(layer.weight))  # a group shares one scale
    assert id(layer.scale) in method.no_decay_parameters()


def test_cast_refreshes_before_the_update_and_finalize_folds_and_prunes():
    _, method = setup("cast", refresh_interval=10)
    layer = first(method)
    with torch.no_grad():
        layer.weight.neg_().add_(torch.randn_like(layer.weight))
    stale = layer.mask.clone()
    method.end(8)
    method.begin(8)
    assert torch.equal(layer.mask, stale)
    method.end(9)
    assert torch.equal(layer.mask, stale), "not after an update"
    method.begin(9)  # t = 10
    assert torch.equal(layer.mask, pack_mask(nm_mask(layer.weight)))
    with torch.no_grad():
        layer.scale.uniform_(0.5, 2.0)
    x = torch.randn(3, layer.in_features)
    dense_out = layer(x).detach()
    last = layer.mask.clone()
    with torch.no_grad():
        layer.weight.neg_().add_(torch.randn_like(layer.weight))  # a recompute would choose other weights
    method.finalize()
    assert (layer.scale == 1).all()
    assert torch.equal(layer.mask, last), "the last in-loop masks are the final ones"
    mask = mask_of(layer)
    assert (layer.weight[~mask] == 0).all()
    # the pruned model equals the scaled model with its pruned entries dropped
    assert (layer(x) - dense_out).abs().max() > 0
    assert ((layer.weight != 0).reshape(layer.out_features, -1, 4).sum(-1) <= 2).all()


def test_rebuilt_weight_product_has_the_gradients_of_the_plain_product():
    """The forward keeps x and the parameters, not A⊙W; the backward rebuilds it: same gradients."""
    _, method = setup("cast")
    layer = first(method)
    with torch.no_grad():
        layer.scale.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    grad_out = torch.randn(2, 3, layer.out_features)
    layer(x).backward(grad_out)
    weight, scale = layer.weight.detach().requires_grad_(), layer.scale.detach().requires_grad_()
    x_ref = x.detach().requires_grad_()
    F.linear(x_ref, weight * expanded_scale(layer, scale)).backward(grad_out)
    for ours, reference in ((layer.weight.grad, weight.grad), (layer.scale.grad, scale.grad), (x.grad, x_ref.grad)):
        torch.testing.assert_close(ours, reference)


def test_the_plain_product_keeps_no_transformed_weight_when_f_linear_is_replaced(monkeypatch):
    """DeepSpeed ZeRO-3 replaces F.linear with its own function; the layer must still rebuild M⊙W in
    the backward rather than hand it to a product that keeps it alive until then."""
    _, method = setup("srste")
    layer, original = first(method), F.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: original(*args))
    out = layer(torch.randn(2, 3, layer.in_features))
    assert type(out.grad_fn).__name__ == "_ProductLinearBackward"


def test_update_masks_release_the_gradients_with_the_step():
    """CAST keeps its update masks over its after_step; they must not keep gradients alive."""
    import weakref

    _, method = setup("cast")
    fake_gradients(method)
    grad = weakref.ref(first(method).weight.grad)
    before_update(method, 0)
    method.end(0)
    for layer in method.layers.values():
        layer.weight.grad = None
    assert grad() is None


def test_a_piece_its_mask_bits_do_not_cover_is_refused():
    _, method = setup("srste")
    layer = first(method)
    piece = method.backend.piece(layer.weight)
    beyond = type(piece)(torch.zeros(8), None, piece.stop - 4)  # 4 weights past the end of the layer
    with pytest.raises(RuntimeError, match="misaligned sharding"):
        method.store.mask_range(layer, beyond.start, beyond.stop)


def test_cast_validation_sees_the_model_it_would_deliver():
    _, method = setup("cast")
    layer = first(method)
    layer.scale.data.uniform_(0.5, 1.5)
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        with method.delivered():
            delivered = layer(x)
        pruned = layer.weight * expanded_scale(layer, layer.scale) * unpack_mask(layer.mask, layer.in_features)
        torch.testing.assert_close(delivered, F.linear(x, pruned, layer.bias))
        assert not torch.allclose(layer(x), delivered)  # training forward: dense A⊙W, restored on exit
