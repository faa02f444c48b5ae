"""Long-context evaluation: length parsing, scorers on hand-made models, fixed targets, data sources, the CLI."""

import argparse
import dataclasses
import fractions
import hashlib
import inspect
import json
import math
import os
import pathlib
import shutil
import string
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
from data_fixtures import write_tokens
from eval_fixtures import EOS, export_tiny_model
from helpers import induction_next
from tokenizers import Tokenizer, models

from data_pipeline import EOS_CANDIDATES, load_manifest
from data_pipeline.mixing import split_of
from data_pipeline.prepare import prepare
from data_pipeline.tokenizer import describe, train_bpe
from evaluation import EvaluationError, parse_lengths, run_evaluation, score_tokens, teacher_forced
from evaluation.codec import load_codec
from evaluation.haystack import build_context, make_needle, needle_budget, synthetic_haystack
from evaluation.loading import load_model
from evaluation.long_context import main
from evaluation.perplexity import fixed_target, run_perplexity_cell
from evaluation.retrieval import run_retrieval_cell
from evaluation.scoring import RetrievalTally, logits_at
from evaluation.heldout import check_tokenizer, iter_documents, long_documents, open_source, read_shard_stream, token_stream
from model import AtmaConfig, AtmaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEQ_LEN = 64
VAL_FRACTION = 0.5


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [inspect.getsource(m) for m in (json.decoder, argparse, textwrap, string, pathlib, dataclasses, fractions)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus) -> str:
    """A real exported tiny model: safetensors + config.json + a byte-level BPE tokenizer.json + export.json."""
    return export_tiny_model(str(tmp_path_factory.mktemp("exported")), corpus)


@pytest.fixture(scope="module")
def codec(model_dir):
    return load_codec(model_dir)


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory, corpus) -> str:
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, model_dir, codec, corpus, jsonl_file) -> tuple[str, np.ndarray]:
    """The corpus prepared by data_pipeline with the model's tokenizer, and the val stream expected in its shards."""
    directory = str(tmp_path_factory.mktemp("shards") / "prepared")
    prepare(inputs=[jsonl_file], output=directory, seq_len=SEQ_LEN, tokenizer=os.path.join(model_dir, "tokenizer.json"),
            val_fraction=VAL_FRACTION, shard_mb=50 * 2048 / 2**20, progress=False)
    ids = []
    for line, text in enumerate(corpus, start=1):
        if split_of(f"docs.jsonl:{line}", VAL_FRACTION, 0) == "val":
            ids += codec.encode(text) + [codec.eos_id]
    return directory, np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------- hand-made models
class UniformModel(nn.Module):
    """Every logit equal at every position."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def trunk(self, input_ids):
        return torch.zeros(*input_ids.shape, 1), [], torch.zeros(())

    def logits(self, hidden):
        return torch.zeros(*hidden.shape[:-1], self.vocab_size)


class InductionModel(nn.Module):
    """Predicts the token that followed the longest earlier match of the sequence's current suffix."""

    def __init__(self, vocab_size: int, max_match: int = 16):
        super().__init__()
        self.vocab_size, self.max_match = vocab_size, max_match

    def _predict(self, ids: list[int], t: int) -> int:
        return induction_next(ids, t, self.max_match)

    def trunk(self, input_ids):
        ids = input_ids[0].tolist()
        predicted = torch.tensor([self._predict(ids, t) for t in range(len(ids))])
        return nn.functional.one_hot(predicted, self.vocab_size).float()[None], [], torch.zeros(())

    def logits(self, hidden):
        return 30.0 * hidden


# ---------------------------------------------------------------------- lengths
def test_parse_lengths():
    assert parse_lengths("2k,4k,...,64k") == [2048, 4096, 8192, 16384, 32768, 65536]
    assert parse_lengths("64, 128") == [64, 128]
    assert parse_lengths("2K,1024,2048") == [1024, 2048]
    assert parse_lengths("1m") == [1 << 20]
    for bad in ["", "abc", "2.5k", "-3", "0", "1,,2", "2k,...,8k", "2k,4k,...,60k"]:
        with pytest.raises(ValueError):
            parse_lengths(bad)


# ---------------------------------------------------------------------- scorers on hand-made cases
def test_score_tokens_strict_argmax_and_nll():
    logits = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
    scores = score_tokens(logits, [1, 0, 2])
    assert scores.correct.tolist() == [True, False, False]  # strict max, a tie, a lower logit
    expected = -torch.log_softmax(logits.double(), dim=-1)[[0, 1, 2], [1, 0, 2]]
    assert torch.allclose(scores.nll, expected, rtol=0, atol=1e-12)


