"""The parallel layer: what the trainer, the mask store and checkpoints may ask of a sharding backend.

A backend knows layouts, not methods or masks. It gives this rank's `piece` of a parameter
(the fp32 master values its optimizer updates, flat, with their offset in the full tensor),
the rows of a parameter this rank stores at rest (`stored_rows`), the full tensor and a way
to write one back (`full_tensor`, `set_full`), which pieces each optimizer tensor holds
(`optimizer_layout`), whole-group neighbourhoods of flat pieces (`whole_groups`) and global
sums; it runs the backward, the clipped optimizer step (calling the step's `UpdateHook` on
reduced gradients) and exposes its sharded state to checkpoints (`sharded_state` for torch
DCP here; flat pieces under DeepSpeed, parallel/zero.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from sparsedist.config.schema import ParallelConfig
from sparsedist.errors import CheckpointError
from sparsedist.parallel.runtime import Runtime

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Piece:
    """This rank's share of a parameter's fp32 master values: what its optimizer updates."""

    weight: torch.Tensor
    """1-D writable view."""
    grad: torch.Tensor | None
    """1-D writable view of the reduced (and clipped) gradient, while one exists."""
    start: int
    """Offset of weight[0] in the flattened full parameter."""

    @property
    def stop(self) -> int:
        return self.start + self.weight.numel()

    def __len__(self) -> int:
        return self.weight.numel()


OptimizerLayout = list[tuple[torch.Tensor, list[tuple[nn.Parameter, int]]]]
"""Per tensor the optimizer updates: the model parameters whose pieces it holds, at which offsets."""

class SavedState(Protocol):
    """A piece checkpoint as backends read it (checkpoint/pieces.py)."""

    optimizer_step: int
    moment_keys: list[str]
    """Optimizer state keys saved per parameter (`name@key`)."""

    def full(self, name: str, numel: int) -> torch.Tensor:
        """The full flat tensor saved under `name`."""


class UpdateHook(Protocol):
    """What a backend calls on reduced, clipped gradients, right before their update."""

    def update(self, step: int, tensors: list[torch.Tensor]) -> None:
        """`tensors` of the optimizer are about to be updated in optimizer step `step`: once per step with
        every tensor, or (DeepSpeed) once per parameter group. No collectives."""


def global_grad_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm of all gradients accumulated in float64, as DeepSpeed ZeRO-3 does it: per-tensor norms of the
    local values in float64, their squares summed (over the ranks of the mesh for sharded DTensor gradients)."""
    def squares(tensors: list[torch.Tensor]) -> torch.Tensor:
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]).square().sum()

    sharded = [g for g in grads if isinstance(g, DTensor)]
    total = squares([g.to_local() for g in sharded])
    if sharded:
        dist.all_reduce(total, group=sharded[0].device_mesh.get_group())
    return total.add_(squares([g for g in grads if not isinstance(g, DTensor)])).sqrt_()


