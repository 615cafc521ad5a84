"""Every error sparsedist reports to the user in one line, with the exit status and prefix the CLI gives it.

A leaf module: it imports nothing from sparsedist, so any package may raise these. `sparsedist.cli.main`
catches `SparsedistError` once and prints `f"{err.prefix}: {err}"`, exiting with `err.exit_code`.
"""

from __future__ import annotations


class SparsedistError(Exception):
    """Base of the errors the CLI reports as one line (no traceback)."""

    exit_code = 1
    prefix = "sparsedist"


class RecipeError(SparsedistError, ValueError):
    """An invalid recipe or override; its message is one line that names the key."""

    exit_code = 2
    prefix = "sparsedist: recipe error"


class ModelConfigError(RecipeError):
    """The model section does not describe a model this recipe can train."""


class ExportError(SparsedistError, ValueError):
    """The model is not what the run claims to deliver."""

    prefix = "sparsedist: export refused"


class CheckpointError(SparsedistError, RuntimeError):
    """A checkpoint's files do not match its manifest."""


class NonFiniteError(SparsedistError, RuntimeError):
    """Training met non-finite values it may not go on with."""


class DataError(SparsedistError, ValueError):
    """A data source that cannot be read or prepared: names the file (and line) or the part at fault."""


class EvalError(SparsedistError, ValueError):
    """A model, a data source or a request that evaluation or compression cannot use."""


class ScalingError(SparsedistError, ValueError):
    """A problem with the runs or the fit, reported as one line by the CLI."""


class SlurmError(SparsedistError, ValueError):
    """A render option Slurm or the script cannot take; the message is one line."""

    exit_code = 2
    prefix = "sparsedist slurm render"
