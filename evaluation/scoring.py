"""Pure scorers: teacher-forced inputs, logits at chosen positions, per-token correctness and NLL.

A scored token counts as correct only when its logit is strictly greater than every other
logit: ties count as wrong, so a model whose logits are all equal scores 0 accuracy (never a
lucky argmax) and an NLL of exactly ln(V).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from .errors import NonFiniteLogitsError


def teacher_forced(context, target) -> tuple[list[int], list[int], list[int]]:
    """Input ids, scored positions and target ids for scoring `target` after `context`.

    The input is context + target[:-1]; the logits at position len(context) - 1 + i predict target[i].
    """
    context, target = [int(t) for t in context], [int(t) for t in target]
    if not context or not target:
        raise ValueError("teacher forcing needs a non-empty context and target")
    start = len(context) - 1
    return context + target[:-1], list(range(start, start + len(target))), target


def hidden_at(model, input_ids: torch.Tensor, positions, *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 final hidden states (len(positions), D) of a batch-1 sequence at `positions`.

    `model` needs `trunk(ids) -> (hidden, ...)`; only the trunk runs under autocast.
    """
    device_type = input_ids.device.type
    autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with autocast:
        hidden = model.trunk(input_ids)[0]
    index = torch.as_tensor(positions, dtype=torch.long, device=hidden.device)
    return hidden[0].index_select(0, index).float()


def logits_at(model, input_ids: torch.Tensor, positions, *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits (len(positions), V) computed only at `positions`, so (T, V) logits are never formed."""
    return model.logits(hidden_at(model, input_ids, positions, autocast_dtype=autocast_dtype)).float()


@dataclass
class TokenScores:
    """Per-token results: `correct` (bool) and `nll` (float64 nats), one entry per scored token."""

    correct: torch.Tensor
    nll: torch.Tensor


def score_tokens(logits: torch.Tensor, targets) -> TokenScores:
    """Score (n, V) logits against n target ids: strict-argmax correctness (ties wrong) and NLL in float64."""
    logits = logits.detach().to(device="cpu", dtype=torch.float64)
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if logits.dim() != 2 or logits.shape[0] != targets.numel():
        raise ValueError(f"logits {tuple(logits.shape)} do not match {targets.numel()} targets")
    rows = torch.arange(targets.numel())
    nll = -torch.log_softmax(logits, dim=-1)[rows, targets]
    target_logit = logits[rows, targets]
    others = logits.clone()
    others[rows, targets] = -math.inf
    correct = target_logit > others.max(dim=-1).values
    return TokenScores(correct=correct, nll=nll)


@dataclass
class RetrievalTally:
    """Running sums over trials of a retrieval cell."""

    trials: int = 0
    tokens: int = 0
    correct_tokens: int = 0
    digits: int = 0
    correct_digits: int = 0
    exact: int = 0
    nll_sum: float = 0.0

    def add(self, scores: TokenScores, digit_sizes=None) -> None:
        """Add one trial's value-token scores; `digit_sizes` groups tokens into digits (default: one token each)."""
        sizes = list(digit_sizes) if digit_sizes is not None else [1] * scores.correct.numel()
        if sum(sizes) != scores.correct.numel():
            raise ValueError(f"digit sizes {sizes} do not add up to {scores.correct.numel()} scored tokens")
        self.trials += 1
        self.tokens += scores.correct.numel()
        self.correct_tokens += int(scores.correct.sum())
        self.digits += len(sizes)
        self.correct_digits += sum(int(bool(group.all())) for group in torch.split(scores.correct, sizes))
        self.exact += int(bool(scores.correct.all()))
        self.nll_sum += float(scores.nll.sum())

    def summary(self) -> dict:
        """token_acc, digit_acc and exact_acc in [0, 1], nll in nats per value token, and the counts."""
        if self.trials == 0:
            raise ValueError("no trials scored")
        return {
            "token_acc": self.correct_tokens / self.tokens,
            "digit_acc": self.correct_digits / self.digits,
            "exact_acc": self.exact / self.trials,
            "nll": self.nll_sum / self.tokens,
            "trials": self.trials,
            "scored_tokens": self.tokens,
        }


def check_finite(logits: torch.Tensor, where: str) -> None:
    """NonFiniteLogitsError (one line: how many NaN and inf values, and `where`) unless every logit is finite."""
    if bool(torch.isfinite(logits).all()):
        return
    num_nan = int(torch.isnan(logits).sum())
    num_inf = int(torch.isinf(logits).sum())
    raise NonFiniteLogitsError(f"non-finite logits ({num_nan:,} NaN, {num_inf:,} inf of {logits.numel():,}) {where}")


def score_positions(
    model, input_ids: torch.Tensor, positions, targets, *, autocast_dtype: torch.dtype | None = None, chunk: int = 256
) -> TokenScores:
    """Run the model once and score `targets` at `positions`, mapping at most `chunk` rows to logits at a time.

    Raises NonFiniteLogitsError when a scored position has a NaN or infinite logit: such scores
    would read as 0 accuracy and an undefined perplexity instead of as a broken model.
    """
    hidden = hidden_at(model, input_ids, positions, autocast_dtype=autocast_dtype)
    targets = list(targets)
    parts = []
    for start in range(0, len(targets), chunk):
        logits = model.logits(hidden[start : start + chunk]).float()
        check_finite(logits, f"at the scored positions of a {input_ids.shape[1]}-token input")
        parts.append(score_tokens(logits, targets[start : start + chunk]))
    return TokenScores(correct=torch.cat([p.correct for p in parts]), nll=torch.cat([p.nll for p in parts]))


def likelihood_summary(nll_sum: float, num_tokens: int, num_bytes: int) -> dict:
    """nll (nats/token), ppl and bpb = sum NLL / ln 2 / UTF-8 bytes of the scored spans."""
    if num_tokens <= 0:
        raise ValueError("no tokens scored")
    nll = nll_sum / num_tokens
    return {
        "nll": nll,
        "ppl": math.exp(nll) if nll < 700 else math.inf,
        "bpb": nll_sum / math.log(2) / num_bytes if num_bytes > 0 else math.nan,
        "tokens": num_tokens,
        "bytes": num_bytes,
    }
