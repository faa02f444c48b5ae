"""Key-value recall inserted into real text: training documents that teach in-context retrieval.

An input ``recall:INPUT`` reads the documents of ``INPUT`` (any other input form) and turns each
into a recall document: short episodes, each a fact ("<cue> d1 d2 d3 d4 d5.") followed after a
stretch of the document's own text by a query that repeats the cue, whose answer is the same five
digits. Mixed with the plain corpus by ``--weights``, it gives a small model many exact copies to
learn from within one training window.

Its cue phrasings, keys and fillers are its own, different from the long-context evaluation's
(``evaluation/haystack.py``: "The access code for record N is", "The special magic WORD number
is", "The grass is green..."), so that what the evaluation measures is retrieval, not a memorised
template. Only the value format is shared: five digits, each written as " d".

Every document is drawn from ``random.Random`` seeded with its record's key (and the pass over the
input, when a weight above 1 reads it again), so prepare stays deterministic and resumable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

RECALL_PREFIX = "recall:"
NUM_DIGITS = 5

# Cue phrasings: {key} is a made-up name. None of them uses the evaluation's words.
CUES = (
    " Remember: the locker combination of {key} is",
    " Note that the serial for {key} reads",
    " The PIN assigned to {key} is",
    " {key} was given the ticket",
    " For {key}, the parcel tracking digits are",
    " Log entry: {key} checked in with badge",
)
# Made-up names, two syllables each (about 2,900 of them): keys unlike the evaluation's
# seven-digit record numbers and its six nature words.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "tr", "kl", "br")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "x", "sk")
# Words between an episode's fact and its query when the document has run out of its own text.
FILLERS = (
    " Meanwhile the kettle boiled.", " Nothing else happened that day.", " The meeting ran late.",
    " A bus went by.", " Then the power flickered.", " Someone knocked twice.",
)


@dataclass(frozen=True)
class RecallSettings:
    """How recall documents are built from their source text."""

    episodes: tuple[int, int] = (1, 3)
    """Episodes per document (inclusive range)."""
    gap_chars: tuple[int, int] = (0, 400)
    """Characters of the document's own text between a fact and its query (inclusive range)."""
    digits: int = NUM_DIGITS
    """Digits of each value."""


def make_key(rng: random.Random) -> str:
    """A made-up capitalised name of two syllables, e.g. "Brazu" or "Kelsko"."""
    syllables = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(2)]
    return "".join(syllables).capitalize()


def value_text(digits: tuple[int, ...]) -> str:
    """Digits as the evaluation writes a value: " d1 d2 d3 d4 d5"."""
    return "".join(f" {d}" for d in digits)


def recall_document(text: str, seed: str, settings: RecallSettings = RecallSettings()) -> str:
    """Turn one document's text into a recall document (deterministic in ``seed``).

    Each episode is: a fact, a stretch of ``text`` (consecutive characters, cut at whitespace),
    then the query, which repeats the fact's cue word for word and ends with the same value.
    Facts and queries are interleaved in order, so a query's fact is always before it.
    """
    rng = random.Random(f"{RECALL_PREFIX}{seed}")
    position = 0
    parts = []
    used = set()
    for _ in range(rng.randint(*settings.episodes)):
        key = make_key(rng)
        while key in used:
            key = make_key(rng)
        used.add(key)
        cue = rng.choice(CUES).format(key=key)
        value = value_text(tuple(rng.randint(0, 9) for _ in range(settings.digits)))
        gap, position = _stretch(text, position, rng.randint(*settings.gap_chars))
        if not gap.strip():
            gap = rng.choice(FILLERS)
        parts += [f"{cue}{value}.", gap, f"{cue}{value}."]
    return "".join(parts).lstrip()


def _stretch(text: str, start: int, size: int) -> tuple[str, int]:
    """About ``size`` characters of ``text`` from ``start``, extended to the next whitespace; and where it ended."""
    if start >= len(text) or size <= 0:
        return "", start
    end = min(len(text), start + size)
    while end < len(text) and not text[end].isspace():
        end += 1
    piece = " " + " ".join(text[start:end].split())
    return piece, end
