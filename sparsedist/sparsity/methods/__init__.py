"""Sparsity methods by recipe name (`sparsity.method`)."""

from sparsedist.config.sparsity import SparsityConfig
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.methods.ast import AST
from sparsedist.sparsity.methods.base import SparsityMethod
from sparsedist.sparsity.methods.cast import CAST
from sparsedist.sparsity.methods.dense import Dense
from sparsedist.sparsity.methods.sparse_pretrain import SparsePretrain
from sparsedist.sparsity.methods.sste import SSTE
from sparsedist.sparsity.methods.ste import SRSTE, STE

METHODS: dict[str, type[SparsityMethod]] = {
    cls.name: cls for cls in (Dense, STE, SRSTE, SparsePretrain, SSTE, AST, CAST)
}


def make_method(cfg: SparsityConfig, backend: ParallelBackend, total_steps: int) -> SparsityMethod:
    return METHODS[cfg.method](cfg, backend, total_steps)


__all__ = ["METHODS", "SparsityMethod", "make_method"]
