"""Check the evaluation's settings and decide which tasks and haystacks run."""

from __future__ import annotations

from .errors import EvaluationError
from .haystack import HAYSTACKS, TASKS
from .lengths import parse_lengths

PERPLEXITY = "perplexity"
ALL_TASKS = TASKS + (PERPLEXITY,)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_SEED = 1234
# Free-generation retrieval (evaluation/generation.py) is opt-in: on the CPU it more than doubles
# the retrieval cells' time (one more prefill and a decode step per value token per trial).
FREE_GENERATION_DEFAULT = False


def check_choices(values, allowed, what: str) -> tuple:
    """`values` without duplicates, or EvaluationError naming the ones not in `allowed`."""
    values = tuple(dict.fromkeys(values))
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise EvaluationError(f"bad {what} {', '.join(bad) or '(none)'}: choose from {', '.join(allowed)}")
    return values


def check_settings(lengths, depths, trials, target_tokens, max_docs) -> tuple[list[int], tuple[float, ...]]:
    """Validate the numeric settings; return sorted unique lengths and the depths as floats."""
    try:
        lengths = parse_lengths(lengths) if isinstance(lengths, str) else sorted({int(n) for n in lengths})
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    if not lengths or lengths[0] < 1:
        raise EvaluationError("lengths must be positive integers")
    depths = tuple(float(d) for d in depths)
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvaluationError(f"depths must be numbers in [0, 1], got {list(depths)}")
    for name, value in (("trials", trials), ("target_tokens", target_tokens), ("max_docs", max_docs)):
        if int(value) < 1:
            raise EvaluationError(f"{name} must be at least 1, got {value}")
    return lengths, depths


def resolve_plan(tasks, haystacks, has_data: bool) -> tuple[tuple, tuple, list[str]]:
    """Fill in tasks/haystacks left as None; without data, perplexity and the real haystack are left out."""
    notes = []
    if tasks is None:
        tasks = ALL_TASKS if has_data else TASKS
        if not has_data:
            notes.append("no --data given: fixed-target perplexity was not run")
    if haystacks is None:
        haystacks = HAYSTACKS if has_data else ("synthetic",)
        if not has_data:
            notes.append("no --data given: the real haystack was not run")
    tasks = check_choices(tasks, ALL_TASKS, "task")
    haystacks = check_choices(haystacks, HAYSTACKS, "haystack")
    if not has_data and (PERPLEXITY in tasks or ("real" in haystacks and set(tasks) & set(TASKS))):
        raise EvaluationError("perplexity and the real haystack need held-out text: pass --data (a prepared shard directory, .txt or .jsonl)")
    return tasks, haystacks, notes
