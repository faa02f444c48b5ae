"""Free-generation retrieval: the model writes the value itself after the context, with its decoding cache.

Hand-made models behind the cache interface (`new_cache`, `extend`, `logits`) fix the expected
scores: an induction copier writes every value exactly, an all-equal model writes none. The
scorer is checked on hand-written texts, and a real exported model runs the whole evaluation
with the score on and off.
"""

import json
import os

import pytest
import torch
import torch.nn as nn
from helpers import induction_next, with_live_weights
from tokenizers import Tokenizer

from evaluation import run_evaluation
from evaluation.codec import load_codec
from evaluation.generation import GenerationTally, digits_written
from evaluation.haystack import make_needle, synthetic_haystack
from evaluation.retrieval import run_retrieval_cell
from model import AtmaConfig, AtmaForCausalLM

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class CachedInductionModel(nn.Module):
    """Predicts the token that followed the longest earlier match of the current suffix; its cache is the token list."""

    def __init__(self, vocab_size: int, max_match: int = 16):
        super().__init__()
        self.vocab_size, self.max_match = vocab_size, max_match

    def _predict(self, ids: list[int], t: int) -> int:
        return induction_next(ids, t, self.max_match)

    def _one_hot(self, ids: list[int], positions) -> torch.Tensor:
        predicted = torch.tensor([self._predict(ids, t) for t in positions])
        return nn.functional.one_hot(predicted, self.vocab_size).float()[None]

    def trunk(self, input_ids):
        ids = input_ids[0].tolist()
        return self._one_hot(ids, range(len(ids))), [], torch.zeros(())

    def new_cache(self):
        return []

    def extend(self, input_ids, cache):
        start = len(cache)
        cache.extend(input_ids[0].tolist())
        return self._one_hot(cache, range(start, len(cache)))

    def logits(self, hidden):
        return 30.0 * hidden


class CachedUniformModel(CachedInductionModel):
    """Every logit equal: greedy decoding writes token 0 (the end-of-text token) forever."""

    def _one_hot(self, ids, positions):
        return torch.zeros(1, len(list(positions)), self.vocab_size)


@pytest.fixture(scope="module")
def model_dir(tiny_shards, tmp_path_factory) -> str:
    """A tiny exported model with live weights and the shards' tokenizer."""
    directory = str(tmp_path_factory.mktemp("exported"))
    torch.manual_seed(0)
    model = with_live_weights(AtmaForCausalLM(AtmaConfig.from_preset("tiny", vocab_size=512)))
    model.save_pretrained(directory)
    tokenizer = Tokenizer.from_file(os.path.join(tiny_shards, "tokenizer.json"))
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def codec(model_dir):
    return load_codec(model_dir)


def test_scorer_on_written_texts(codec):
    needle = make_needle(codec, "passkey", 0, seed=1234)
    digits = [str(d) for d in needle.digits]
    wrong_last = " ".join(digits[:4] + [str((needle.digits[4] + 1) % 10)])
    cases = [
        (needle.value, 1, 5),  # exactly the value
        (needle.value + " and more", 1, 5),  # the value, then anything
        (" " + wrong_last, 0, 4),  # one digit wrong
        ("".join(digits), 0, 0),  # digits run together: not the five words
        ("", 0, 0),
    ]
    for text, exact, correct in cases:
        tally = GenerationTally()
        tally.add(needle, text)
        assert tally.summary() == {"free_exact_acc": float(exact), "free_digit_acc": correct / 5}, text
    assert digits_written(" 1 2  3\n4 5 6") == ["1", "2", "3", "4", "5"]
    with pytest.raises(ValueError, match="no trials"):
        GenerationTally().summary()


def test_copying_model_writes_every_value_and_a_flat_one_none(codec):
    needles = [make_needle(codec, task, s, seed=1234) for task in ("passkey", "niah") for s in range(3)]
    haystack = synthetic_haystack(codec, 256)
    for length, depth in ((96, 0.1), (160, 0.5), (192, 0.9)):
        copied = run_retrieval_cell(CachedInductionModel(codec.vocab_size), needles, haystack, length, depth,
                                    eos_id=codec.eos_id, decode=codec.decode)
        assert copied["free_exact_acc"] == 1.0 and copied["free_digit_acc"] == 1.0 and copied["exact_acc"] == 1.0
        flat = run_retrieval_cell(CachedUniformModel(codec.vocab_size), needles, haystack, length, depth,
                                  eos_id=codec.eos_id, decode=codec.decode)
        assert flat["free_exact_acc"] == 0.0 and flat["free_digit_acc"] == 0.0
    plain = run_retrieval_cell(CachedInductionModel(codec.vocab_size), needles, haystack, 96, 0.5, eos_id=codec.eos_id)
    assert "free_exact_acc" not in plain


@pytest.mark.parametrize("free_generation", [True, False])
def test_evaluation_reports_free_generation(model_dir, tmp_path, free_generation):
    out = tmp_path / "eval"
    results = run_evaluation(model_dir, "64,128", str(out), tasks=["passkey"], haystacks=["synthetic"], depths=[0.5],
                             trials=2, progress=False, free_generation=free_generation)
    assert results["metadata"]["free_generation"] is free_generation
    saved = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for entry in saved["retrieval"]:
        if free_generation:
            assert 0.0 <= entry["free_exact_acc"] <= 1.0 and 0.0 <= entry["free_digit_acc"] <= 1.0
        else:
            assert "free_exact_acc" not in entry
    assert ("## Free-generation retrieval" in report) is free_generation
    assert (out / "generation.png").exists() is free_generation
    if free_generation:
        assert (out / "generation.png").read_bytes().startswith(PNG_SIGNATURE)
        assert saved["metadata"]["outputs"]["generation_plot"] == str(out / "generation.png")
