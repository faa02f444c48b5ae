"""Fixed-target likelihood vs context length (SPEC §7.3): the same target tokens scored at every length."""

from __future__ import annotations

import numpy as np
import torch

from .codec import TextCodec
from .scoring import likelihood_summary, score_positions, teacher_forced


def fixed_target(doc, length: int, *, max_length: int, target_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(context, target) of one document: target = doc[max_length : max_length + target_tokens], context = the `length` tokens before it."""
    if not 1 <= length <= max_length:
        raise ValueError(f"context length {length} must be in [1, {max_length}]")
    if len(doc) < max_length + target_tokens:
        raise ValueError(f"document has {len(doc)} tokens, needs {max_length + target_tokens}")
    target = np.asarray(doc[max_length : max_length + target_tokens])
    context = np.asarray(doc[max_length - length : max_length])
    return context, target


def run_perplexity_cell(
    model,
    codec: TextCodec,
    docs: list[np.ndarray],
    length: int,
    *,
    max_length: int,
    target_tokens: int,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Score each document's fixed target after `length` tokens of context: nll, ppl, bpb, tokens, bytes, documents."""
    nll_sum, num_tokens, num_bytes = 0.0, 0, 0
    for doc in docs:
        context, target = fixed_target(doc, length, max_length=max_length, target_tokens=target_tokens)
        ids, positions, targets = teacher_forced(context, target)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        scores = score_positions(model, input_ids, positions, targets, autocast_dtype=autocast_dtype)
        nll_sum += float(scores.nll.sum())
        num_tokens += len(targets)
        num_bytes += len(codec.decode(target).encode("utf-8"))
    return {**likelihood_summary(nll_sum, num_tokens, num_bytes), "documents": len(docs)}
