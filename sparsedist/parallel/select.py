"""The backend a recipe names: the one place that knows every backend class."""

from __future__ import annotations

from sparsedist.config.schema import Recipe
from sparsedist.errors import RecipeError
from sparsedist.parallel.backend import FSDP2Backend, ParallelBackend
from sparsedist.parallel.runtime import Runtime


def make_backend(recipe: Recipe, runtime: Runtime) -> ParallelBackend:
    """The backend the recipe names, checked against the launched world size."""
    cfg = recipe.parallel
    if runtime.world_size != cfg.world_size:
        raise RecipeError(f"parallel: the recipe expects {cfg.world_size} processes (nnodes × nproc_per_node) "
                          f"but {runtime.world_size} were launched")
    if cfg.backend == "deepspeed":
        from sparsedist.parallel.zero import make_zero_backend  # imports deepspeed: only when asked for

        return make_zero_backend(recipe, runtime)
    return FSDP2Backend(cfg, runtime) if cfg.backend == "fsdp2" else ParallelBackend(cfg, runtime)
