"""The model a run trains: built from the recipe, converted by its sparsity method, wrapped by its
backend, bound to its optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from sparsedist.config import Recipe
from sparsedist.models import FAMILIES, Family, build_model, count_parameters, model_config
from sparsedist.oneshot import calibration_batches, prune_oneshot
from sparsedist.parallel import ParallelBackend
from sparsedist.sparsity import SparsityMethod, make_method
from sparsedist.sparsity.methods.base import target_linears
from sparsedist.train.optim import param_groups


@dataclass
class Student:
    model: nn.Module
    """Wrapped by the backend (sharded under FSDP2, an engine under DeepSpeed)."""
    method: SparsityMethod
    family: Family
    config: PretrainedConfig
    num_params: int
    """Trainable parameters of the unwrapped model."""
    optimizer: torch.optim.Optimizer | None


def prune_before_training(model: nn.Module, family: Family, recipe: Recipe) -> None:
    """One-shot prune the full model (every rank alike; each keeps its own rows once sharded)."""
    cfg = recipe.sparsity
    calibration = calibration_batches(recipe.data.dir / "train", recipe.data.seq_len, cfg.calibration_sequences,
                                      batch_size=8, seed=recipe.train.seed)
    prune_oneshot(model, family, target_linears(model, family, cfg), cfg.oneshot, calibration, cfg.n, cfg.m)


def build_student(recipe: Recipe, backend: ParallelBackend, tokenizer: PreTrainedTokenizerFast,
                  train: bool = True) -> Student:
    """Build (pretrained or seeded), prune one-shot if asked, convert the targeted linears, wrap,
    make the method's optimizer (when `train`), prepare both, and compute the first masks (the
    one-shot masks, when the weights were pruned)."""
    family = FAMILIES[recipe.model.family]
    config = model_config(recipe.model, len(tokenizer), recipe.data.seq_len, tokenizer.eos_token_id)
    model = build_model(recipe.model, config, recipe.train.seed)
    if recipe.sparsity.oneshot != "none":
        prune_before_training(model, family, recipe)
    method = make_method(recipe.sparsity, backend, recipe.train.steps, recipe.precision.fp8)
    method.convert(model, family)
    if recipe.parallel.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    num_params = count_parameters(model)
    model = backend.wrap(model, family.blocks(model))
    optimizer = None
    if train:
        optimizer = method.make_optimizer(param_groups(model, recipe.optim, method.no_decay_parameters()),
                                          recipe.optim)
    model, optimizer = backend.prepare(model, optimizer)
    method.init_state()
    return Student(model, method, family, config, num_params, optimizer)
