"""The interface every sparsity method implements: its lifecycle, its step phases and its math.

A method owns its layers' masks through a `MaskStore` (sparsity/store.py) and calls the
store, which calls the backend's layout primitives; nothing calls back up. The trainer
drives a run through these moments, each given the 0-based optimizer step it belongs to:

    convert(model, family)       before the parallel wrap: which weights it owns, what it adds
    start(training)              after the optimizer is prepared: first masks, method state
    per optimizer step s:
      begin(s)                   before the step's forward passes (collectives allowed)
      update(s, tensors)         reduced, clipped gradients of optimizer tensors, right before
                                 their update (no collectives: DeepSpeed calls it per group)
      end(s)                     after the update (collectives allowed): refresh on schedule
    finalize()                   the model the run delivers
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn

from sparsedist.config.schema import OptimConfig
from sparsedist.config.sparsity import SparsityConfig
from sparsedist.errors import RecipeError
from sparsedist.models.families import Family
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.layer import SparseLinear, dense_weight
from sparsedist.sparsity.masks import nm_mask
from sparsedist.sparsity.product import Product
from sparsedist.sparsity.store import MaskStore


def target_linears(model: nn.Module, family: Family, cfg: SparsityConfig) -> list[tuple[str, nn.Linear]]:
    """(full name, linear) of every weight the recipe makes sparse; refuses layers without whole groups."""
    found = []
    for index, block in enumerate(family.blocks(model)):
        for name in family.linears(cfg.targets):
            linear = block.get_submodule(name)
            full_name = f"{family.blocks_path}.{index}.{name}"
            if linear.in_features % cfg.m:
                raise RecipeError(
                    f"sparsity.m: {full_name} has {linear.in_features} inputs, not a multiple of {cfg.m}"
                )
            found.append((full_name, linear))
    return found


class SparsityMethod:
    """One N:M training method, as the trainer sees it (the moments are in the module docstring).

    Its state lives in the model as parameters and persistent buffers (masks included), so
    checkpoints, sharding and resumption carry it with the weights. A method sees parameters
    through the backend only: full tensors (`full_tensor`, `set_full`) for rare whole-tensor
    work, and masks through its store.
    """

    config: ClassVar[type[BaseModel]]
    """Its recipe section (sparsedist/config/sparsity.py); the registry pairs them (methods/__init__.py)."""
    delivers_sparse: bool = True
    """Whether `finalize` leaves every owned weight exactly N:M (the export verifies it)."""
    group_local: bool = True
    """Whether `decide` may run on any set of whole N:M groups (as [groups, m]); False for 4×4 blocks."""
    transform = staticmethod(dense_weight)
    """The weight the forward uses, from the layer (dense weight, packed mask, extra state)."""
    delivered_transform: ClassVar[Callable[[SparseLinear], torch.Tensor] | None] = None
    """The forward weight of the model the run would deliver now, where the training forward differs
    from it (CAST trains dense); validation during training uses it (`delivered`)."""

    def __init__(self, cfg: SparsityConfig, backend: ParallelBackend, total_steps: int, fp8: bool = False):
        self.cfg = cfg
        self.backend = backend
        self.total_steps = total_steps
        self.fp8 = fp8
        self.store = MaskStore(backend, cfg.m)

    @property
    def layers(self) -> dict[str, SparseLinear]:
        """The sparse layers it owns, by full name."""
        return self.store.layers

    # --- lifecycle -----------------------------------------------------------------------

    def convert(self, model: nn.Module, family: Family) -> None:
        """Replace the targeted linears of every block by `SparseLinear`s with their product and state."""
        for name, linear in target_linears(model, family, self.cfg):
            layer = SparseLinear.from_linear(linear, type(self).transform, self.product_for(name, linear, family),
                                             self.store.mask_row(linear),
                                             keep_weight_forms=not self.backend.gathers_parameters)
            self.extend(layer)
            model.set_submodule(name, layer)
            self.store.add(name, layer)

    def start(self, training: bool = True) -> None:
        """First masks, from the (possibly pretrained) weights, once the model is wrapped and (when `training`)
        its optimizer prepared: then the masks are aligned with the optimizer's tensors."""
        if training:
            self.store.align()
        self.refresh()
        self.store.forget_flips()

    @torch.no_grad()
    def finalize(self) -> None:
        """Hard-prune: the delivered weights are exactly N:M sparse."""
        for layer in self.layers.values():
            weight = self.backend.full_tensor(layer.weight)
            self.backend.set_full(layer.weight, weight * self.store.full(layer))

    @contextmanager
    def delivered(self) -> Iterator[None]:
        """Within it, the layers forward with the weight the run would deliver now (for validation)."""
        if self.delivered_transform is None:
            yield
            return
        trained = {name: layer.transform for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.transform = type(self).delivered_transform
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                layer.transform = trained[name]

    def host_state(self) -> dict[str, Any]:
        """Values the method decided during the run that its checkpoint must keep (JSON; the same on every rank)."""
        return {}

    def load_host_state(self, state: dict[str, Any]) -> None:
        """Restore what `host_state` returned."""

    def metrics(self) -> dict[str, float]:
        """Global mask statistics (all ranks call)."""
        return self.store.statistics()

    # --- the step ------------------------------------------------------------------------

    def begin(self, step: int) -> None:
        """Optimizer step `step` is about to run its forward passes."""

    def update(self, step: int, tensors: list[torch.Tensor]) -> None:
        """`tensors` of the optimizer have reduced, clipped gradients and are about to be updated."""

    def end(self, step: int) -> None:
        """The optimizer has updated in step `step`: refresh masks on schedule."""
        if (step + 1) % self.cfg.refresh_interval == 0:
            self.refresh()

    def refresh(self) -> None:
        """Recompute every mask with `decide` (all ranks call)."""
        self.store.refresh(self.decide, self.group_local)

    # --- what a method may customise -----------------------------------------------------

    def product(self) -> Product:
        """The product of its layers (weight-gradient estimator, mask shape), before the recipe's kernel and FP8."""
        return Product()

    def product_for(self, name: str, linear: nn.Linear, family: Family) -> Product:
        """The product of one converted layer: the method's, with the recipe's `sparsity.kernel` and
        `precision.fp8` on the FFN layers (a layer smaller than `kernel_min_features` keeps the masked
        dense product)."""
        product = self.product()
        if not re.search(family.ffn_pattern, name):
            return product
        kernel = getattr(self.cfg, "kernel", "masked_dense") == "semi_structured"  # methods with an N:M forward
        return Product(semi_structured=kernel, transposable=product.transposable, mvue=product.mvue,
                       fp8=self.fp8).sized(linear.in_features, linear.out_features,
                                           getattr(self.cfg, "kernel_min_features", 0))

    def extend(self, layer: SparseLinear) -> None:
        """Add method state to a freshly converted layer (before sharding)."""

    def decide(self, weight: torch.Tensor) -> torch.Tensor:
        """The bool mask of whole groups or rows of a weight (N:M magnitude by default)."""
        return nm_mask(weight, self.cfg.n, self.cfg.m)

    def no_decay_parameters(self) -> set[int]:
        """ids of matrices the optimizer's weight decay must not touch (e.g. learnable scales)."""
        return set()

    def make_optimizer(self, groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
        """AdamW on fp32 master weights; AST and CAST bring their own."""
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
