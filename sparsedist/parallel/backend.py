"""The parallel layer: what the trainer and the sparsity methods may ask of a sharding backend.

A method never branches on the backend. It asks for this rank's `piece` of a parameter
(the fp32 master values its optimizer updates, flat, with their offset in the full
tensor), for the full tensor and to write one back (`full_tensor`, `set_full`), for
global sums, and leaves wrapping, backward, clipping, the optimizer step and state to
the backend. Masks are stored like their weight: a method reads and writes the mask of
a piece (`mask_range`, `set_mask_piece`) without a collective, and where each rank holds
the mask bits of exactly its own pieces (`local_masks`) it decides masks of whole N:M
groups locally (`whole_groups` supplies the few neighbouring values a flat cut needs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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

from sparsedist.config.schema import ParallelConfig, Recipe
from sparsedist.parallel.runtime import Runtime

if TYPE_CHECKING:
    from sparsedist.sparsity.layer import SparseLinear

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


from sparsedist.errors import NonFiniteError, RecipeError  # noqa: E402, F401


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


OptimizerLayout = list[tuple[torch.Tensor, list[tuple[nn.Parameter, int]]]]
"""Per tensor the optimizer updates: the model parameters whose pieces it holds, at which offsets."""

UpdateHook = Callable[[list[torch.Tensor], bool], None]
"""Called with optimizer tensors whose gradients are reduced and clipped, right before their
update; the flag is True on the first call of a step. A backend calls it once per step with
every tensor, or (DeepSpeed) once per parameter group."""


class ParallelBackend:
    """One process, no sharding: the reference every sharded backend must agree with."""

    local_masks = True
    """Each rank stores the mask bits of exactly its pieces, and sets them without a collective."""

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

    def autocast(self) -> torch.autocast:
        """Compute-dtype context of the forward pass."""
        dtype = _DTYPES[self.cfg.mixed_precision]
        return torch.autocast(self.runtime.device.type, dtype=dtype, enabled=dtype != torch.float32)

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

    # --- masks -----------------------------------------------------------------------------

    def mask_row(self, linear: nn.Linear) -> int:
        """Elements per packed row of the mask of `linear`'s weight: its rows, sharded with them."""
        return linear.in_features

    def mask_bits(self, layer: SparseLinear) -> tuple[torch.Tensor, int]:
        """The packed mask rows this rank holds for `layer`, and the flat index of their first element."""
        return self.local(layer.mask), self.row_range(layer.mask)[0] * layer.mask_row

    def mask_range(self, layer: SparseLinear, piece: Piece, lo: int = 0, hi: int | None = None,
                   dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """Flat mask (bool, or 0/1 in `dtype`) of elements [lo, hi) of `piece` of the layer's weight (no
        collective)."""
        bits, origin = self.mask_bits(layer)
        hi = piece.weight.numel() if hi is None else hi
        mask = layer.unpack_bits(bits, piece.start - origin + lo, piece.start - origin + hi, dtype)
        if mask.numel() != hi - lo:
            raise RuntimeError(f"the mask bits held here cover {mask.numel()} of the {hi - lo} weights "
                               f"[{piece.start + lo}, {piece.start + hi}) of a piece: misaligned sharding")
        return mask

    @torch.no_grad()
    def set_mask_piece(self, layer: SparseLinear, piece: Piece, mask: torch.Tensor) -> torch.Tensor:
        """Store the flat bool mask of `piece` (where `local_masks`; no collective); returns how many of
        its bits changed (a 0-d tensor, counted on the packed bits: no synchronisation)."""
        bits, origin = self.mask_bits(layer)
        if not self.local_masks or origin != piece.start:
            raise RuntimeError("this backend does not store masks by piece: set the full mask")
        return layer.repack_bits(bits, mask)

    def full_mask(self, layer: SparseLinear) -> torch.Tensor:
        """The [out, in] bool mask on every rank (a collective on sharded backends)."""
        return layer.dense_mask(self.full_tensor(layer.mask))

    def set_full_mask(self, layer: SparseLinear, mask: torch.Tensor) -> None:
        """Store this rank's share of a full [out, in] bool mask (all ranks call)."""
        self.set_full(layer.mask, layer.pack(mask))

    def optimizer_layout(self) -> OptimizerLayout:
        """The tensors the prepared optimizer updates; here each parameter is its own."""
        return [(p, [(p, 0)]) for group in self.optimizer.param_groups for p in group["params"]]

    @torch.no_grad()
    def set_full(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Write this rank's share of `param` (master and model copies) from its full value (all ranks call)."""
        start, stop = self.row_range(param)
        self.local(param).copy_(value[start:stop])

    def all_finite(self, model: nn.Module) -> bool:
        """Whether every trainable value of the model, on every rank, is finite (all ranks call)."""
        bad = sum(int((~torch.isfinite(self.piece(p).weight)).sum()) for p in model.parameters() if p.requires_grad)
        return self.all_reduce_sum([float(bad)])[0] == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums of `values` over all ranks (float64)."""
        if self.runtime.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.runtime.device)
        dist.all_reduce(t)
        return t.tolist()

    def backward(self, model: nn.Module, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; gradients are reduced across ranks after the `last` one."""
        loss.backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float | None,
             update_hook: UpdateHook) -> float:
        """Clip to `max_norm` (when given), call `update_hook`, step and zero the gradients; with a
        non-finite global norm (a NaN or Inf anywhere) skip the update. Returns the norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            optimizer.zero_grad(set_to_none=True)
            return float(norm)
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        update_hook([p for group in optimizer.param_groups for p in group["params"]], True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model on the CPU; on a sharded backend only rank 0 receives it (others: {})."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def after_eval(self, model: nn.Module) -> None:
        """Return the model to its training layout after forward-only calls."""

    def save_state(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write model and optimizer state under `path` (torch DCP: sharded, reshardable)."""
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)

    def load_state(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Restore what `save_state` wrote, at this world size; without an optimizer, the model only.
        An optimizer with an `init_state()` creates its state there, instead of by DCP's zero step."""
        if optimizer is None:
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(model, state["model"])
            return
        if hasattr(optimizer, "init_state"):
            optimizer.init_state()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class FSDP2Backend(ParallelBackend):
    """`fully_shard` per transformer block and on the root: every parameter `Shard(0)`, whole rows per rank."""

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


def make_backend(recipe: Recipe, runtime: Runtime) -> ParallelBackend:
    """The backend the recipe names, checked against the launched world size."""
    cfg = recipe.parallel
    if runtime.world_size != cfg.world_size:
        raise RecipeError(
            f"parallel: the recipe expects {cfg.world_size} processes (nnodes × nproc_per_node) "
            f"but {runtime.world_size} were launched"
        )
    if cfg.backend == "deepspeed":
        from sparsedist.parallel.zero import ZeroBackend  # imports deepspeed: only when asked for

        return ZeroBackend(recipe, runtime)
    return FSDP2Backend(cfg, runtime) if cfg.backend == "fsdp2" else ParallelBackend(cfg, runtime)