def test_tally_groups_tokens_into_digits():
    tally = RetrievalTally()
    tally.add(score_tokens(torch.eye(4) * 5, [0, 1, 3, 3]), digit_sizes=[2, 2])
    summary = tally.summary()
    assert summary["token_acc"] == 0.75 and summary["digit_acc"] == 0.5 and summary["exact_acc"] == 0.0
    assert summary["scored_tokens"] == 4 and summary["trials"] == 1


@pytest.mark.parametrize("haystack_kind", ["synthetic", "real"])
def test_induction_model_retrieves_everything(codec, jsonl_file, haystack_kind):
    needles = [make_needle(codec, task, s, seed=1234) for task in ("passkey", "niah") for s in range(2)]
    if haystack_kind == "synthetic":
        haystack = synthetic_haystack(codec, 256)
    else:
        haystack, _ = token_stream(open_source(jsonl_file), codec, 256)
    model = InductionModel(codec.vocab_size)
    for length, depth in ((96, 0.1), (192, 0.5), (192, 0.9)):
        result = run_retrieval_cell(model, needles, haystack, length, depth, eos_id=codec.eos_id)
        assert result["token_acc"] == 1.0 and result["digit_acc"] == 1.0 and result["exact_acc"] == 1.0
        assert result["trials"] == 4
        assert result["scored_tokens"] == sum(len(n.value_ids) for n in needles)
        assert result["nll"] < 1e-3


def test_uniform_model_scores_zero_and_ln_v(codec):
    vocab = codec.vocab_size
    needles = [make_needle(codec, "passkey", s, seed=7) for s in range(3)]
    result = run_retrieval_cell(UniformModel(vocab), needles, synthetic_haystack(codec, 128), 96, 0.5, eos_id=codec.eos_id)
    # Ties count as wrong: all-equal logits never hit the right digit by an argmax accident.
    assert result["token_acc"] == 0.0 and result["digit_acc"] == 0.0 and result["exact_acc"] == 0.0
    assert result["nll"] == pytest.approx(math.log(vocab), abs=1e-12)


# ---------------------------------------------------------------------- needles and contexts
def test_needles_are_seeded_per_sample_and_placed_exactly(codec):
    first, again = make_needle(codec, "niah", 3, seed=1234), make_needle(codec, "niah", 3, seed=1234)
    assert first == again and first != make_needle(codec, "niah", 4, seed=1234)
    assert len(first.digits) == 5 and sum(first.digit_sizes) == len(first.value_ids)
    assert first.value == "".join(f" {d}" for d in first.digits)
    assert codec.decode(first.value_ids) == first.value
    haystack = synthetic_haystack(codec, 512)
    block = list(first.cue_ids) + list(first.value_ids)
    for length in (96, 300):
        budget = needle_budget(length, first, has_eos=True)
        for depth in (0.0, 0.5, 1.0):
            context = build_context(haystack, first, length, depth, eos_id=codec.eos_id)
            insert = 1 + math.floor(depth * budget)
            assert len(context) == length and context[0] == codec.eos_id
            assert context[insert : insert + len(block)] == block
            assert context[-len(first.cue_ids) :] == list(first.cue_ids)


def test_fixed_target_is_identical_at_every_length():
    doc = np.arange(1000, 1000 + 300)
    max_length, target_tokens = 200, 50
    targets = set()
    for length in (25, 50, 100, 200):
        context, target = fixed_target(doc, length, max_length=max_length, target_tokens=target_tokens)
        ids, positions, scored = teacher_forced(context, target)
        assert list(context) == list(doc[max_length - length : max_length])
        assert ids[:length] == list(context) and ids[length:] == list(target[:-1])
        assert positions == list(range(length - 1, length - 1 + target_tokens))
        targets.add(tuple(scored))
    assert targets == {tuple(range(1200, 1250))}


def test_perplexity_cell_uniform_model(codec, jsonl_file):
    docs, info = long_documents(open_source(jsonl_file), codec, 160, max_docs=3)
    assert len(docs) == 3 and all(len(d) == 160 for d in docs) and info["mode"] == "documents"
    result = run_perplexity_cell(UniformModel(codec.vocab_size), codec, docs, 64, max_length=128, target_tokens=32)
    assert result["nll"] == pytest.approx(math.log(codec.vocab_size), abs=1e-12)
    assert result["ppl"] == pytest.approx(codec.vocab_size)
    num_bytes = sum(len(codec.decode(d[128:160]).encode("utf-8")) for d in docs)
    assert result["bytes"] == num_bytes and result["tokens"] == 96
    assert result["bpb"] == pytest.approx(96 * math.log(codec.vocab_size) / math.log(2) / num_bytes)


def test_logits_at_matches_full_forward(model_dir):
    model, _ = load_model(model_dir, torch.device("cpu"))
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids).logits[0]
        picked = logits_at(model, ids, [3, 17, 39])
    assert torch.allclose(picked, full[[3, 17, 39]], atol=1e-5)


