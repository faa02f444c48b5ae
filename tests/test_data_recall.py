"""The recall:INPUT source: key-value episodes in real text, distinct from the evaluation's needles."""

import re

import pytest
from tokenizers import Tokenizer

from data_pipeline.config import PrepareConfig
from data_pipeline.errors import DataError

from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import prepare
from data_pipeline.recall import CUES, FILLERS, RecallSettings, recall_document
from data_pipeline.split_reader import SplitReader
from evaluation.haystack import FILLER, NIAH_WORDS

TEXT = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma " * 30
# Any of the cue templates with its key, then the value.
_CUE = "|".join(re.escape(c.strip()).replace(re.escape("{key}"), "[A-Z][a-z]+") for c in CUES)
EPISODE = re.compile(rf"(?P<cue>{_CUE})(?P<value>( \d){{5}})\.")


def _facts(doc: str) -> list[tuple[str, str]]:
    return [(m["cue"], m["value"]) for m in EPISODE.finditer(doc)]


def test_every_query_repeats_an_earlier_fact_word_for_word():
    for seed in range(40):
        doc = recall_document(TEXT, f"doc{seed}", RecallSettings(episodes=(1, 4), gap_chars=(0, 120)))
        facts = _facts(doc)
        assert len(facts) % 2 == 0 and 2 <= len(facts) <= 8
        cues = [cue for cue, _ in facts[0::2]]
        assert len(set(cues)) == len(cues)  # one key per episode
        for (cue, value), (query, answer) in zip(facts[0::2], facts[1::2]):
            assert query == cue and answer == value


def test_documents_are_deterministic_in_their_seed_and_carry_the_source_text():
    first = recall_document(TEXT, "a")
    assert first == recall_document(TEXT, "a") and first != recall_document(TEXT, "b")
    long = recall_document(TEXT, "c", RecallSettings(episodes=(2, 2), gap_chars=(200, 200)))
    assert "gamma delta" in long and not any(f.strip() in long for f in FILLERS)
    # Without text of its own between fact and query, a filler sentence keeps them apart.
    empty = recall_document("", "d", RecallSettings(episodes=(1, 1)))
    assert any(f.strip() in empty for f in FILLERS)


def test_cues_and_fillers_differ_from_the_evaluations():
    for seed in range(200):
        doc = recall_document(TEXT, str(seed))
        assert "access code" not in doc and "special magic" not in doc
        assert not any(word in doc.lower() for word in NIAH_WORDS)
    assert not any(sentence.strip() in " ".join(FILLERS) for sentence in FILLER.split(".") if sentence.strip())


def test_prepare_mixes_recall_documents_by_weight(tmp_path):
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text("".join(f'{{"text": "note {i}: {TEXT[: 200 + i]}"}}\n' for i in range(30)))
    out = tmp_path / "shards"
    prepare(inputs=[str(corpus), f"recall:{corpus}"], weights=[1.0, 2.0], output=str(out), seq_len=64,
            vocab_size=300, val_fraction=0.0, progress=False)
    manifest = load_manifest(str(out))
    assert manifest.settings["inputs"][1] == f"recall:{corpus.resolve()}"
    reader = SplitReader(manifest, "train")
    tokens = reader.token_stream()
    text = Tokenizer.from_file(manifest.tokenizer_path).decode(tokens.tolist())
    facts = _facts(text)
    # 30 documents read twice (weight 2): 60 recall documents, each with 1-3 episodes.
    assert 120 <= len(facts) <= 360
    # The second pass draws new episodes, not copies of the first.
    assert len({value for _, value in facts}) > 0.8 * len(facts) / 2


def test_prepare_recall_settings_shape_the_episodes(tmp_path):
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text("".join(f'{{"text": "note {i}: {TEXT[: 300 + i]}"}}\n' for i in range(20)))
    out = tmp_path / "shards"
    prepare(inputs=[f"recall:{corpus}"], output=str(out), seq_len=64, vocab_size=300, val_fraction=0.0,
            progress=False, recall_episodes=(6, 6), recall_gap_chars=(0, 30), recall_digits=1)
    manifest = load_manifest(str(out))
    assert manifest.settings["recall_episodes"] == [6, 6] and manifest.settings["recall_digits"] == 1
    text = Tokenizer.from_file(manifest.tokenizer_path).decode(SplitReader(manifest, "train").token_stream().tolist())
    one_digit = re.compile(rf"(?P<cue>{_CUE})(?P<value> \d)\.")
    # 6 facts + 6 queries in each of 20 documents, one digit each (the stream's last sample may drop a tail).
    assert 20 * 6 * 2 - 4 <= len(one_digit.findall(text)) <= 20 * 6 * 2 and not _facts(text)
    plain = tmp_path / "plain"  # without a recall input the recall settings are not part of the data's identity
    prepare(inputs=[str(corpus)], output=str(plain), seq_len=64, vocab_size=300, progress=False, recall_digits=1)
    assert "recall_digits" not in load_manifest(str(plain)).settings


@pytest.mark.parametrize("settings, message", [
    (dict(recall_episodes=(0, 2)), "--recall-episodes needs 1 <= LO <= HI"),
    (dict(recall_gap_chars=(50, 10)), "--recall-gap-chars needs 0 <= LO <= HI"),
    (dict(recall_episodes=("a", 2)), "--recall-episodes takes two integers"),
    (dict(recall_digits=0), "--recall-digits must be between 1 and 10"),
])
def test_bad_recall_settings_are_refused_in_one_line(tmp_path, settings, message):
    with pytest.raises(DataError, match=re.escape(message)):
        PrepareConfig(output=str(tmp_path), seq_len=64, **settings)
