"""The error every evaluation and compression command reports in one line."""


class EvalError(ValueError):
    """A model, a data source or a request that evaluation or compression cannot use."""
