"""Needles, haystacks and contexts of exact length for teacher-forced retrieval (SPEC §7.2)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from .codec import TextCodec

TASKS = ("passkey", "niah")
HAYSTACKS = ("synthetic", "real")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NIAH_WORDS = ("ocean", "garden", "mountain", "river", "forest", "desert")
NUM_DIGITS = 5
# The real haystack is read a little past the longest context, as in SPEC §7.2.
REAL_HAYSTACK_MARGIN = 64


@dataclass(frozen=True)
class Needle:
    """A cue and its five-digit value, as text and as token ids (value digits encoded one by one).

    `digit_sizes[i]` is the number of value tokens of digit i (a BPE may write " 7" as one or two tokens).
    """

    task: str
    sample: int
    cue: str
    digits: tuple[int, ...]
    cue_ids: tuple[int, ...]
    value_ids: tuple[int, ...]
    digit_sizes: tuple[int, ...]

    @property
    def value(self) -> str:
        """The value as written in the needle: " d1 d2 d3 d4 d5"."""
        return "".join(f" {d}" for d in self.digits)


def sample_needle_text(task: str, sample: int, seed: int) -> tuple[str, tuple[int, ...]]:
    """The cue text and digits of sample `sample`, drawn from random.Random(f"{seed}:{task}:{sample}").

    The draw depends on (seed, task, sample) only, so every length and depth sees the same needle.
    """
    rng = random.Random(f"{seed}:{task}:{sample}")
    if task == "passkey":
        cue = f" The access code for record {rng.randint(10**6, 10**7 - 1)} is"
    elif task == "niah":
        cue = f" The special magic {rng.choice(NIAH_WORDS)} number is"
    else:
        raise ValueError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")
    digits = tuple(rng.randint(0, 9) for _ in range(NUM_DIGITS))
    return cue, digits


def make_needle(codec: TextCodec, task: str, sample: int, seed: int) -> Needle:
    """Sample a needle and tokenize it: the cue as one string, each " d" of the value on its own."""
    cue, digits = sample_needle_text(task, sample, seed)
    pieces = [codec.digit_ids(d) for d in digits]
    return Needle(
        task=task, sample=sample, cue=cue, digits=digits, cue_ids=tuple(codec.encode(cue)),
        value_ids=tuple(t for piece in pieces for t in piece), digit_sizes=tuple(len(piece) for piece in pieces),
    )


def synthetic_haystack(codec: TextCodec, num_tokens: int) -> np.ndarray:
    """The filler sentence tokenized once and tiled to at least `num_tokens` tokens."""
    unit = np.asarray(codec.encode(FILLER), dtype=np.int64)
    repeats = max(1, math.ceil(num_tokens / len(unit)))
    return np.tile(unit, repeats)


def needle_budget(length: int, needle: Needle, *, has_eos: bool) -> int:
    """Haystack tokens in a context of `length`: length - (EOS + cue + value + cue)."""
    return length - (int(has_eos) + 2 * len(needle.cue_ids) + len(needle.value_ids))


def build_context(haystack, needle: Needle, length: int, depth: float, *, eos_id: int | None) -> list[int]:
    """A context of exactly `length` tokens: [EOS] + body[:i] + cue + value + body[i:] + cue.

    body = haystack[:budget] and i = floor(depth * budget); the EOS is left out when the
    tokenizer has none.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    budget = needle_budget(length, needle, has_eos=eos_id is not None)
    if budget < 0:
        raise ValueError(f"length {length} is shorter than the needle and query ({length - budget} tokens)")
    if len(haystack) < budget:
        raise ValueError(f"haystack has {len(haystack)} tokens, length {length} needs {budget}")
    body = [int(t) for t in haystack[:budget]]
    insert = math.floor(depth * budget)
    prefix = [eos_id] if eos_id is not None else []
    context = prefix + body[:insert] + list(needle.cue_ids) + list(needle.value_ids) + body[insert:] + list(needle.cue_ids)
    assert len(context) == length
    return context
