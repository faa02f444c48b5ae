"""Standalone long-context evaluation of an exported model: fixed-target perplexity and teacher-forced retrieval."""

from .errors import EvaluationError
from .lengths import parse_lengths
from .scoring import TokenScores, logits_at, score_tokens, teacher_forced

__all__ = ["EvaluationError", "TokenScores", "logits_at", "main", "parse_lengths", "run_evaluation", "score_tokens", "teacher_forced"]


def __getattr__(name):
    # Imported on first use so that `python -m evaluation.long_context` does not load its module twice.
    if name in ("run_evaluation", "main"):
        from . import long_context

        return getattr(long_context, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
