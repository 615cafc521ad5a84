"""Sparsity methods by recipe name (`sparsity.method`), each registered with its recipe section."""

from sparsedist.config.sparsity import METHOD_CONFIGS, SparsityConfig
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.methods.ast import AST
from sparsedist.sparsity.methods.base import SparsityMethod
from sparsedist.sparsity.methods.cast import CAST
from sparsedist.sparsity.methods.dense import Dense
from sparsedist.sparsity.methods.sparse_pretrain import SparsePretrain
from sparsedist.sparsity.methods.sste import SSTE
from sparsedist.sparsity.methods.ste import SRSTE, STE

METHODS: dict[str, type[SparsityMethod]] = {
    name: cls for cls in (Dense, STE, SRSTE, SparsePretrain, SSTE, AST, CAST)
    for name, config in METHOD_CONFIGS.items() if config is cls.config
}
if METHODS.keys() != METHOD_CONFIGS.keys():  # a recipe section without its method, or the reverse
    raise ImportError(f"sparsity methods {sorted(METHODS)} and their recipe sections {sorted(METHOD_CONFIGS)} differ")


def make_method(cfg: SparsityConfig, backend: ParallelBackend, total_steps: int, fp8: bool = False) -> SparsityMethod:
    """The method of `cfg`; `fp8` (recipe `precision.fp8`) gives its FFN layers FP8 products."""
    return METHODS[cfg.method](cfg, backend, total_steps, fp8)


__all__ = ["METHODS", "SparsityMethod", "make_method"]
