"""DeepSpeed ZeRO-1/2/3 as a backend: the engine, and the flat pieces methods work on.

ZeRO flattens every optimizer parameter group into one fp32 buffer and gives each rank
a contiguous slice of it (stages 1 and 2), or cuts every parameter into flat slices
(stage 3). A rank's piece of a weight is therefore a flat range that may cut rows and
2:4 groups. A mask is stored like its weight:
- stages 1 and 2 replicate it (as they do the weight); masks are decided on the gathered
  fp32 weight and set whole on every rank;
- stage 3 packs it in one row per partition of the weight (`mask_row` = the partition
  size), so DeepSpeed's partition of the mask holds exactly the bits of the rank's
  partition of the weight and is gathered with it for the forward. Masks of whole 2:4
  groups are decided on the rank's own fp32 piece, completed to whole groups by the few
  values its neighbours hold (`whole_groups`, one small all-gather per refresh): no
  per-step gather of a weight or a mask.

The optimizer is the run's own torch optimizer (AdamW, or MomentAdam for AST/CAST);
DeepSpeed steps it on the flat fp32 pieces. A pre-step hook on it gives the method the
reduced, clipped gradients of each group before its update.

Checkpoints are DeepSpeed-independent: every rank writes the pieces it owns (fp32
master, optimizer moments, partitioned frozen parameters) with their offsets, and
loading assembles each rank's new pieces from them, so a run resumes at any world size
and any ZeRO stage.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsedist.checkpoint.pieces import Pieces, assemble, assemble_mask, read_pieces, write_pieces
from sparsedist.config.schema import Recipe
from sparsedist.parallel.backend import NonFiniteError, OptimizerLayout, ParallelBackend, Piece, UpdateHook
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity.layer import SparseLinear, sparse_layers
from sparsedist.sparsity.masks import pack_mask, packed_width

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402  (after DS_ACCELERATOR)
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402


def deepspeed_config(recipe: Recipe) -> dict[str, Any]:
    """The DeepSpeed configuration of a recipe, with `parallel.deepspeed_config` merged over it."""
    p, t = recipe.parallel, recipe.train
    zero: dict[str, Any] = {"stage": p.zero_stage, "stage3_param_persistence_threshold": 0}
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // (t.micro_batch * p.world_size),
        "gradient_clipping": recipe.optim.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": p.mixed_precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    if p.deepspeed_config is not None:
        _merge(config, json.loads(p.deepspeed_config.read_text()))
    return config


def _merge(base: dict[str, Any], override: dict[str, Any]) -> None:
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


class ZeroBackend(ParallelBackend):
    """ZeRO at `parallel.zero_stage` through a DeepSpeed engine (built in `prepare`)."""

    def __init__(self, recipe: Recipe, runtime: Runtime):
        super().__init__(recipe.parallel, runtime)
        self.config = deepspeed_config(recipe)
        self.stage = self.config["zero_optimization"]["stage"]
        self.local_masks = self.stage == 3
        self.engine: Any = None
        self._hook: UpdateHook | None = None
        self._first = False

    # --- placement -----------------------------------------------------------------------

    def wrap(self, model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
        """Students are placed here and become an engine in `prepare`; a frozen teacher under ZeRO-3
        becomes an engine of its own, without an optimizer, that partitions it."""
        model.to(self.runtime.device)
        if self.stage < 3 or any(p.requires_grad for p in model.parameters()):
            return model
        config = {k: v for k, v in self.config.items() if k != "zero_allow_untested_optimizer"}
        config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items()
                                       if k != "offload_optimizer"}
        engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
        return engine

    def prepare(self, model, optimizer):
        if optimizer is None:
            raise ValueError("parallel.backend: deepspeed trains with an optimizer; nothing to prepare")
        engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                            dist_init_required=False)
        optimizer.register_step_pre_hook(self._pre_step)
        self.engine = engine
        if self.stage == 3:
            self._check_mask_partitions(engine.module)
        return engine, zero_optimizer

    def _check_mask_partitions(self, module: nn.Module) -> None:
        for name, layer in sparse_layers(module):
            weight, mask = layer.weight.ds_tensor.numel(), layer.mask.ds_tensor.numel()
            if weight != layer.mask_row or mask != packed_width(layer.mask_row):
                raise RuntimeError(f"{name}: ZeRO-3 partitions of {weight} weights and {mask} mask bytes do "
                                   f"not match the mask layout of {layer.mask_row} bits per rank (is "
                                   "stage3_param_persistence_threshold overridden?)")

    @staticmethod
    def _module(model: nn.Module) -> nn.Module:
        """The engine's own module."""
        return model.module if isinstance(model, deepspeed.DeepSpeedEngine) else model

    def autocast(self) -> torch.autocast:
        # The engine holds the parameters in the compute dtype; activations follow them.
        return torch.autocast(self.runtime.device.type, enabled=False)

    # --- pieces ----------------------------------------------------------------------------

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def stored_numel(self, param: torch.Tensor) -> int:
        return self._partition(param)[1] if hasattr(param, "ds_tensor") else param.numel()

    def piece(self, param: torch.Tensor) -> Piece:
        zero = self.engine.optimizer
        if self.stage == 3:
            group, offset, _ = zero.grad_position[zero.get_param_id(param)]
            start, numel = self._partition(param)
            flat = zero.fp32_partitioned_groups_flat[group]
        else:
            mapping = param._hp_mapping
            if mapping is None:  # no element of this parameter in this rank's partition
                return Piece(torch.empty(0, device=self.runtime.device), None, 0)
            flat = zero.single_partition_of_fp32_groups[mapping.param_group_index]
            offset, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
            start = mapping.lp_fragment_address.start
        grad = None if flat.grad is None else flat.grad.narrow(0, offset, numel)
        return Piece(flat.narrow(0, offset, numel), grad, start)

    def mask_row(self, linear: nn.Linear) -> int:
        """Stage 3: one packed row per partition of the weight (DeepSpeed's ceil(numel / world))."""
        if self.stage < 3:
            return linear.in_features
        return -(-linear.weight.numel() // self.runtime.world_size)

    def mask_bits(self, layer: SparseLinear) -> tuple[torch.Tensor, int]:
        if self.stage < 3:
            return layer.mask, 0  # replicated, whole
        return layer.mask.ds_tensor.view(1, -1), self.runtime.rank * layer.mask_row

    def whole_groups(self, params: list[torch.Tensor], m: int) -> list[tuple[Piece, torch.Tensor]]:
        """Stage 3: one all-gather of every piece's first and last m−1 values gives each rank the
        values of the groups its partition boundaries cut (rank q holds [q·size, (q+1)·size))."""
        if self.stage < 3 or self.runtime.world_size == 1:
            return super().whole_groups(params, m)
        pieces = [self.piece(param) for param in params]
        halo = m - 1
        edges = torch.zeros(len(pieces), 2, halo, dtype=torch.float32, device=self.runtime.device)
        for i, piece in enumerate(pieces):
            head, tail = piece.weight[:halo], piece.weight[-halo:]
            edges[i, 0, :head.numel()] = head
            edges[i, 1, halo - tail.numel():] = tail
        gathered = [torch.empty_like(edges) for _ in range(self.runtime.world_size)]
        torch.distributed.all_gather(gathered, edges)
        out = []
        for i, (param, piece) in enumerate(zip(params, pieces, strict=True)):
            if not piece.weight.numel():  # a rank past the end of a small parameter
                out.append((piece, piece.weight))
                continue
            size, total = param.ds_tensor.numel(), param.ds_numel
            left = range(piece.start - piece.start % m, piece.start)
            right = range(piece.stop, -(-piece.stop // m) * m)
            values = [_held(gathered, i, j, size, total) for j in left]
            values += [piece.weight] + [_held(gathered, i, j, size, total) for j in right]
            out.append((piece, torch.cat([v.view(-1) for v in values])))
        return out

    def optimizer_layout(self) -> OptimizerLayout:
        zero = self.engine.optimizer
        if self.stage == 3:
            return [(flat, [(p, zero.grad_position[zero.get_param_id(p)][1]) for p in params])
                    for flat, params in zip(zero.fp32_partitioned_groups_flat, zero.fp16_groups, strict=True)]
        return [(flat, [(p, p._hp_mapping.hp_fragment_address.start) for p in params if p._hp_mapping is not None])
                for flat, params in zip(zero.single_partition_of_fp32_groups, zero.bit16_groups, strict=True)]

    def full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        if param.requires_grad and self.engine is not None:
            return safe_get_full_fp32_param(param)
        if hasattr(param, "ds_tensor"):  # a frozen, partitioned parameter (ZeRO-3): gather a copy
            with deepspeed.zero.GatheredParameters([param]):
                return param.detach().clone()
        return param.detach().clone()

    @torch.no_grad()
    def set_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        flat = value.reshape(-1)
        if param.requires_grad:  # the fp32 master piece
            piece = self.piece(param)
            piece.weight.copy_(flat[piece.start:piece.stop])
        if hasattr(param, "ds_tensor"):  # the model's own partition (ZeRO-3)
            start, numel = self._partition(param)
            param.ds_tensor.narrow(0, 0, numel).copy_(flat.narrow(0, start, numel))
        else:
            param.data.copy_(value.reshape(param.shape))

    # --- the step --------------------------------------------------------------------------

    def backward(self, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
        model.backward(loss, scale_wrt_gas=False)
        if not last:
            model.step()  # counts the micro-batch; reduces and updates only at the boundary

    def step(self, model, optimizer, max_norm, update_hook):
        if not model.is_gradient_accumulation_boundary():
            raise RuntimeError("deepspeed: the step does not end a gradient accumulation cycle "
                               "(train.global_batch, micro_batch and world size disagree with the engine)")
        self._hook, self._first = update_hook, True
        model.step()
        if self._first:
            raise RuntimeError("deepspeed skipped the optimizer step (non-finite gradients)")
        self._hook = None
        norm = float(model.get_global_grad_norm())
        if not math.isfinite(norm):  # DeepSpeed has stepped already: nothing to skip, the run must stop
            raise NonFiniteError(f"non-finite gradient norm ({norm}) under DeepSpeed, which cannot skip the step")
        return norm

    def _pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """DeepSpeed steps one group at a time, each right after its gradients were prepared and clipped."""
        if self._hook is not None:
            self._hook([p for group in optimizer.param_groups for p in group["params"]], self._first)
            self._first = False

    # --- state -----------------------------------------------------------------------------

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        module = self._module(model)
        state = {name: self.full_tensor(p).cpu() for name, p in module.named_parameters()}
        state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
        for name, layer in sparse_layers(module):  # masks in their usual layout: packed weight rows
            state[f"{name}.mask"] = pack_mask(layer.dense_mask(state[f"{name}.mask"]))
        state.update({name: b.detach().cpu() for name, b in persistent_buffers(module)})
        return state if self.runtime.is_main else {}

    def save_state(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Each rank writes the pieces it owns (checkpoint/pieces.py), so any world size can read them.
        A mask is written as the bool mask of each rank's weight piece (one byte per weight on disk),
        which reads back into any partition."""
        module = self._module(model)
        pieces: dict[str, tuple[int, torch.Tensor]] = {}
        masks = {f"{name}.mask": layer for name, layer in sparse_layers(module)}
        states = self._optimizer_states(optimizer)
        for name, param in module.named_parameters():
            if name in masks:
                piece = self.piece(masks[name].weight)
                pieces[name] = (piece.start, self.mask_range(masks[name], piece))
            elif param.requires_grad:
                piece = self.piece(param)
                pieces[name] = (piece.start, piece.weight.clone())
                for key, tensor in states.get(id(param), {}).items():
                    pieces[f"{name}@{key}"] = (piece.start, tensor.clone())
            elif hasattr(param, "ds_tensor"):
                start, numel = self._partition(param)
                pieces[name] = (start, param.ds_tensor.narrow(0, 0, numel).clone())
            elif self.runtime.is_main:
                pieces[name] = (0, param.detach().reshape(-1).clone())
        if self.runtime.is_main:
            pieces.update({name: (0, b.detach().reshape(-1).clone()) for name, b in persistent_buffers(module)})
        steps = {int(s["step"]) for s in optimizer.optimizer.state.values() if "step" in s}
        write_pieces(path, self.runtime.rank, pieces, {"optimizer_step": max(steps, default=0)})

    @torch.no_grad()
    def load_state(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        saved, files = read_pieces(path)
        module = self._module(model)
        masks = {f"{name}.mask": layer for name, layer in sparse_layers(module)}
        for name, param in module.named_parameters():
            if name in masks:
                self.set_full_mask(masks[name], assemble_mask(saved, name, masks[name]))
            else:
                full = assemble(saved, name, _numel(param))
                self.set_full(param, full.to(torch.float32 if param.requires_grad else param.dtype))
        for name, buffer in persistent_buffers(module):
            buffer.copy_(assemble(saved, name, buffer.numel()).reshape(buffer.shape))
        if optimizer is not None:
            self._load_optimizer(saved, module, optimizer, max(f["optimizer_step"] for f in files))

    def _load_optimizer(self, saved: Pieces, module: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        keys = sorted({name.split("@")[1] for name in saved if "@" in name})
        for flat, _ in self.optimizer_layout():  # the moments exist from the first step on; create them
            state = optimizer.optimizer.state[flat]
            state["step"] = torch.tensor(float(step))
            for key in keys:
                state.setdefault(key, torch.zeros_like(flat))
        states = self._optimizer_states(optimizer)
        for name, param in module.named_parameters():
            if param.requires_grad:
                piece = self.piece(param)
                for key, tensor in states.get(id(param), {}).items():
                    tensor.copy_(assemble(saved, f"{name}@{key}", _numel(param))[piece.start:piece.stop])

    def _optimizer_states(self, optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
        """Per trainable parameter: views of this rank's moments, by state key."""
        basic = optimizer.optimizer
        out: dict[int, dict[str, torch.Tensor]] = {}
        for flat, members in self.optimizer_layout():
            state = basic.state.get(flat, {})
            for param, offset in members:
                numel = self.piece(param).weight.numel()
                out[id(param)] = {key: value.narrow(0, offset, numel) for key, value in state.items()
                                  if torch.is_tensor(value) and value.shape == flat.shape}
        return out

    def _partition(self, param: torch.Tensor) -> tuple[int, int]:
        """(start in the flattened parameter, real elements) of this rank's ZeRO-3 partition (the
        last ranks' partitions are padded)."""
        size = param.ds_tensor.numel()
        start = self.runtime.rank * size
        return start, max(0, min(size, param.ds_numel - start))


def _held(gathered: list[torch.Tensor], i: int, j: int, size: int, total: int) -> torch.Tensor:
    """Element j of parameter i from the edges every rank sent (`whole_groups`): ranks hold `size`
    elements each (the last ones fewer), their first and last m−1 (right-aligned) were sent."""
    owner, pos = divmod(j, size)
    halo = gathered[owner].shape[-1]
    held = min(size, total - owner * size)
    return gathered[owner][i, 0, pos] if pos < halo else gathered[owner][i, 1, pos - held + halo]


def persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers a state dict holds (not, e.g., rotary frequencies)."""
    return [(f"{prefix}.{name}" if prefix else name, buffer)
            for prefix, owner in module.named_modules() for name, buffer in owner.named_buffers(recurse=False)
            if name not in owner._non_persistent_buffers_set]


def _numel(param: torch.Tensor) -> int:
    """Elements of the full parameter (ZeRO-3 leaves an empty tensor in the module)."""
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()
