"""prepare on a real corpus (a slice of the built-in one): round trip, determinism, readability."""

import json
import os
import subprocess

import numpy as np
import pytest
from data_fixtures import dir_bytes, stdlib_files, stored_samples, token_stream
from tokenizers import Tokenizer

from data_pipeline.errors import DataError
from data_pipeline.manifest import load_manifest
from data_pipeline.mixing import split_of
from data_pipeline.prepare import prepare
from data_pipeline.shard_format import sample_key

MAX_DOCS = 40
VAL_FRACTION = 0.15
SETTINGS = dict(seq_len=128, vocab_size=400, max_docs=MAX_DOCS, val_fraction=VAL_FRACTION,
                shard_mb=0.5, progress=False)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared") / "data")
    result = prepare(output=out, workers=1, **SETTINGS)
    return out, result


def _expected_docs():
    """The built-in corpus slice decoded independently of the pipeline, split by its rule."""
    docs = {"train": [], "val": []}
    for path, key in stdlib_files(MAX_DOCS):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            docs[split_of(key, VAL_FRACTION, 0)].append(text)
    return docs


@pytest.mark.parametrize("split", ["train", "val"])
def test_round_trip_decodes_to_the_source_documents(prepared, split):
    out, _ = prepared
    manifest = load_manifest(out)
    tokenizer = Tokenizer.from_file(manifest.tokenizer_path)
    eos = manifest.eos_id
    expected = _expected_docs()[split]
    samples = stored_samples(out, split)
    assert samples, "split has samples"
    stream = token_stream(out, split)
    ends = np.flatnonzero(stream == eos)
    complete = len(ends)
    assert 0 < complete <= len(expected)
    pieces = np.split(stream[: ends[-1] + 1], ends[:-1] + 1)
    for piece, doc in zip(pieces, expected[:complete], strict=True):
        assert tokenizer.decode(piece[:-1].tolist()) == doc
    sep = manifest.eos_token
    joined = tokenizer.decode(stream[: ends[-1] + 1].tolist(), skip_special_tokens=False)
    assert joined == sep.join(expected[:complete]) + sep
    tail = stream[ends[-1] + 1:].tolist()
    if complete < len(expected):
        assert tokenizer.encode(expected[complete]).ids[: len(tail)] == tail
    full_stream = sum(len(tokenizer.encode(d).ids) + 1 for d in expected)
    info = manifest.split(split)
    assert info.num_stream_tokens == full_stream
    assert info.num_documents == len(expected)
    assert info.num_dropped_tokens == full_stream - len(stream)
    doc_starts = np.concatenate([[0], ends + 1])
    mask_starts = np.unique(np.concatenate([s.doc_starts + s.index * manifest.seq_len for s in samples]))
    np.testing.assert_array_equal(mask_starts, doc_starts[doc_starts < len(stream)])


def test_manifest_counts_add_up(prepared):
    out, result = prepared
    manifest = load_manifest(out)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        raw = json.load(f)
    assert raw == json.loads(json.dumps(manifest.to_dict()))
    seq_len = manifest.seq_len
    assert manifest.dtype == "uint16" and raw["sample_tokens"] == seq_len + 1
    for split in ("train", "val"):
        info = manifest.split(split)
        shards = info.shards
        assert sum(s.num_samples for s in shards) == info.num_samples
        assert info.num_tokens == info.num_samples * seq_len
        assert all(s.num_samples == manifest.samples_per_shard for s in shards[:-1])
        for s in shards:
            assert os.path.getsize(os.path.join(out, s.file)) == s.bytes
    corpus = manifest.corpus
    assert corpus["num_documents_read"] == MAX_DOCS
    assert corpus["num_documents_used"] + sum(corpus["skipped"].values()) == MAX_DOCS
    used = manifest.split("train").num_documents + manifest.split("val").num_documents
    assert used == corpus["num_documents_used"]
    assert result.manifest.num_samples("train") == manifest.num_samples("train")
    assert len(manifest.split("train").shards) > 2


def test_output_is_identical_for_one_and_two_workers(prepared, tmp_path):
    out, _ = prepared
    other = str(tmp_path / "two")
    prepare(output=other, workers=2, **SETTINGS)
    assert dir_bytes(other) == dir_bytes(out)


def test_given_tokenizer_file_gives_the_same_shards(prepared, tmp_path):
    out, _ = prepared
    other = str(tmp_path / "given")
    settings = {**SETTINGS, "vocab_size": None}
    prepare(output=other, tokenizer=os.path.join(out, "tokenizer.json"), **settings)
    mine, theirs = dir_bytes(out), dir_bytes(other)
    assert {k for k in mine if k.endswith(".tar")} == {k for k in theirs if k.endswith(".tar")}
    for name in mine:
        if name != "manifest.json":
            assert mine[name] == theirs[name], name
    assert load_manifest(other).tokenizer_sha256 == load_manifest(out).tokenizer_sha256


def test_shards_read_by_tar_and_webdataset_match_our_reader(prepared):
    """The one check of the on-disk format that does not go through our reader."""
    import webdataset
    import xxhash

    out, _ = prepared
    manifest = load_manifest(out)
    first = manifest.split("train").shards[0]
    listing = subprocess.run(["tar", "-tf", os.path.join(out, first.file)], check=True,
                             capture_output=True, text=True).stdout.split()
    assert listing[:3] == ["0000000000.doc_mask.npy", "0000000000.tokens.npy", "0000000000.xxh3.npy"]
    assert len(listing) == 3 * first.num_samples
    urls = manifest.shard_paths("train")
    dataset = webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode()
    ours = stored_samples(out, "train")
    count = 0
    for sample, stored in zip(dataset, ours, strict=True):
        assert sample["__key__"] == sample_key(stored.index)
        np.testing.assert_array_equal(sample["tokens.npy"], stored.tokens)
        bits = np.unpackbits(sample["doc_mask.npy"])[: manifest.seq_len + 1]
        np.testing.assert_array_equal(np.flatnonzero(bits), stored.doc_starts)
        digests = [xxhash.xxh3_64_intdigest(sample[m].tobytes(), stored.index) for m in ("doc_mask.npy", "tokens.npy")]
        assert sample["xxh3.npy"].tolist() == digests
        count += 1
    assert count == len(ours) == manifest.num_samples("train")


def test_finished_output_is_never_silently_overwritten(prepared, tmp_path):
    out, _ = prepared
    before = dir_bytes(out)
    with pytest.raises(DataError, match="already holds a finished dataset"):
        prepare(output=out, workers=1, **SETTINGS)
    assert dir_bytes(out) == before
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    with open(os.path.join(copy, "train-000000.tar"), "wb") as f:
        f.write(b"stray")
    with pytest.raises(DataError, match="unknown run"):
        prepare(output=copy, workers=1, **SETTINGS)
    prepare(output=copy, workers=1, overwrite=True, **SETTINGS)
    assert dir_bytes(copy) == before
