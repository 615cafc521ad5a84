"""Checks of a recipe against the model it describes, without weights, data or processes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from sparsedist.config.load import RecipeError
from sparsedist.config.schema import Recipe
from sparsedist.data import check_source
from sparsedist.models import FAMILIES, ModelConfigError, count_parameters, model_config
from sparsedist.models.families import conv1d_to_linear
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity.methods import SparsityMethod, make_method


def check_recipe(recipe: Recipe) -> dict[str, int]:
    """Build the model on the meta device and check it against the data and sparsity sections.

    Returns a summary (parameters, sparse parameters, tokens per step, total tokens).
    Raises RecipeError naming the key at fault.
    """
    model, method = meta_model(recipe)
    check_inputs(recipe, model.config)
    tokens_per_step = recipe.train.global_batch * recipe.data.seq_len
    return {
        "params": count_parameters(model),
        "sparse_params": sum(layer.weight.numel() for layer in method.layers.values()),
        "world_size": recipe.parallel.world_size,
        "tokens_per_step": tokens_per_step,
        "total_tokens": tokens_per_step * recipe.train.steps,
    }


def check_inputs(recipe: Recipe, config: PretrainedConfig) -> None:
    """The files the run will read exist and fit: data source, teacher (same vocabulary), resume folder."""
    try:
        check_source(recipe.data)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    teacher = recipe.distill.teacher.path
    if recipe.distill.weight > 0 and teacher != "self":
        if not (teacher / "config.json").is_file():
            raise RecipeError(f"distill.teacher.path: {teacher} holds no config.json")
        vocab = AutoConfig.from_pretrained(teacher).vocab_size
        if vocab != config.vocab_size:
            raise RecipeError(f"distill.teacher.path: {teacher} has vocabulary {vocab}, "
                              f"the student {config.vocab_size}")
    resume = recipe.checkpoint.resume
    if isinstance(resume, Path) and not resume.is_dir():
        raise RecipeError(f"checkpoint.resume: {resume} is not a checkpoint folder")


def meta_model(recipe: Recipe) -> tuple[nn.Module, SparsityMethod]:
    """The recipe's model on the meta device, converted by its sparsity method (no weights, no data)."""
    family = FAMILIES[recipe.model.family]
    try:
        config = model_config(recipe.model, recipe.data.vocab_size, recipe.data.seq_len, eos_id=0)
    except ModelConfigError as err:
        raise RecipeError(str(err)) from None
    try:
        with torch.device("meta"):
            model = family.model_class(config)
    except Exception as err:  # transformers accepts any config value and fails when building
        raise RecipeError(f"model.config: no {family.name} model can be built from it ({err})") from None
    if family.conv1d:
        conv1d_to_linear(model)
    try:  # whole groups, and the method's own conditions (scale segments, SLoRB blocks...)
        backend = ParallelBackend(recipe.parallel, Runtime(0, 1, 0, torch.device("cpu")))
        method = make_method(recipe.sparsity, backend, recipe.train.steps, recipe.precision.fp8)
        method.convert(model, family)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    return model, method

