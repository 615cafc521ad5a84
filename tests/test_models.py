"""Model families: built from a recipe, GPT-2's Conv1D converted without changing the function, exported round trip."""

from __future__ import annotations

import pytest
import torch

from sparsedist.config.schema import ModelConfig
from sparsedist.models import FAMILIES, build_model, export_pretrained, model_config
from sparsedist.models.families import conv1d_to_linear

SIZES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=64),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=32,
                max_position_embeddings=64),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_build_and_export_round_trip(family, tmp_path):
    cfg = ModelConfig(family=family, config=SIZES[family])
    config = model_config(cfg, vocab_size=300, seq_len=32, eos_id=0)
    model = build_model(cfg, config, seed=0).eval()
    blocks = FAMILIES[family].blocks(model)
    assert len(blocks) == 2
    for name in FAMILIES[family].linears("all_linear"):
        assert isinstance(blocks[0].get_submodule(name), torch.nn.Linear), name
    tokens = torch.randint(0, 300, (2, 16))
    export_pretrained(model.state_dict(), cfg, config, tmp_path)
    reloaded = build_model(ModelConfig(family=family, pretrained=tmp_path), config, seed=1)
    torch.testing.assert_close(reloaded(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_gpt2_conv1d_becomes_an_equivalent_linear():
    family = FAMILIES["gpt2"]
    config = model_config(ModelConfig(family="gpt2", config=SIZES["gpt2"]), 300, 32, 0)
    torch.manual_seed(0)
    model = family.model_class(config).eval()
    tokens = torch.randint(0, 300, (2, 16))
    before = model(tokens).logits
    fc = family.blocks(model)[0].mlp.c_fc.weight.detach().clone()  # Conv1D: [in, out]
    conv1d_to_linear(model)
    linear = family.blocks(model)[0].mlp.c_fc
    assert tuple(linear.weight.shape) == (4 * 32, 32)  # [out, in]: a 2:4 group lies inside a row
    torch.testing.assert_close(linear.weight, fc.t())
    torch.testing.assert_close(model(tokens).logits, before)


def test_model_config_refusals():
    with pytest.raises(ValueError, match="model.config.vocab_size: 100 differs from the tokenizer's"):
        model_config(ModelConfig(family="llama", config={**SIZES["llama"], "vocab_size": 100}), 300, 32, 0)
    with pytest.raises(ValueError, match="n_wings: not a GPT2Config setting"):
        model_config(ModelConfig(family="gpt2", config={"n_wings": 2}), 300, 32, 0)


@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_llama_mlp_through_the_fused_gated_kernel_matches_hugging_face(monkeypatch, activation):
    """The CUDA path (swiglu or geglu, here in Triton's interpreter) through the model's own forward and backward."""
    pytest.importorskip("triton")
    from sparsedist.models import families

    cfg = ModelConfig(family="llama", config={**SIZES["llama"], "hidden_act": activation})
    model = build_model(cfg, model_config(cfg, vocab_size=300, seq_len=32, eos_id=0), seed=0)
    mlps = [block.mlp for block in FAMILIES["llama"].blocks(model)]
    assert all(type(mlp) is families.FusedGatedMLP and mlp.config.hidden_act == activation for mlp in mlps)
    tokens = torch.randint(0, 300, (2, 16))

    def loss_and_grads():
        model.zero_grad()
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    reference, reference_grads = loss_and_grads()
    calls = []
    monkeypatch.setattr(families, "_use_kernel", lambda gate: calls.append(gate.shape) or True)
    fused, fused_grads = loss_and_grads()
    assert len(calls) == len(mlps), "the kernel path did not run in every MLP"
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
