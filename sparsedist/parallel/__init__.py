"""The parallel layer: process group, and the backends that shard a model (none, FSDP2; DeepSpeed ZeRO in
zero.py, imported only when a recipe asks for it)."""

from sparsedist.parallel.backend import FSDP2Backend, ParallelBackend
from sparsedist.parallel.runtime import Runtime, init_runtime, shutdown
from sparsedist.parallel.select import make_backend

__all__ = ["FSDP2Backend", "ParallelBackend", "Runtime", "init_runtime", "make_backend", "shutdown"]
