"""Building a model from a recipe: from sizes in the recipe or from a local pretrained directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from sparsedist.config.schema import ModelConfig
from sparsedist.errors import ModelConfigError
from sparsedist.models.families import FAMILIES, Family, conv1d_to_linear, linear_to_conv1d_state


def model_config(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int) -> PretrainedConfig:
    """The transformers config of the recipe's model, checked against the tokenizer and sequence length."""
    family = FAMILIES[cfg.family]
    if cfg.pretrained is not None:
        if not (cfg.pretrained / "config.json").is_file():
            raise ModelConfigError(f"model.pretrained: {cfg.pretrained} holds no config.json")
        config = AutoConfig.from_pretrained(cfg.pretrained)
        if config.model_type != family.name:
            raise ModelConfigError(
                f"model.family: {family.name!r} but {cfg.pretrained} is a {config.model_type!r} model"
            )
    else:
        defaults = family.config_class()
        for key in cfg.config:
            if not hasattr(defaults, key):
                raise ModelConfigError(f"model.config.{key}: not a {family.config_class.__name__} setting")
        given_vocab = cfg.config.get("vocab_size", vocab_size)
        if given_vocab != vocab_size:
            raise ModelConfigError(
                f"model.config.vocab_size: {given_vocab} differs from the tokenizer's ({vocab_size}); leave it out"
            )
        special = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
        try:
            config = family.config_class(**{**special, **cfg.config, "vocab_size": vocab_size})
        except Exception as err:  # transformers validates its configs with errors of several types
            raise ModelConfigError(f"model.config: {' '.join(str(err).split())}") from None
    if config.vocab_size < vocab_size:
        raise ModelConfigError(
            f"model.pretrained: vocabulary {config.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    context = getattr(config, family.context_key)
    if context < seq_len:
        raise ModelConfigError(f"data.seq_len: {seq_len} exceeds the model's {family.context_key} ({context})")
    return config


def build_model(cfg: ModelConfig, config: PretrainedConfig, seed: int) -> nn.Module:
    """An fp32 model on the CPU: pretrained weights, or a seeded initialisation (identical on every rank)."""
    family = FAMILIES[cfg.family]
    if cfg.pretrained is not None:
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, dtype=torch.float32)
    else:
        torch.manual_seed(seed)
        model = family.model_class(config)
    if family.conv1d:
        conv1d_to_linear(model)
    return model


def export_pretrained(state: dict[str, torch.Tensor], cfg: ModelConfig, config: PretrainedConfig, out: Path) -> None:
    """Write a full state dict as a Hugging Face model directory loadable by `from_pretrained`."""
    family: Family = FAMILIES[cfg.family]
    with torch.device("meta"):
        model = family.model_class(config)
    model.load_state_dict(linear_to_conv1d_state(state, family), assign=True, strict=True)
    model.tie_weights()
    model.save_pretrained(out)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (masks and other frozen state excluded), tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
