"""The interface every sparsity method implements, and the mask bookkeeping they share."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from sparsedist.config.schema import OptimConfig
from sparsedist.config.sparsity import SparsityConfig
from sparsedist.models.families import Family
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.layer import Gemm, SparseLinear, dense_weight
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

    Life of a run: `convert` (before the parallel wrap: which weights it owns, and any
    parameters it adds) → `init_state` (after the wrap: first masks) → per step
    `before_step`, `after_backward` (gradients reduced and clipped, optimizer not stepped) and
    `after_step` (optimizer stepped) → `finalize` (the model the run delivers). Its
    state lives in the model as parameters and persistent buffers, so checkpoints,
    sharding and resumption carry it with the weights.
    """

    name: ClassVar[str]
    delivers_sparse: bool = True
    """Whether `finalize` leaves every owned weight exactly N:M (the export verifies it)."""
    transform = staticmethod(dense_weight)
    """The weight the forward uses, from the layer (dense weight, packed mask, extra state)."""

    def __init__(self, cfg: SparsityConfig, backend: ParallelBackend, total_steps: int):
        self.cfg = cfg
        self.backend = backend
        self.total_steps = total_steps
        self.layers: dict[str, SparseLinear] = {}
        self.last_flip_rate: float | None = None

    # --- the moments of a run ------------------------------------------------------------

    def convert(self, model: nn.Module, family: Family) -> None:
        """Replace the targeted linears of every block by `SparseLinear`s."""
        for name, linear in target_linears(model, family, self.cfg):
            layer = SparseLinear.from_linear(linear, type(self).transform, self.gemm())
            self.extend(layer)
            model.set_submodule(name, layer)
            self.layers[name] = layer

    def init_state(self) -> None:
        """First masks, from the (possibly pretrained) weights, after the parallel wrap."""
        self.refresh_masks()
        self.last_flip_rate = None

    def before_step(self, step: int) -> None:
        """Optimizer step `step` (0-based) is about to run its forward passes."""

    def after_backward(self, step: int) -> None:
        """Gradients are reduced across ranks and clipped; the optimizer has not stepped."""

    def after_step(self, step: int) -> None:
        """The optimizer has stepped `step` (0-based): refresh masks on schedule."""
        if (step + 1) % self.cfg.refresh_interval == 0:
            self.refresh_masks()

    @torch.no_grad()
    def finalize(self) -> None:
        """Hard-prune: the delivered weights are exactly N:M sparse."""
        for _, weight, mask in self.local_pieces():
            weight.mul_(mask)

    # --- what a method may customise -----------------------------------------------------

    def gemm(self) -> Gemm:
        """The product of the sparse layers."""
        return F.linear

    def extend(self, layer: SparseLinear) -> None:
        """Add method state to a freshly converted layer (before sharding)."""

    def local_masks(self, layer: SparseLinear) -> torch.Tensor:
        """New packed mask bits for this rank's rows of `layer`."""
        return pack_mask(nm_mask(self.backend.local(layer.weight), self.cfg.n, self.cfg.m))

    def no_decay_parameters(self) -> set[int]:
        """ids of matrices the optimizer's weight decay must not touch (e.g. learnable scales)."""
        return set()

    def make_optimizer(self, groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
        """AdamW on fp32 master weights; AST and CAST bring their own."""
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    # --- shared bookkeeping --------------------------------------------------------------

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
        """Recompute every mask on this rank's rows and record the global flip rate."""
        flips = elements = 0
        for layer in self.layers.values():
            bits = self.backend.local(layer.mask)
            new_bits = self.local_masks(layer)
            flips += count_flips(bits, new_bits)
            elements += self.backend.local(layer.weight).numel()
            bits.copy_(new_bits)
        flips, elements = self.backend.all_reduce_sum([flips, elements])
        self.last_flip_rate = flips / elements if elements else 0.0

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Global statistics: masks' sparsity, flip rate of the latest refresh, and the share of
        weight norm² still on pruned positions (how far the dense weights are from their 2:4 prune)."""
        if not self.layers:
            return {}
        kept = total = pruned_sq = all_sq = 0.0
        for layer, weight, mask in self.local_pieces():
            kept += count_ones(self.backend.local(layer.mask))
            total += weight.numel()
            sq = weight.double().square()
            pruned_sq += float(sq[~mask].sum())
            all_sq += float(sq.sum())
        kept, total, pruned_sq, all_sq = self.backend.all_reduce_sum([kept, total, pruned_sq, all_sq])
        out = {"sparsity": 1.0 - kept / total, "pruned_weight_share": pruned_sq / all_sq if all_sq else 0.0}
        if self.last_flip_rate is not None:
            out["flip_rate"] = self.last_flip_rate
        return out
