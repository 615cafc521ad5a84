"""The parallel layer: what the trainer and the sparsity methods may ask of a sharding backend.

A method never branches on the backend. It asks for the local piece of a parameter
(whole rows, see `local`), for global sums, and leaves wrapping, gradient sync,
clipping and state dicts to the backend.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from sparsedist.config.schema import ParallelConfig
from sparsedist.parallel.runtime import Runtime

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ParallelBackend:
    """One process, no sharding: the reference every sharded backend must agree with."""

    def __init__(self, cfg: ParallelConfig, runtime: Runtime):
        self.cfg = cfg
        self.runtime = runtime

    def wrap(self, model: nn.Module, blocks: nn.ModuleList) -> nn.Module:
        """Place the model for training (or, frozen, for inference as a teacher)."""
        model.to(self.runtime.device)
        return model

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

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums of `values` over all ranks (float64)."""
        return list(values)

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        """Skip (False) or perform (True) the gradient reduction of the next backward."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        """Global gradient norm before clipping; clip to `max_norm` when given."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model on the CPU; on a sharded backend only rank 0 receives it (others: {})."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def after_eval(self, model: nn.Module) -> None:
        """Return the model to its training layout after forward-only calls."""


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

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.runtime.device)
        dist.all_reduce(t)
        return t.tolist()

    def set_gradient_sync(self, model: nn.Module, enabled: bool) -> None:
        assert isinstance(model, FSDPModule)
        model.set_requires_gradient_sync(enabled)

    def clip_grad_norm(self, model: nn.Module, max_norm: float | None) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options)

    def after_eval(self, model: nn.Module) -> None:
        assert isinstance(model, FSDPModule)
        model.reshard()


def make_backend(cfg: ParallelConfig, runtime: Runtime) -> ParallelBackend:
    """The backend the recipe names, checked against the launched world size."""
    if runtime.world_size != cfg.world_size:
        raise RuntimeError(
            f"parallel: the recipe expects {cfg.world_size} processes (nnodes × nproc_per_node) "
            f"but {runtime.world_size} were launched"
        )
    return FSDP2Backend(cfg, runtime) if cfg.backend == "fsdp2" else ParallelBackend(cfg, runtime)