def test_training_window_is_removed(tmp_path, model_dir):
    windowed = AtmaForCausalLM(AtmaConfig.from_preset("tiny", vocab_size=64, window=8))
    windowed.save_pretrained(str(tmp_path))
    model, removed = load_model(str(tmp_path), torch.device("cpu"))
    assert removed == 8 and model.config.window is None
    kept, removed = load_model(str(tmp_path), torch.device("cpu"), keep_window=True)
    assert removed is None and kept.config.window == 8


# ---------------------------------------------------------------------- data sources
def test_shard_stream_drops_the_one_token_overlap(shard_dir):
    directory, stream = shard_dir
    source = open_source(directory)
    assert source.kind == "shards" and source.split == "val"
    assert len(load_manifest(directory).split("val").shards) >= 2
    read, info = read_shard_stream(source)
    num_samples = (len(stream) - 1) // SEQ_LEN
    assert info == {"split": "val", "samples": num_samples}
    assert read.dtype == np.int64 and np.array_equal(read, stream[: num_samples * SEQ_LEN + 1])
    partial, _ = read_shard_stream(source, max_tokens=200)
    assert 200 <= len(partial) < 200 + SEQ_LEN and np.array_equal(partial, stream[: len(partial)])


def test_one_shard_is_read_through_the_manifest_beside_it(shard_dir):
    directory, stream = shard_dir
    second = load_manifest(directory).split("val").shards[1]
    source = open_source(os.path.join(directory, second.file))
    assert source.kind == "shards" and source.name == second.file
    read, info = read_shard_stream(source)
    start = second.first_sample * SEQ_LEN
    assert info == {"split": "val", "samples": second.num_samples}
    assert np.array_equal(read, stream[start : start + second.num_samples * SEQ_LEN + 1])


def test_bad_sources_give_one_line_errors(tmp_path, shard_dir):
    (tmp_path / "empty").mkdir()
    stray = tmp_path / "val-000000.tar"
    stray.write_bytes(b"not a tar file" * 10)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(EvaluationError, match=r"empty/manifest\.json: not found \(not a prepared dataset"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(EvaluationError, match=r"manifest\.json: not found"):
        open_source(str(stray))
    with pytest.raises(EvaluationError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_documents(open_source(str(bad_json))))
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir[0], copy)
    (copy / "val-000099.tar").write_bytes(b"x")
    with pytest.raises(EvaluationError, match="not a shard listed in the manifest.json beside it"):
        open_source(str(copy / "val-000099.tar"))
    manifest = load_manifest(copy)
    first = manifest.split("val").shards[0]
    path = copy / first.file
    token = int(read_shard_stream(open_source(str(copy)))[0][SEQ_LEN])
    # Sample 1 no longer begins with the last token of sample 0: first as damage on disk, which
    # its digest catches, then as a writer would leave it, digest rewritten to match.
    write_tokens(str(copy), "val", 1, 0, [token + 1], reseal=False)
    with pytest.raises(EvaluationError) as err:
        read_shard_stream(open_source(str(copy)))
    assert str(err.value) == (f"{path}: sample 1 (val sample 1) has token bytes that do not match their xxh3_64 "
                              f"digest (the shard changed after prepare wrote it); run `python -m data_pipeline "
                              f"verify {copy}`")
    write_tokens(str(copy), "val", 1, 0, [token + 1], reseal=True)
    with pytest.raises(EvaluationError, match=f"{path}: sample 1 does not begin with the last token of sample 0"):
        read_shard_stream(open_source(str(copy)))
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(EvaluationError, match=rf"{path}: sample 0 \(val sample 0\) is cut short: the shard ends at byte 1000"):
        read_shard_stream(open_source(str(copy)))


def test_evaluation_finds_the_data_pipelines_eos(tmp_path):
    names = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "<|eot|>", "<eot>", "[EOS]")
    assert set(names) <= set(EOS_CANDIDATES)
    for name in names:
        tokenizer = Tokenizer(models.WordLevel({"a": 0, "b": 1, name: 2}, unk_token="a"))
        tokenizer.add_special_tokens([name])
        tokenizer.save(str(tmp_path / "tokenizer.json"))
        codec = load_codec(str(tmp_path))
        info = describe(tokenizer.to_str(), None, "test")
        assert (codec.eos_token, codec.eos_id) == (info.eos_token, info.eos_id) == (name, 2)


