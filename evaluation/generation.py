"""Free-generation retrieval: after the context, the model writes the value itself (greedy, with the cache).

Beside the teacher-forced score (SPEC §7.2), each trial's context (ending with the repeated cue)
is prefilled into the model's decoding cache and as many tokens as the value takes are generated
greedily. A trial is an exact match when the generated text starts with the value
" d1 d2 d3 d4 d5"; digit accuracy compares the first five whitespace-separated words with the
five digits, position by position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.generation import greedy_generate

from .haystack import NUM_DIGITS, Needle


def generate_after(model, context: list[int], num_tokens: int, *, device, autocast_dtype=None) -> list[int]:
    """Greedy continuation of `context` by `num_tokens` tokens: one prefill, then one cached step per token."""
    input_ids = torch.tensor([context], dtype=torch.long, device=device)
    return greedy_generate(model, input_ids, num_tokens, autocast_dtype=autocast_dtype).tokens[0].tolist()


def digits_written(text: str) -> list[str]:
    """The first five whitespace-separated words of generated text (what should be the five digits)."""
    return text.split()[:NUM_DIGITS]


@dataclass
class GenerationTally:
    """Running counts of a retrieval cell's free-generation trials."""

    trials: int = 0
    exact: int = 0
    correct_digits: int = 0

    def add(self, needle: Needle, text: str) -> None:
        """Score one trial's generated text against its needle."""
        words = digits_written(text)
        self.trials += 1
        self.exact += int(text.startswith(needle.value))
        self.correct_digits += sum(
            int(i < len(words) and words[i] == str(d)) for i, d in enumerate(needle.digits)
        )

    def summary(self) -> dict:
        """free_exact_acc and free_digit_acc in [0, 1]."""
        if self.trials == 0:
            raise ValueError("no trials generated")
        return {
            "free_exact_acc": self.exact / self.trials,
            "free_digit_acc": self.correct_digits / (NUM_DIGITS * self.trials),
        }
