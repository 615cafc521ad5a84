"""What sparsedist needs to know about each transformers model family.

Every weight sparsedist touches is an `nn.Linear` laid out [out, in], so a 2:4 group
(4 consecutive inputs) always lies inside one row. GPT-2's `Conv1D` stores [in, out];
it is converted to `nn.Linear` when the model is built and back when it is exported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Family:
    """A model family: its classes, where its blocks are, and which linears are FFN or attention."""

    name: str
    config_class: type[PretrainedConfig]
    model_class: type[PreTrainedModel]
    blocks_path: str
    ffn_linears: tuple[str, ...]
    attention_linears: tuple[str, ...]
    context_key: str
    """The config key that bounds the sequence length."""
    conv1d: bool = False

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return model.get_submodule(self.blocks_path)

    @property
    def ffn_pattern(self) -> str:
        """A regex matching the full names of the FFN linears."""
        return rf"^{re.escape(self.blocks_path)}\.\d+\.({'|'.join(map(re.escape, self.ffn_linears))})$"

    def linears(self, targets: str) -> tuple[str, ...]:
        """Block-relative names of the linears a sparsity target covers."""
        return self.ffn_linears if targets == "ffn" else self.attention_linears + self.ffn_linears


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama",
            config_class=LlamaConfig,
            model_class=LlamaForCausalLM,
            blocks_path="model.layers",
            ffn_linears=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
            attention_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
            context_key="max_position_embeddings",
        ),
        Family(
            name="opt",
            config_class=OPTConfig,
            model_class=OPTForCausalLM,
            blocks_path="model.decoder.layers",
            ffn_linears=("fc1", "fc2"),
            attention_linears=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
            context_key="max_position_embeddings",
        ),
        Family(
            name="gpt2",
            config_class=GPT2Config,
            model_class=GPT2LMHeadModel,
            blocks_path="transformer.h",
            ffn_linears=("mlp.c_fc", "mlp.c_proj"),
            attention_linears=("attn.c_attn", "attn.c_proj"),
            context_key="n_positions",
            conv1d=True,
        ),
    )
}


def _use_kernel(gate: torch.Tensor) -> bool:
    """Whether a fused MLP runs its Triton kernel: CUDA tensors (tests force it on the CPU)."""
    return gate.is_cuda


_FUSED_ACTIVATIONS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu"}
"""Llama `hidden_act`s with a fused gated kernel in `sparsedist_kernels.gated`."""


class FusedGatedMLP(LlamaMLP):
    """Llama's MLP with act(gate)·up as one Triton kernel on CUDA: `swiglu` for SiLU, `geglu` for the tanh GELU.

    The kernel writes the product in one pass and saves only gate and up for its one-pass
    backward, where eager torch also writes act(gate) and saves it (one [tokens, intermediate]
    activation less per layer). Elsewhere, Hugging Face's forward. fp32 within a few ulps of it;
    bf16 and fp16 rounded once where torch rounds twice.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if _use_kernel(gate):
            from sparsedist_kernels import gated

            return self.down_proj(getattr(gated, _FUSED_ACTIVATIONS[self.config.hidden_act])(gate, up))
        return self.down_proj(self.act_fn(gate) * up)


def fuse_gated_activations(model: nn.Module) -> None:
    """Give every Llama MLP whose activation has a fused kernel the fused forward (no parameter or state changes)."""
    for module in model.modules():
        if type(module) is LlamaMLP and module.config.hidden_act in _FUSED_ACTIVATIONS:
            module.__class__ = FusedGatedMLP


def conv1d_to_linear(model: nn.Module) -> None:
    """Replace every Conv1D ([in, out] weight) by an equivalent nn.Linear ([out, in])."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            model.set_submodule(name, linear)


def linear_to_conv1d_state(state: dict[str, torch.Tensor], family: Family) -> dict[str, torch.Tensor]:
    """Transpose the converted linears of a full state dict back to Conv1D's [in, out] layout."""
    if not family.conv1d:
        return state
    names = family.attention_linears + family.ffn_linears

    def converted(key: str) -> bool:
        return key.endswith(".weight") and key.removesuffix(".weight").endswith(names)

    return {key: value.t().contiguous() if converted(key) else value for key, value in state.items()}