# ---------------------------------------------------------------------- end to end
def test_cli_end_to_end(tmp_path, model_dir, codec, jsonl_file):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "evaluation.long_context", model_dir, "--lengths", "64,128", "--out", str(out),
           "--data", jsonl_file, "--trials", "2", "--target-tokens", "32", "--max-docs", "2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    cells = {(e["task"], e["haystack"], e["length"], e["depth"]) for e in results["retrieval"]}
    expected = {(t, h, n, d) for t in ("passkey", "niah") for h in ("synthetic", "real") for n in (64, 128) for d in (0.1, 0.5, 0.9)}
    assert cells == expected and len(results["retrieval"]) == len(expected)
    for entry in results["retrieval"]:
        assert 0.0 <= entry["token_acc"] <= 1.0 and 0.0 <= entry["exact_acc"] <= 1.0
        assert entry["trials"] == 2 and entry["nll"] > 0 and entry["seconds"] >= 0
    assert [(e["source"], e["length"]) for e in results["perplexity"]] == [("docs.jsonl", 64), ("docs.jsonl", 128)]
    for entry in results["perplexity"]:
        assert entry["tokens"] == 64 and entry["bytes"] > 0 and entry["documents"] == 2
        assert entry["ppl"] == pytest.approx(math.exp(entry["nll"])) and entry["bpb"] > 0
    meta = results["metadata"]
    assert meta["lengths"] == [64, 128] and meta["seed"] == 1234 and meta["config"]["preset"] == "tiny"
    assert meta["tokenizer"]["eos_token"] == EOS and meta["tokenizer"]["eos_id"] == codec.eos_id
    report = (out / "report.md").read_text()
    assert "| passkey | synthetic | 0.1 |" in report and "| docs.jsonl | bpb |" in report
    for name in ("perplexity.png", "retrieval.png"):
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_api_with_validation_shards(tmp_path, model_dir, shard_dir):
    directory, _ = shard_dir
    results = run_evaluation(
        model_dir, "64,128", str(tmp_path), data=directory, tasks=["niah", "perplexity"], haystacks=["real"],
        depths=[0.5], trials=1, target_tokens=16, max_docs=2, progress=False,
    )
    assert [(e["task"], e["haystack"], e["length"]) for e in results["retrieval"]] == [("niah", "real", 64), ("niah", "real", 128)]
    assert [e["length"] for e in results["perplexity"]] == [64, 128]
    assert results["metadata"]["data"][os.path.basename(directory)]["mode"] == "stream windows"
    assert os.path.isfile(tmp_path / "retrieval.png") and os.path.isfile(tmp_path / "perplexity.png")


def test_shards_of_another_tokenizer_are_refused(tmp_path, capsys, model_dir, shard_dir, corpus):
    directory, _ = shard_dir
    other = tmp_path / "other_model"
    shutil.copytree(model_dir, other)
    (other / "tokenizer.json").write_text(train_bpe(corpus[:2], 300).json_text, encoding="utf-8")
    model_sha = hashlib.sha256((other / "tokenizer.json").read_bytes()).hexdigest()
    shards_sha = load_manifest(directory).tokenizer_sha256
    shard = os.path.join(directory, load_manifest(directory).split("val").shards[0].file)
    for data in (directory, shard):
        out = tmp_path / "out"
        assert main([str(other), "--lengths", "64", "--data", data, "--out", str(out), "--no-progress"]) == 2
        [line] = capsys.readouterr().err.splitlines()
        assert line == (f"error: {data}: tokenized with tokenizer sha256 {shards_sha[:12]} "
                        f"({directory}/tokenizer.json, per its manifest.json), but the model's {other}/tokenizer.json "
                        f"has sha256 {model_sha[:12]}; evaluate on data prepared with the model's tokenizer "
                        "(prepare --tokenizer MODEL_DIR)")
        assert not out.exists()
    # The same tokenizer written again with other formatting is the same tokenizer.
    (other / "tokenizer.json").write_text(Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")).to_str(pretty=False))
    assert hashlib.sha256((other / "tokenizer.json").read_bytes()).hexdigest() != shards_sha
    check_tokenizer(open_source(directory), load_codec(str(other)))
    # Without a tokenizer.json nothing says which tokenizer the model was trained with.
    (other / "tokenizer.json").unlink()
    assert main([str(other), "--lengths", "64", "--data", directory, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {other}/tokenizer.json: missing; ") and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["{missing}", "--lengths", "64"], "model directory not found"),
        (["{model}", "--lengths", "64,abc"], "bad length 'abc'"),
        (["{model}", "--lengths", "16"], "too short for retrieval"),
        (["{model}", "--lengths", "64k", "--data", "{data}", "--tasks", "perplexity"], "no document has"),
        (["{model}", "--lengths", "64", "--tasks", "perplexity"], "need held-out text"),
        (["{model}", "--lengths", "64", "--tasks", "passkey,sudoku"], "bad task sudoku"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, model_dir, jsonl_file, args, message):
    subs = {"{missing}": str(tmp_path / "nope"), "{model}": model_dir, "{data}": jsonl_file}
    argv = [subs.get(a, a) for a in args] + ["--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
