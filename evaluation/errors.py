"""The one exception type for user-facing evaluation errors (printed as one line by the CLI)."""


class EvaluationError(ValueError):
    """A bad argument, a missing file or data that cannot serve the requested evaluation."""


class NonFiniteLogitsError(EvaluationError):
    """The model produced NaN or infinite logits where tokens are scored."""
