"""One retrieval cell: every trial's needle at one (length, depth), value tokens scored teacher-forced
(and, when asked, the value generated freely)."""

from __future__ import annotations

import torch

from .generation import GenerationTally, generate_after
from .haystack import Needle, build_context
from .scoring import RetrievalTally, score_positions, teacher_forced


def retrieval_inputs(haystack, needle: Needle, length: int, depth: float, *, eos_id: int | None):
    """(input ids, scored positions, value ids) of one trial: the context of `length` plus value[:-1]."""
    context = build_context(haystack, needle, length, depth, eos_id=eos_id)
    return teacher_forced(context, needle.value_ids)


def run_retrieval_cell(
    model,
    needles: list[Needle],
    haystack,
    length: int,
    depth: float,
    *,
    eos_id: int | None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    decode=None,
) -> dict:
    """Score every needle at (length, depth): token/digit/exact accuracy in [0, 1], nll per value token, counts.

    With `decode` (token ids -> text) the model also writes each value itself after the context
    (free generation with the decoding cache), adding free_exact_acc and free_digit_acc.
    """
    tally = RetrievalTally()
    generated = GenerationTally()
    for needle in needles:
        ids, positions, targets = retrieval_inputs(haystack, needle, length, depth, eos_id=eos_id)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        scores = score_positions(model, input_ids, positions, targets, autocast_dtype=autocast_dtype)
        tally.add(scores, needle.digit_sizes)
        if decode is not None:
            # The context is the first `length` input tokens (the rest are the teacher-forced value).
            tokens = generate_after(model, ids[:length], len(needle.value_ids), device=device, autocast_dtype=autocast_dtype)
            generated.add(needle, decode(tokens))
    summary = tally.summary()
    if decode is not None:
        summary.update(generated.summary())
    return summary
