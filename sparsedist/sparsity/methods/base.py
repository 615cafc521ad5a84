"""The interface every sparsity method implements, and the mask bookkeeping they share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn

from sparsedist.config.schema import OptimConfig
from sparsedist.config.sparsity import SparsityConfig
from sparsedist.models.families import Family
from sparsedist.parallel.backend import ParallelBackend, Piece
from sparsedist.sparsity.layer import SparseLinear, dense_weight
from sparsedist.sparsity.masks import nm_mask
from sparsedist.sparsity.product import Product, use_fp8, use_kernel


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
    parameters it adds) → `init_state` (after the optimizer is prepared: first masks) →
    per step `before_step`, `before_update` (gradients reduced and clipped, right before
    the optimizer updates; see `after_backward` and `gradient_term`) and `after_step` →
    `finalize` (the model the run delivers). Its state lives in the model as parameters
    and persistent buffers, so checkpoints, sharding and resumption carry it with the weights.

    A method sees parameters through the backend only: full tensors (`full_tensor`,
    `set_full`, collectives) for rare whole-tensor work, and this rank's flat `piece`s for
    per-step element-wise work, with the mask of the same range (`backend.mask_range`).
    """

    name: ClassVar[str]
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
        self.layers: dict[str, SparseLinear] = {}
        self.last_flip_rate: float | None = None
        self._update_masks: dict[int, list[tuple[int, SparseLinear, Piece]]] = {}

    # --- the moments of a run ------------------------------------------------------------

    def convert(self, model: nn.Module, family: Family) -> None:
        """Replace the targeted linears of every block by `SparseLinear`s; give the FFN ones the
        recipe's kernel and precision."""
        for name, linear in target_linears(model, family, self.cfg):
            layer = SparseLinear.from_linear(linear, type(self).transform, self.product(),
                                             self.backend.mask_row(linear))
            self.extend(layer)
            model.set_submodule(name, layer)
            self.layers[name] = layer
        if getattr(self.cfg, "kernel", "masked_dense") == "semi_structured":  # methods with an N:M forward
            use_kernel(model, family.ffn_pattern, "semi_structured", self.cfg.kernel_min_features)
        if self.fp8:
            use_fp8(model, family.ffn_pattern)

    def init_state(self) -> None:
        """First masks, from the (possibly pretrained) weights, once the optimizer is prepared."""
        self.refresh_masks()
        self.last_flip_rate = None

    def before_step(self, step: int) -> None:
        """Optimizer step `step` (0-based) is about to run its forward passes."""

    def before_update(self, step: int, tensors: list[torch.Tensor], first: bool) -> None:
        """`tensors` of the optimizer have reduced, clipped gradients and are about to be updated;
        `first` marks the first call of the step (all ranks, in the same order)."""
        if first:
            self.after_backward(step)
            if self.masks_in_update(step):
                self.prepare_update_masks()
        for tensor in tensors:
            self.gradient_term(step, tensor)

    def after_backward(self, step: int) -> None:
        """Once per step, before any update: whole-step work (collectives allowed)."""

    def gradient_term(self, step: int, tensor: torch.Tensor) -> None:
        """Add a term to the gradient of one optimizer tensor (after reduction and clipping)."""

    def masks_in_update(self, step: int) -> bool:
        """Whether this step's update needs masks aligned with the optimizer's tensors."""
        return False

    def after_step(self, step: int) -> None:
        """The optimizer has stepped `step` (0-based): refresh masks on schedule."""
        self._update_masks = {}
        if (step + 1) % self.cfg.refresh_interval == 0:
            self.refresh_masks()

    @torch.no_grad()
    def finalize(self) -> None:
        """Hard-prune: the delivered weights are exactly N:M sparse."""
        for layer in self.layers.values():
            weight = self.backend.full_tensor(layer.weight)
            self.backend.set_full(layer.weight, weight * self.backend.full_mask(layer))

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

    # --- what a method may customise -----------------------------------------------------

    def product(self) -> Product:
        """The product a converted layer starts with (its weight-gradient estimator, its mask's shape)."""
        return Product()

    def extend(self, layer: SparseLinear) -> None:
        """Add method state to a freshly converted layer (before sharding)."""

    def decide(self, weight: torch.Tensor) -> torch.Tensor:
        """The bool mask of whole rows of a weight (N:M magnitude by default)."""
        return nm_mask(weight, self.cfg.n, self.cfg.m)

    def no_decay_parameters(self) -> set[int]:
        """ids of matrices the optimizer's weight decay must not touch (e.g. learnable scales)."""
        return set()

    def make_optimizer(self, groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
        """AdamW on fp32 master weights; AST and CAST bring their own."""
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)

    # --- shared bookkeeping --------------------------------------------------------------

    def local_pieces(self) -> list[tuple[SparseLinear, Piece, torch.Tensor]]:
        """(layer, this rank's weight piece, its flat bool mask) for every owned layer (no collective)."""
        out = []
        for layer in self.layers.values():
            piece = self.backend.piece(layer.weight)
            out.append((layer, piece, self.backend.mask_range(layer, piece)))
        return out

    def prepare_update_masks(self) -> None:
        """Record, per optimizer tensor, which sparse weight pieces it holds and where. Every tensor gets
        an entry (possibly empty): one without is an error in `update_mask`, never a dense update."""
        layers = {id(layer.weight): layer for layer in self.layers.values()}
        self._update_masks = {}
        for tensor, members in self.backend.optimizer_layout():  # pieces without gradients: they outlive the step
            self._update_masks[id(tensor)] = [(offset, layers[id(param)], replace(self.backend.piece(param), grad=None))
                                              for param, offset in members if id(param) in layers]

    def update_mask(self, tensor: torch.Tensor, part: slice, dtype: torch.dtype = torch.bool) -> torch.Tensor | None:
        """The mask (bool, or 0/1 in `dtype`) of elements `part` of an optimizer tensor's local flat values,
        for this step's update (None: no sparse weight there). Unpacked per call into a fresh tensor the
        caller may overwrite, so it costs no more than `part`; elements of no sparse weight count as kept."""
        try:
            members = self._update_masks[id(tensor)]
        except KeyError:
            raise RuntimeError("an optimizer tensor has no mask aligned with it: masks_in_update was not "
                               "prepared for this step, or the optimizer holds a tensor the backend did not "
                               "report") from None
        lo, hi = part.start, min(part.stop, self.backend.local(tensor).numel())
        mask = None
        for offset, layer, piece in members:
            first, last = max(lo, offset), min(hi, offset + piece.weight.numel())
            if (first, last) == (lo, hi):  # one piece covers the whole part
                return self.backend.mask_range(layer, piece, first - offset, last - offset, dtype)
            if first < last:
                if mask is None:
                    mask = torch.ones(hi - lo, dtype=dtype, device=piece.weight.device)
                mask[first - lo: last - lo] = self.backend.mask_range(layer, piece, first - offset, last - offset,
                                                                      dtype)
        return mask

    @torch.no_grad()
    def refresh_masks(self) -> None:
        """Recompute every mask and record the global flip rate. Decisions on whole N:M groups run on
        this rank's pieces where the backend stores masks by piece; others (4×4 blocks, replicated
        masks) on the gathered weight, alike on every rank."""
        flips = elements = 0
        layers = list(self.layers.values())
        if self.group_local and self.backend.local_masks:
            m = self.cfg.m
            grouped = self.backend.whole_groups([layer.weight for layer in layers], m)
            for layer, (piece, groups) in zip(layers, grouped, strict=True):
                lead = piece.start % m
                new = self.decide(groups.view(-1, m)).view(-1)[lead: lead + piece.weight.numel()]
                flips += self.backend.set_mask_piece(layer, piece, new)  # one device sync, below
                elements += new.numel()
        else:
            for layer in layers:
                old = self.backend.full_mask(layer)
                new = self.decide(self.backend.full_tensor(layer.weight))
                if self.backend.runtime.is_main:  # the same full tensors on every rank: count once
                    flips += int((old != new).sum())
                    elements += new.numel()
                self.backend.set_full_mask(layer, new)
        flips, elements = self.backend.all_reduce_sum([int(flips), elements])
        self.last_flip_rate = flips / elements if elements else 0.0

    @torch.no_grad()
    def metrics(self) -> dict[str, float]:
        """Global statistics: masks' sparsity, flip rate of the latest refresh, and the share of
        weight norm² still on pruned positions (how far the dense weights are from their 2:4 prune)."""
        if not self.layers:
            return {}
        kept = total = pruned_sq = all_sq = 0.0
        for _, piece, mask in self.local_pieces():
            kept += float(mask.sum())
            total += mask.numel()
            sq = piece.weight.double().square()
            pruned_sq += float(sq[~mask].sum())
            all_sq += float(sq.sum())
        kept, total, pruned_sq, all_sq = self.backend.all_reduce_sum([kept, total, pruned_sq, all_sq])
        out = {"sparsity": 1.0 - kept / total, "pruned_weight_share": pruned_sq / all_sq if all_sq else 0.0}
        if self.last_flip_rate is not None:
            out["flip_rate"] = self.last_flip_rate
        return out
