"""Sparsity methods by recipe name (`sparsity.method`)."""

from sparsedist.config.schema import SparsityConfig
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.sparsity.methods.base import SparsityMethod
from sparsedist.sparsity.methods.dense import Dense
from sparsedist.sparsity.methods.ste import SRSTE, STE

METHODS: dict[str, type[SparsityMethod]] = {cls.name: cls for cls in (Dense, STE, SRSTE)}


def make_method(cfg: SparsityConfig, backend: ParallelBackend) -> SparsityMethod:
    return METHODS[cfg.method](cfg, backend)


__all__ = ["METHODS", "SparsityMethod", "make_method"]