class ParallelBackend:
    """One process, no sharding: the reference every sharded backend must agree with."""

    stores_own_pieces = True
    """Whether each rank stores at rest exactly the elements its optimizer pieces hold (False where the
    model copy is replicated and the master values partitioned: ZeRO-1/2)."""
    checkpoint_format = "dcp"
    """How checkpoint/ saves this backend's state: torch DCP (`sharded_state`) or flat `pieces`."""
    gathers_parameters = False
    """Whether a parameter is whole on a rank only while gathered for its forward or backward (FSDP2,
    ZeRO-3): then nothing derived from a whole weight may be kept beyond that use."""

    def __init__(self, cfg: ParallelConfig, runtime: Runtime):
        self.cfg = cfg
        self.runtime = runtime
        self.optimizer: torch.optim.Optimizer | None = None

    def wrap(self, model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
        """Place the model for training (or, frozen, for inference as a teacher)."""
        model.to(self.runtime.device)
        return model

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer | None
                ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Bind the wrapped model and its optimizer (DeepSpeed builds its engine here)."""
        self.optimizer = optimizer
        return model, optimizer

    def module(self, model: nn.Module) -> nn.Module:
        """The model's own module (the engine's, under DeepSpeed)."""
        return model

    def autocast(self) -> torch.autocast:
        """Compute-dtype context of the forward pass."""
        dtype = _DTYPES[self.cfg.mixed_precision]
        return torch.autocast(self.runtime.device.type, dtype=dtype, enabled=dtype != torch.float32)

    # --- layout ----------------------------------------------------------------------------

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a parameter or gradient: a view of whole rows, writable in place."""
        return tensor

    def full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        """The whole parameter on every rank (a collective on sharded backends: call it on all ranks)."""
        return param

    def row_range(self, param: torch.Tensor) -> tuple[int, int]:
        """[start, stop) of this rank's rows of `param` in the full tensor."""
        return 0, param.shape[0]

    def stored_numel(self, param: torch.Tensor) -> int:
        """Elements of `param` this rank holds at rest (memory accounting)."""
        return self.local(param).numel()

    def stored_rows(self, param: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The rows of a 2-D parameter this rank stores at rest (a writable 2-D view) and the index of the
        first; where `partition_size` cuts parameters flat, a row is one rank's partition."""
        return self.local(param), self.row_range(param)[0]

    def partition_size(self, numel: int) -> int | None:
        """Elements per rank of a parameter of `numel` elements where the backend stores parameters as flat
        partitions (ZeRO-3); None where it stores whole rows."""
        return None

    def piece(self, param: torch.Tensor) -> Piece:
        """This rank's master values of `param` (its local rows, flattened)."""
        weight = self.local(param)
        grad = None if param.grad is None else self.local(param.grad).view(-1)
        start = self.row_range(param)[0] * (param.numel() // max(1, param.shape[0]))
        return Piece(weight.view(-1), grad, start)

    def whole_groups(self, params: list[torch.Tensor], m: int) -> list[tuple[Piece, torch.Tensor]]:
        """Per parameter, this rank's piece and its values extended to whole groups of `m` (from the
        piece's start rounded down to its stop rounded up); all ranks call. Whole rows are whole groups."""
        out = []
        for param in params:
            piece = self.piece(param)
            if piece.start % m or piece.stop % m:
                raise RuntimeError(f"a piece [{piece.start}, {piece.stop}) cuts groups of {m}")
            out.append((piece, piece.weight))
        return out

    def optimizer_layout(self) -> OptimizerLayout:
        """The tensors the prepared optimizer updates; here each parameter is its own."""
        return [(p, [(p, 0)]) for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def set_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Write this rank's share of `param` (master and model copies) from its full value (all ranks call)."""
        start, stop = self.row_range(param)
        self.local(param).copy_(value.reshape(param.shape)[start:stop])

    # --- collectives -----------------------------------------------------------------------

    def all_finite(self, model: nn.Module) -> bool:
        """Whether every trainable value of the model, on every rank, is finite (all ranks call)."""
        bad = torch.zeros((), dtype=torch.float64, device=self.runtime.device)
        for p in model.parameters():
            if p.requires_grad:
                bad += (~torch.isfinite(self.piece(p).weight)).sum()
        return float(self.sum_over_ranks(bad)) == 0  # one read-back, not one per parameter

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums of `values` over all ranks (float64)."""
        if self.runtime.world_size == 1:
            return list(values)
        return self.sum_over_ranks(torch.tensor(values, dtype=torch.float64, device=self.runtime.device)).tolist()

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (on this rank's device) summed over all ranks, in place; nothing is read back to the host,
        so the sum can wait on the device until a logging step reads it (all ranks call)."""
        if self.runtime.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    # --- the step --------------------------------------------------------------------------

    def backward(self, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; gradients are reduced across ranks after the `last` one."""
        loss.backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None, step: int,
             hook: UpdateHook) -> float:
        """Clip to `max_norm` (when given), call `hook.update`, step and zero the gradients; with a
        non-finite global norm (a NaN or Inf anywhere) skip the update. Returns the norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = global_grad_norm([p.grad for p in params], self.runtime.device)
        value = float(norm)  # the step's one read-back: it decides the skip (NaN or Inf anywhere ⇔ in the norm)
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            return value
        if max_norm is not None:  # DeepSpeed's coefficient 1 / max(1, (norm + 1e-6) / max_norm), in float64
            scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0).reciprocal()  # on the device, from the tensor
            torch._foreach_mul_([self.local(p.grad) for p in params], scale)
        hook.update(step, [p for group in optimizer.param_groups for p in group["params"]])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    def after_eval(self, model: nn.Module) -> None:
        """Return the model to its training layout after forward-only calls."""

    # --- state -----------------------------------------------------------------------------

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model on the CPU, parameters in their stored layout; on a sharded backend only rank 0
        receives it (others: {})."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Model (and optimizer) state as torch DCP saves and loads it in place: sharded, reshardable."""
        if optimizer is None:
            return {"model": get_model_state_dict(model)}
        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                           state: dict[str, Any]) -> None:
        """Apply a `sharded_state` that DCP has filled."""
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    @torch.no_grad()
    def load_pieces(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, saved: SavedState,
                    skip: set[str]) -> None:
        """Set every parameter and persistent buffer not in `skip` from the full values a piece checkpoint
        holds (all ranks call); the optimizer's state from it where the backend saves pieces."""
        if optimizer is not None:
            raise CheckpointError(f"checkpoint.resume: a piece checkpoint (DeepSpeed) resumes training under "
                                  f"parallel.backend deepspeed only, not {self.cfg.backend}")
        module = self.module(model)
        for name, param in module.named_parameters():
            if name not in skip:
                value = saved.full(name, numel(param))
                self.set_full(param, value.to(torch.float32 if param.requires_grad else param.dtype))
        for name, buffer in persistent_buffers(module):
            buffer.copy_(saved.full(name, buffer.numel()).reshape(buffer.shape))


class FSDP2Backend(ParallelBackend):
    """`fully_shard` per transformer block and on the root: every parameter `Shard(0)`, whole rows per rank."""

    gathers_parameters = True

    def __init__(self, cfg: ParallelConfig, runtime: Runtime):
        super().__init__(cfg, runtime)
        self.mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))

    def wrap(self, model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
        model.to(self.runtime.device)
        policy = MixedPrecisionPolicy(param_dtype=_DTYPES[self.cfg.mixed_precision], reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=policy,
                        reshard_after_forward=self.cfg.reshard_after_forward)
        fully_shard(model, mesh=self.mesh, mp_policy=policy, reshard_after_forward=self.cfg.reshard_after_forward)
        return model

    def autocast(self) -> torch.autocast:
        # FSDP2's MixedPrecisionPolicy casts parameters; activations follow them.
        return torch.autocast(self.runtime.device.type, enabled=False)

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, DTensor):
            if tensor.placements != (Shard(0),):
                raise RuntimeError(f"expected a Shard(0) parameter, got placements {tensor.placements}")
            return tensor.to_local()
        return tensor

    def full_tensor(self, param: torch.Tensor) -> torch.Tensor:
        return param.full_tensor() if isinstance(param, DTensor) else param

    def row_range(self, param: torch.Tensor) -> tuple[int, int]:
        rows, world, rank = param.shape[0], self.runtime.world_size, self.runtime.rank
        chunk = -(-rows // world)  # torch.chunk, as FSDP2 shards: ceil-sized pieces, the last ones short
        start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
        if stop - start != self.local(param).shape[0]:
            local_rows = self.local(param).shape[0]
            raise RuntimeError(f"rows [{start}, {stop}) do not match the local shard of {local_rows} rows")
        return start, stop

    def backward(self, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
        assert isinstance(model, FSDPModule)
        model.set_requires_gradient_sync(last)
        loss.backward()

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)

    def after_eval(self, model: nn.Module) -> None:
        assert isinstance(model, FSDPModule)
        model.reshard()


def persistent_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers a state dict holds (not, e.g., rotary frequencies)."""
    return [(f"{prefix}.{name}" if prefix else name, buffer)
            for prefix, owner in module.named_modules() for name, buffer in owner.named_buffers(recurse=False)
            if name not in owner._non_persistent_buffers_set]


def numel(param: torch.Tensor) -> int:
    """Elements of the full parameter (ZeRO-3 leaves an empty tensor in the module)."""
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()
