"""The model a run trains, assembled one way for preflight, training, export and benchmarks: built from
the recipe, one-shot pruned if asked, converted by its sparsity method, wrapped by its backend, bound to
its optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from sparsedist.config import Recipe
from sparsedist.config.schema import OptimConfig
from sparsedist.models import FAMILIES, Family, build_model, count_parameters
from sparsedist.models.families import conv1d_to_linear
from sparsedist.oneshot import calibration_batches, prune_oneshot
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity import SparsityMethod, make_method
from sparsedist.sparsity.methods.base import target_linears


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

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole model on the CPU with masks in weight rows, on rank 0 (others: {}; all ranks call)."""
        return self.method.store.weight_rows(self.method.backend.full_state_dict(self.model))


def converted_model(recipe: Recipe, config: PretrainedConfig, backend: ParallelBackend, meta: bool = False
                    ) -> tuple[nn.Module, SparsityMethod]:
    """The recipe's model converted by its method, not yet wrapped: its pretrained or seeded fp32 weights,
    one-shot pruned if the recipe asks; or, with `meta`, its shapes only (no weights, no data)."""
    family = FAMILIES[recipe.model.family]
    if meta:
        with torch.device("meta"):
            model = family.model_class(config)
        if family.conv1d:
            conv1d_to_linear(model)
    else:
        model = build_model(recipe.model, config, recipe.train.seed)
        if recipe.sparsity.oneshot != "none":
            prune_before_training(model, family, recipe)
    method = make_method(recipe.sparsity, backend, recipe.train.steps, recipe.precision.fp8)
    method.convert(model, family)
    return model, method


def prune_before_training(model: nn.Module, family: Family, recipe: Recipe) -> None:
    """One-shot prune the full model (every rank alike; each keeps its own rows once sharded)."""
    cfg = recipe.sparsity
    calibration = calibration_batches(recipe.data.parts[0].dir / "train", recipe.data.seq_len,
                                      cfg.calibration_sequences, batch_size=8, seed=recipe.train.seed)
    prune_oneshot(model, family, target_linears(model, family, cfg), cfg.oneshot, calibration, cfg.n, cfg.m)


def param_groups(model: nn.Module, cfg: OptimConfig, no_decay: set[int]) -> list[dict]:
    """The optimizer's parameter groups: matrices decay; biases, norm scales and `no_decay` ids do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in trainable if p.dim() >= 2 and id(p) not in no_decay]
    plain = [p for p in trainable if p.dim() < 2 or id(p) in no_decay]
    return [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_student(recipe: Recipe, backend: ParallelBackend, config: PretrainedConfig, train: bool = True) -> Student:
    """`converted_model`, wrapped, with the method's optimizer (when `train`), both prepared, and the first
    masks (the one-shot masks, when the weights were pruned)."""
    family = FAMILIES[recipe.model.family]
    model, method = converted_model(recipe, config, backend)
    if recipe.parallel.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    num_params = count_parameters(model)
    model = backend.wrap(model, family.blocks(model))
    optimizer = None
    if train:
        optimizer = method.make_optimizer(param_groups(model, recipe.optim, method.no_decay_parameters()),
                                          recipe.optim)
    model, optimizer = backend.prepare(model, optimizer)
    method.start(train)
    return Student(model, method, family, config, num_params, optimizer)
