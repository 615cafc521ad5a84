"""Building a model from a recipe: from sizes in the recipe or from a local pretrained directory."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from sparsedist.config.schema import ModelConfig
from sparsedist.errors import ModelConfigError
from sparsedist.models.families import (
    FAMILIES,
    Family,
    conv1d_to_linear,
    fuse_gated_activations,
    linear_to_conv1d_state,
)


def model_config(cfg: ModelConfig, vocab_size: int, seq_len: int, eos_id: int,
                 allow_absent: bool = False) -> PretrainedConfig:
    """The transformers config of the recipe's model, checked against the tokenizer and sequence length.

    A pretrained directory's config.json wins and must agree with every size model.config states; with
    `allow_absent` (preflight), a pretrained directory that does not exist yet is described by model.config.
    """
    family = FAMILIES[cfg.family]
    _check_keys(cfg)
    special = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    if cfg.pretrained is not None and (cfg.pretrained.exists() or not allow_absent or not cfg.config):
        if not (cfg.pretrained / "config.json").is_file():
            hint = "" if cfg.pretrained.exists() or not allow_absent else (
                " (state its architecture in model.config to check the recipe before downloading it)")
            raise ModelConfigError(f"model.pretrained: {cfg.pretrained} holds no config.json{hint}")
        config = AutoConfig.from_pretrained(cfg.pretrained)
        if config.model_type != family.name:
            raise ModelConfigError(
                f"model.family: {family.name!r} but {cfg.pretrained} is a {config.model_type!r} model"
            )
        for key, value in cfg.config.items():
            if getattr(config, key) != value:
                raise ModelConfigError(f"model.config.{key}: {value!r}, but {cfg.pretrained}/config.json has "
                                       f"{getattr(config, key)!r}")
    elif cfg.pretrained is not None:  # the published architecture, stated in the recipe
        config = _config_from(family, {**special, "vocab_size": vocab_size, **cfg.config})
    else:
        given_vocab = cfg.config.get("vocab_size", vocab_size)
        if given_vocab != vocab_size:
            raise ModelConfigError(
                f"model.config.vocab_size: {given_vocab} differs from the tokenizer's ({vocab_size}); leave it out"
            )
        config = _config_from(family, {**special, **cfg.config, "vocab_size": vocab_size})
    if config.vocab_size < vocab_size:
        raise ModelConfigError(
            f"model.pretrained: vocabulary {config.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    context = getattr(config, family.context_key)
    if context < seq_len:
        raise ModelConfigError(f"data.seq_len: {seq_len} exceeds the model's {family.context_key} ({context})")
    return config


def _check_keys(cfg: ModelConfig) -> None:
    defaults = FAMILIES[cfg.family].config_class()
    for key in cfg.config:
        if not hasattr(defaults, key):
            raise ModelConfigError(f"model.config.{key}: not a {type(defaults).__name__} setting")


def _config_from(family: Family, values: dict) -> PretrainedConfig:
    try:
        return family.config_class(**values)
    except Exception as err:  # transformers validates its configs with errors of several types
        raise ModelConfigError(f"model.config: {' '.join(str(err).split())}") from None


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
    fuse_gated_activations(model)
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
