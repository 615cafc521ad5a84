"""The error every evaluation and compression command reports in one line (defined in sparsedist.errors)."""

from sparsedist.errors import EvalError

__all__ = ["EvalError"]
