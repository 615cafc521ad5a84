"""The interface every sparsity method implements, and the mask bookkeeping they share."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from sparsedist.config.schema import SparsityConfig
from sparsedist.models.families import Family
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.layer import SparseLinear, WeightTransform
from sparsedist.sparsity.masks import count_flips, count_ones, nm_mask, pack_mask, unpack_mask


def target_linears(model: nn.Module, family: Family, cfg: SparsityConfig) -> list[tuple[str, nn.Linear]]:
    """(full name, linear) of every weight the recipe makes sparse; refuses layers without whole groups."""
    found = []
    for index, block in enumerate(family.blocks(model)):
        for name in family.linears(cfg.targets):
            linear = block.get_submodule(name)
            full_name = f"{family.blocks_path}.{index}.{name}"
            if linear.in_features % cfg.m:
                raise ValueError(
                    f"sparsity.m: {full_name} has {linear.in_features} inputs, not a multiple of {cfg.m}"
                )
            found.append((full_name, linear))
    return found


class SparsityMethod:
    """One N:M training method, as the trainer sees it.

    Life of a run: `convert` (before the parallel wrap: which weights it owns) →
    `init_state` (after the wrap: first masks) → per step `after_backward` (gradients
    reduced and clipped) and `after_step` (optimizer stepped) → `finalize` (the model
    the run delivers). Its state lives in the model as parameters, so checkpoints,
    sharding and resumption carry it with the weights.
    """

    name: ClassVar[str]
    transform: ClassVar[WeightTransform]
    """The weight the forward uses, from the dense weight and the packed mask."""

    def __init__(self, cfg: SparsityConfig, backend: ParallelBackend):
        self.cfg = cfg
        self.backend = backend
        self.layers: dict[str, SparseLinear] = {}
        self.last_flip_rate: float | None = None

    def convert(self, model: nn.Module, family: Family) -> None:
        """Replace the targeted linears of every block by `SparseLinear`s."""
        for name, linear in target_linears(model, family, self.cfg):
            layer = SparseLinear.from_linear(linear, type(self).transform)
            model.set_submodule(name, layer)
            self.layers[name] = layer

    def init_state(self) -> None:
        """First masks, from the (possibly pretrained) weights, after the parallel wrap."""
        self.refresh_masks()
        self.last_flip_rate = None

    def after_backward(self, step: int) -> None:
        """Gradients are reduced across ranks and clipped; the optimizer has not stepped."""

    def after_step(self, step: int) -> None:
        """The optimizer has stepped `step` (0-based)."""
        if (step + 1) % self.cfg.refresh_interval == 0:
            self.refresh_masks()

    @torch.no_grad()
    def finalize(self) -> None:
        """Hard-prune: the delivered weights are exactly N:M sparse."""
        for layer, weight, mask in self.local_pieces():
            weight.mul_(mask)

    def local_pieces(self) -> list[tuple[SparseLinear, torch.Tensor, torch.Tensor]]:
        """(layer, local weight rows, local bool mask rows) for every owned layer."""
        pieces = []
        for layer in self.layers.values():
            weight, bits = self.backend.local(layer.weight), self.backend.local(layer.mask)
            if weight.shape[0] != bits.shape[0]:
                raise RuntimeError(
                    f"mask shard of {weight.shape[0]} weight rows holds {bits.shape[0]} rows: misaligned sharding"
                )
            pieces.append((layer, weight, unpack_mask(bits, layer.in_features)))
        return pieces

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Recompute every mask from its weight, on the local rows, and record the global flip rate."""
        flips = elements = 0
        for layer in self.layers.values():
            weight, bits = self.backend.local(layer.weight), self.backend.local(layer.mask)
            new_bits = pack_mask(nm_mask(weight, self.cfg.n, self.cfg.m))
            flips += count_flips(bits, new_bits)
            elements += weight.numel()
            bits.copy_(new_bits)
        flips, elements = self.backend.all_reduce_sum([flips, elements])
        self.last_flip_rate = flips / elements if elements else 0.0

    def metrics(self) -> dict[str, float]:
        """Globally reduced statistics: flip rate of the latest refresh and the masks' sparsity."""
        if not self.layers:
            return {}
        kept = sum(count_ones(self.backend.local(layer.mask)) for layer in self.layers.values())
        total = sum(self.backend.local(layer.weight).numel() for layer in self.layers.values())
        kept, total = self.backend.all_reduce_sum([kept, total])
        out = {"sparsity": 1.0 - kept / total}
        if self.last_flip_rate is not None:
            out["flip_rate"] = self.last_flip_rate
        return out
