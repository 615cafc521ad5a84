"""DeepSpeed ZeRO-1/2/3 as backends: the engine, and the flat pieces the optimizer updates.

ZeRO flattens every optimizer parameter group into one fp32 buffer and gives each rank a
contiguous slice of it (stages 1 and 2: `ReplicatedZero`, the model copy stays whole on
every rank), or cuts every parameter into flat partitions (stage 3: `PartitionedZero`). A
rank's piece of a weight is therefore a flat range that may cut rows and 2:4 groups.

The optimizer is the run's own torch optimizer (AdamW, or MomentAdam for AST/CAST);
DeepSpeed steps it on the flat fp32 pieces. A pre-step hook on it hands the step's
`UpdateHook` the reduced, clipped gradients of each group before its update.

Checkpoints are DeepSpeed-independent (checkpoint/pieces.py): every rank gives the pieces it
owns (fp32 master, optimizer moments, partitioned frozen parameters) with their offsets, and
loading sets each rank's new pieces from the full values, so a run resumes at any world size
and any ZeRO stage.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from sparsedist.config.load import deep_merge
from sparsedist.config.schema import Recipe
from sparsedist.errors import NonFiniteError
from sparsedist.parallel.backend import (
    OptimizerLayout,
    ParallelBackend,
    Piece,
    SavedState,
    UpdateHook,
    numel,
    persistent_buffers,
)
from sparsedist.parallel.runtime import Runtime

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402  (after DS_ACCELERATOR)
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

Pieces = dict[str, tuple[int, torch.Tensor]]
"""name -> (offset in the flattened full tensor, this rank's flat values)."""


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
    return deep_merge(config, p.deepspeed_overrides)


def make_zero_backend(recipe: Recipe, runtime: Runtime) -> ZeroBackend:
    """ZeRO at the stage the recipe (or its DeepSpeed JSON) names."""
    config = deepspeed_config(recipe)
    cls = PartitionedZero if config["zero_optimization"]["stage"] == 3 else ReplicatedZero
    return cls(recipe, runtime, config)


class ZeroBackend(ParallelBackend):
    """What every ZeRO stage shares: the engine (built in `prepare`), its step, and piece checkpoints."""

    checkpoint_format = "pieces"

    def __init__(self, recipe: Recipe, runtime: Runtime, config: dict[str, Any]):
        super().__init__(recipe.parallel, runtime)
        self.config = config
        self.engine: Any = None
        self._step: tuple[int, UpdateHook] | None = None
        self._updates = 0

    def prepare(self, model, optimizer):
        if optimizer is None:
            raise ValueError("parallel.backend: deepspeed trains with an optimizer; nothing to prepare")
        engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                                            dist_init_required=False)
        optimizer.register_step_pre_hook(self._pre_step)
        self.engine = engine
        return engine, zero_optimizer

    def module(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, deepspeed.DeepSpeedEngine) else model

    def autocast(self) -> torch.autocast:
        # The engine holds the parameters in the compute dtype; activations follow them.
        return torch.autocast(self.runtime.device.type, enabled=False)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    # --- the step --------------------------------------------------------------------------

    def backward(self, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
        model.backward(loss, scale_wrt_gas=False)
        if not last:
            model.step()  # counts the micro-batch; reduces and updates only at the boundary

    def step(self, model, optimizer, max_norm, step, hook):
        if not model.is_gradient_accumulation_boundary():
            raise RuntimeError("deepspeed: the step does not end a gradient accumulation cycle "
                               "(train.global_batch, micro_batch and world size disagree with the engine)")
        self._step, self._updates = (step, hook), 0
        model.step()
        self._step = None
        if not self._updates:
            raise RuntimeError("deepspeed skipped the optimizer step (non-finite gradients)")
        norm = float(model.get_global_grad_norm())
        if not math.isfinite(norm):  # DeepSpeed has stepped already: nothing to skip, the run must stop
            raise NonFiniteError(f"non-finite gradient norm ({norm}) under DeepSpeed, which cannot skip the step")
        return norm

    def _pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        """DeepSpeed steps one group at a time, each right after its gradients were prepared and clipped."""
        if self._step is not None:
            step, hook = self._step
            hook.update(step, [p for group in optimizer.param_groups for p in group["params"]])
            self._updates += 1

    # --- state -----------------------------------------------------------------------------

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        module = self.module(model)
        state = {name: self.full_tensor(p).cpu() for name, p in module.named_parameters()}
        state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
        state.update({name: b.detach().cpu() for name, b in persistent_buffers(module)})
        return state if self.runtime.is_main else {}

    def state_pieces(self, model: nn.Module, optimizer: torch.optim.Optimizer, skip: set[str]) -> Pieces:
        """The pieces this rank owns of every parameter not in `skip`, of their optimizer moments
        (`name@key`) and (rank 0) of replicated frozen parameters and persistent buffers."""
        module = self.module(model)
        pieces: Pieces = {}
        states = self._optimizer_states(optimizer)
        for name, param in module.named_parameters():
            if name in skip:
                continue
            if param.requires_grad:
                piece = self.piece(param)
                pieces[name] = (piece.start, piece.weight.clone())
                for key, tensor in states.get(id(param), {}).items():
                    pieces[f"{name}@{key}"] = (piece.start, tensor.clone())
            elif hasattr(param, "ds_tensor"):
                start, held = self._partition(param)
                pieces[name] = (start, param.ds_tensor.narrow(0, 0, held).clone())
            elif self.runtime.is_main:
                pieces[name] = (0, param.detach().reshape(-1).clone())
        if self.runtime.is_main:
            pieces.update({name: (0, b.detach().reshape(-1).clone()) for name, b in persistent_buffers(module)})
        return pieces

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> int:
        """How many updates the optimizer has made (saved beside the pieces)."""
        steps = {int(s["step"]) for s in optimizer.optimizer.state.values() if "step" in s}
        return max(steps, default=0)

    @torch.no_grad()
    def load_pieces(self, model, optimizer, saved: SavedState, skip: set[str]) -> None:
        super().load_pieces(model, None, saved, skip)
        if optimizer is None:
            return
        for flat, _ in self.optimizer_layout():  # the moments exist from the first step on; create them
            state = optimizer.optimizer.state[flat]
            state["step"] = torch.tensor(float(saved.optimizer_step))
            for key in saved.moment_keys:
                state.setdefault(key, torch.zeros_like(flat))
        states = self._optimizer_states(optimizer)
        for name, param in self.module(model).named_parameters():
            if param.requires_grad:
                piece = self.piece(param)
                for key, tensor in states.get(id(param), {}).items():
                    tensor.copy_(saved.full(f"{name}@{key}", numel(param))[piece.start:piece.stop])

    def _optimizer_states(self, optimizer: torch.optim.Optimizer) -> dict[int, dict[str, torch.Tensor]]:
        """Per trainable parameter: views of this rank's moments, by state key."""
        basic = optimizer.optimizer
        out: dict[int, dict[str, torch.Tensor]] = {}
        for flat, members in self.optimizer_layout():
            state = basic.state.get(flat, {})
            for param, offset in members:
                held = self.piece(param).weight.numel()
                out[id(param)] = {key: value.narrow(0, offset, held) for key, value in state.items()
                                  if torch.is_tensor(value) and value.shape == flat.shape}
        return out

    def _partition(self, param: torch.Tensor) -> tuple[int, int]:
        """(start in the flattened parameter, real elements) of this rank's ZeRO-3 partition (the last
        ranks' partitions are padded)."""
        size = param.ds_tensor.numel()
        start = self.runtime.rank * size
        return start, max(0, min(size, param.ds_numel - start))


class ReplicatedZero(ZeroBackend):
    """ZeRO-1/2: the fp32 master values and optimizer state partitioned flat, the model copy whole."""

    stores_own_pieces = False

    def piece(self, param: torch.Tensor) -> Piece:
        mapping = param._hp_mapping
        if mapping is None:  # no element of this parameter in this rank's partition
            return Piece(torch.empty(0, device=self.runtime.device), None, 0)
        flat = self.engine.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
        offset, held = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
        grad = None if flat.grad is None else flat.grad.narrow(0, offset, held)
        return Piece(flat.narrow(0, offset, held), grad, mapping.lp_fragment_address.start)

    def optimizer_layout(self) -> OptimizerLayout:
        zero = self.engine.optimizer
        return [(flat, [(p, p._hp_mapping.hp_fragment_address.start) for p in params if p._hp_mapping is not None])
                for flat, params in zip(zero.single_partition_of_fp32_groups, zero.bit16_groups, strict=True)]

    def full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        if param.requires_grad and self.engine is not None:
            return safe_get_full_fp32_param(param)
        return param.detach().clone()

    @torch.no_grad()
    def set_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        if param.requires_grad:  # the fp32 master piece
            piece = self.piece(param)
            piece.weight.copy_(value.reshape(-1)[piece.start:piece.stop])
        param.data.copy_(value.reshape(param.shape))


class PartitionedZero(ZeroBackend):
    """ZeRO-3: every parameter cut into flat partitions of ceil(numel / world) elements, rank q holding
    [q·size, (q+1)·size); gathered for the forward and freed after."""

    gathers_parameters = True

    def wrap(self, model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
        """Students are placed here and become an engine in `prepare`; a frozen teacher becomes an engine
        of its own, without an optimizer, that partitions it."""
        model.to(self.runtime.device)
        if any(p.requires_grad for p in model.parameters()):
            return model
        config = {k: v for k, v in self.config.items() if k != "zero_allow_untested_optimizer"}
        config["zero_optimization"] = {k: v for k, v in config["zero_optimization"].items()
                                       if k != "offload_optimizer"}
        engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
        return engine

    def stored_numel(self, param: torch.Tensor) -> int:
        return self._partition(param)[1] if hasattr(param, "ds_tensor") else param.numel()

    def stored_rows(self, param: torch.Tensor) -> tuple[torch.Tensor, int]:
        return param.ds_tensor.view(1, -1), self.runtime.rank

    def partition_size(self, numel: int) -> int:
        return -(-numel // self.runtime.world_size)  # DeepSpeed's partition size, the last ones padded

    def piece(self, param: torch.Tensor) -> Piece:
        zero = self.engine.optimizer
        group, offset, _ = zero.grad_position[zero.get_param_id(param)]
        start, held = self._partition(param)
        flat = zero.fp32_partitioned_groups_flat[group]
        grad = None if flat.grad is None else flat.grad.narrow(0, offset, held)
        return Piece(flat.narrow(0, offset, held), grad, start)

    def optimizer_layout(self) -> OptimizerLayout:
        zero = self.engine.optimizer
        return [(flat, [(p, zero.grad_position[zero.get_param_id(p)][1]) for p in params])
                for flat, params in zip(zero.fp32_partitioned_groups_flat, zero.fp16_groups, strict=True)]

    def whole_groups(self, params: list[torch.Tensor], m: int) -> list[tuple[Piece, torch.Tensor]]:
        """One all-gather of every piece's first and last m−1 values gives each rank the values of the
        groups its partition boundaries cut."""
        if self.runtime.world_size == 1:
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

    def full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        if param.requires_grad and self.engine is not None:
            return safe_get_full_fp32_param(param)
        with deepspeed.zero.GatheredParameters([param]):  # a frozen, partitioned parameter: gather a copy
            return param.detach().clone()

    @torch.no_grad()
    def set_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        flat = value.reshape(-1)
        if param.requires_grad:  # the fp32 master piece
            piece = self.piece(param)
            piece.weight.copy_(flat[piece.start:piece.stop])
        start, held = self._partition(param)  # the model's own partition
        param.ds_tensor.narrow(0, 0, held).copy_(flat.narrow(0, start, held))


def _held(gathered: list[torch.Tensor], i: int, j: int, size: int, total: int) -> torch.Tensor:
    """Element j of parameter i from the edges every rank sent (`whole_groups`): ranks hold `size`
    elements each (the last ones fewer), their first and last m−1 (right-aligned) were sent."""
    owner, pos = divmod(j, size)
    halo = gathered[owner].shape[-1]
    held = min(size, total - owner * size)
    return gathered[owner][i, 0, pos] if pos < halo else gathered[owner][i, 1, pos - held + halo]
