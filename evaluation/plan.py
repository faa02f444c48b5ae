"""The work an evaluation is about to do, and how long it should take on this device.

Every cell is a number of forwards of known length: a perplexity cell runs one forward of
L + target - 1 tokens per document, a retrieval cell one of L + value - 1 tokens per trial (two
with free generation). The
time of a forward is modelled as a fixed overhead plus a cost proportional to its FLOPs (the
model's forward FLOPs per token at that length, times the length: the attention term grows with
L), fitted to two forwards measured before the cells start.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.flops import forward_flops_per_token

from .lengths import format_length

# Above this estimate (seconds) the plan carries a warning: such a run should be planned for.
LONG_RUN_SECONDS = 600.0


@dataclass(frozen=True)
class Forwards:
    """`count` forwards of `length` tokens each, for the cells of one context length."""

    cells: int
    count: int
    length: int

    @property
    def tokens(self) -> int:
        """Tokens through the model."""
        return self.count * self.length


def cell_forwards(kind: str, length: int, *, num_docs: int, trials: int, target_tokens: int, value_tokens: int,
                  free_generation: bool = False) -> tuple[int, int]:
    """(forwards, tokens per forward) of one cell: a perplexity cell or a retrieval cell."""
    if kind == "perplexity":
        return num_docs, length + target_tokens - 1
    # Free generation adds one cached prefill of about the same length per trial.
    return trials * (2 if free_generation else 1), length + value_tokens - 1


def trunk_flops_per_token(config, length: int) -> float:
    """Forward FLOPs per token of the model's trunk at `length` (the evaluation maps few positions to logits)."""
    flops = forward_flops_per_token(config, length)
    return sum(flops.values()) - flops["lm_head"]


@dataclass(frozen=True)
class ForwardTime:
    """Seconds of one forward of L tokens: ``overhead + per_flop * L * flops_per_token(L)``."""

    config: object
    overhead: float
    per_flop: float

    @classmethod
    def fit(cls, config, short: tuple[int, float], long: tuple[int, float]) -> ForwardTime:
        """Fit to two measured (length, seconds) forwards; noise that would give a negative term, or one
        measurement given twice, leaves out the overhead."""
        (l1, t1), (l2, t2) = short, long
        w1, w2 = l1 * trunk_flops_per_token(config, l1), l2 * trunk_flops_per_token(config, l2)
        per_flop = (t2 - t1) / (w2 - w1) if w2 > w1 else 0.0
        overhead = t1 - per_flop * w1
        if per_flop <= 0 or overhead < 0:
            return cls(config, 0.0, max(t1 / w1, t2 / w2))
        return cls(config, overhead, per_flop)

    def seconds(self, length: int) -> float:
        """Estimated seconds of one forward of `length` tokens."""
        return self.overhead + self.per_flop * length * trunk_flops_per_token(self.config, length)


def estimate_seconds(work: list[Forwards], time: ForwardTime) -> float:
    """Estimated seconds of all the forwards in `work`."""
    return sum(w.count * time.seconds(w.length) for w in work)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(work: dict[int, list[Forwards]], seconds: dict[int, float], *, device: str,
             measured: list[tuple[int, float]]) -> tuple[list[str], str | None]:
    """The plan's lines (totals, then one line per context length) and a warning line when the run is long.

    `measured` holds the (length, seconds) forwards the estimate was fitted to.
    """
    num_cells = sum(f.cells for fs in work.values() for f in fs)
    num_tokens = sum(f.tokens for fs in work.values() for f in fs)
    total = sum(seconds.values())
    timed = " and ".join(f"{n} tokens in {t:.3f} s" for n, t in measured)
    lines = [f"plan: {num_cells} cells at {len(work)} lengths, {num_tokens:,} tokens through the model on {device}, "
             f"about {_duration(total)} (estimated from forwards of {timed}, scaled by the model's FLOPs)"]
    for length, forwards in work.items():
        cells = sum(f.cells for f in forwards)
        tokens = sum(f.tokens for f in forwards)
        lines.append(f"  L={format_length(length)}: {cells} cells, {sum(f.count for f in forwards)} forwards, "
                     f"{tokens:,} tokens, about {_duration(seconds[length])}")
    warning = None
    if total > LONG_RUN_SECONDS:
        slowest = max(seconds, key=seconds.get)
        warning = (f"this evaluation should take about {_duration(total)} on {device} (over "
                   f"{_duration(LONG_RUN_SECONDS)}), {_duration(seconds[slowest])} of it at L={format_length(slowest)}; "
                   "shorten --lengths, lower --trials, --depths or --max-docs, or run on a GPU")
    return lines, warning
