"""Checks of a recipe against the model it describes, without weights, data or processes.

The model is built on the meta device from the pretrained directory's config.json, or, while that directory
does not exist yet, from the architecture the recipe states in `model.config`. `validate` and `plan` may run
before the weights, tokenizer, data or teacher are downloaded: `deferred` names what they could not check.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from sparsedist.config.schema import Recipe
from sparsedist.data import check_source, missing_sources
from sparsedist.errors import RecipeError
from sparsedist.models import count_parameters, model_config
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity.methods import SparsityMethod
from sparsedist.student import converted_model


def check_recipe(recipe: Recipe, defer: bool = False) -> dict[str, int]:
    """Build the model on the meta device and check it against the data and sparsity sections.

    Returns a summary (parameters, sparse parameters, tokens per step, total tokens).
    With `defer`, inputs that do not exist yet (see `deferred`) are not checked.
    Raises RecipeError naming the key at fault.
    """
    model, method = meta_model(recipe)
    check_inputs(recipe, model.config, skip={key for key, _, _ in deferred(recipe)} if defer else set())
    tokens_per_step = recipe.train.global_batch * recipe.data.seq_len
    return {
        "params": count_parameters(model),
        "sparse_params": sum(layer.weight.numel() for layer in method.layers.values()),
        "world_size": recipe.parallel.world_size,
        "tokens_per_step": tokens_per_step,
        "total_tokens": tokens_per_step * recipe.train.steps,
    }


def deferred(recipe: Recipe) -> list[tuple[str, Path | str, str]]:
    """The inputs of the recipe that do not exist yet, as (key, path, the check that waits for it)."""
    out = []
    pretrained, data, teacher = recipe.model.pretrained, recipe.data, recipe.distill.teacher.path
    if pretrained is not None and not pretrained.exists():
        out.append(("model.pretrained", pretrained, "the weights' config.json against model.config"))
    if data.tokenizer is not None and not data.tokenizer.exists():
        out.append(("data.tokenizer", data.tokenizer, "the tokenizer"))
    out += [(key, source, f"the data source ({key})") for key, source, _ in missing_sources(data)]
    if recipe.distill.weight > 0 and teacher != "self" and not teacher.exists():
        out.append(("distill.teacher.path", teacher, "the teacher's vocabulary"))
    return out


def deferred_line(recipe: Recipe) -> str | None:
    """One line naming the checks `deferred` holds back, or None."""
    items = deferred(recipe)
    if not items:
        return None
    paths = list(dict.fromkeys(str(path) for _, path, _ in items))
    verb = "exists" if len(paths) == 1 else "exist"
    return f"deferred until {' and '.join(paths)} {verb}: {', '.join(check for _, _, check in items)}"


def check_inputs(recipe: Recipe, config: PretrainedConfig, skip: set[str] = frozenset()) -> None:
    """The files the run will read exist and fit: weights, data source, teacher (same vocabulary), resume folder.

    Keys in `skip` (inputs not downloaded yet) are left out.
    """
    pretrained = recipe.model.pretrained
    if pretrained is not None and "model.pretrained" not in skip and not (pretrained / "config.json").is_file():
        raise RecipeError(f"model.pretrained: {pretrained} holds no config.json")
    check_source(recipe.data, skip)
    teacher = recipe.distill.teacher.path
    if recipe.distill.weight > 0 and teacher != "self" and "distill.teacher.path" not in skip:
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
    """The recipe's model on the meta device, converted by its sparsity method (no weights, no data): the
    student's own assembly (student.py). While model.pretrained does not exist, the architecture comes from
    model.config."""
    config = model_config(recipe.model, recipe.data.vocab_size, recipe.data.seq_len, eos_id=0, allow_absent=True)
    backend = ParallelBackend(recipe.parallel, Runtime(0, 1, 0, torch.device("cpu")))
    try:  # whole groups, and the method's own conditions (scale segments, SLoRB blocks...) raise RecipeError
        return converted_model(recipe, config, backend, meta=True)
    except RecipeError:
        raise
    except Exception as err:  # transformers accepts any config value and fails when building
        raise RecipeError(f"model.config: no {recipe.model.family} model can be built from it ({err})") from None


def check_world_size(recipe: Recipe, launched: int) -> None:
    """The recipe's layout matches the processes launched (`WORLD_SIZE`, 1 without a launcher)."""
    if launched != recipe.parallel.world_size:
        raise RecipeError(f"parallel: the recipe expects {recipe.parallel.world_size} processes (nnodes × "
                          f"nproc_per_node) but {launched} were launched; start it with `sparsedist launch`")
