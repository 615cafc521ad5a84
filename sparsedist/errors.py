"""Placeholder: replaced by the error hierarchy (issue 19 item 6)."""


class SparsedistError(Exception):
    """Base of the errors the command line reports in one line."""


class RecipeError(SparsedistError, ValueError):
    """An invalid recipe or override; its message is one line that names the key."""


class NonFiniteError(SparsedistError, RuntimeError):
    """Training met non-finite values it may not go on with."""


class CheckpointError(SparsedistError, RuntimeError):
    """A checkpoint's files do not match its manifest."""
