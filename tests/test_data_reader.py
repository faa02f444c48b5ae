"""The public shard reader: samples in order and by index, the token stream, structural checks."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from data_fixtures import synthetic_docs, write_jsonl, write_tokens

from data_pipeline import ShardError, SplitReader, load_manifest
from data_pipeline.prepare import prepare
from data_pipeline.shard_format import SampleLayout
from data_pipeline.verify import verify_dataset

SEQ_LEN = 16


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    corpus = write_jsonl(str(root / "c.jsonl"), synthetic_docs(120, seed=21))
    out = str(root / "data")
    prepare(inputs=[corpus], output=out, seq_len=SEQ_LEN, vocab_size=300, val_fraction=0.2,
            shard_mb=23 * SampleLayout(SEQ_LEN, np.dtype("<u2")).record_bytes / 2**20, progress=False)
    return out


@pytest.fixture
def copy(data_dir, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(data_dir, target)
    return target


def _write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_samples_in_order_match_reads_by_index(data_dir):
    manifest = load_manifest(data_dir)
    with SplitReader(manifest, "train") as reader:
        assert len(reader) == manifest.num_samples("train") and len(reader.shard_paths) >= 3
        ordered = list(reader.samples(doc_starts=True))
        assert [s.index for s in ordered] == list(range(len(reader)))
        for i in (0, 22, 23, len(reader) - 1):
            again = reader.sample(i, doc_starts=True)
            np.testing.assert_array_equal(again.tokens, ordered[i].tokens)
            np.testing.assert_array_equal(again.doc_starts, ordered[i].doc_starts)
        assert reader.sample(5).doc_starts is None
        assert [s.index for s in reader.samples(20, 26)] == list(range(20, 26))
        with pytest.raises(IndexError):
            reader.sample(len(reader))
    for sample in ordered:
        assert len(sample.tokens) == SEQ_LEN + 1 and sample.tokens.dtype == np.uint16
        starts = np.flatnonzero(sample.tokens == manifest.eos_id) + 1
        np.testing.assert_array_equal(sample.doc_starts[sample.doc_starts > 0], starts[starts <= SEQ_LEN])
    by_dir = [s.tokens.tolist() for s in SplitReader(data_dir, "val").samples()]
    by_manifest = [s.tokens.tolist() for s in SplitReader(manifest, "val").samples()]
    assert by_dir == by_manifest and by_dir


def test_token_stream_keeps_the_shared_token_once(data_dir):
    with SplitReader(data_dir, "train") as reader:
        samples = [s.tokens for s in reader.samples()]
        stream = reader.token_stream()
        assert len(stream) == len(samples) * SEQ_LEN + 1
        for i, tokens in enumerate(samples):
            np.testing.assert_array_equal(stream[i * SEQ_LEN: i * SEQ_LEN + SEQ_LEN + 1], tokens)
        part = reader.token_stream(3, 9)
        np.testing.assert_array_equal(part, stream[3 * SEQ_LEN: 9 * SEQ_LEN + 1])
        head = reader.token_stream(max_tokens=40)
        assert 40 <= len(head) < 40 + SEQ_LEN
        np.testing.assert_array_equal(head, stream[: len(head)])


def test_token_stream_refuses_samples_that_do_not_overlap(copy):
    manifest = load_manifest(copy)
    index = 30
    with SplitReader(manifest, "train") as reader:
        previous_last = int(reader.sample(index - 1).tokens[-1])
    path = write_tokens(copy, "train", index, 0, [(previous_last + 1) % 300], reseal=True)
    with SplitReader(copy, "train") as reader:
        assert len(reader.token_stream(0, index)) == index * SEQ_LEN + 1
        with pytest.raises(ShardError, match=f"{path}: sample 30 does not begin with the last token of sample 29"):
            reader.token_stream()


def test_check_sample_and_check_shard_name_what_is_wrong(copy):
    manifest = load_manifest(copy)
    layout = manifest.layout
    record = manifest.record_bytes
    reader = SplitReader(copy, "train")
    assert [reader.check_shard(i) for i in range(len(reader.shard_paths))] == [None] * len(reader.shard_paths)
    assert reader.check_sample(4) is None
    first, second = reader.shard_paths[:2]
    write_tokens(copy, "train", 4, 1, [300], reseal=True)
    write_tokens(copy, "train", 5, 1, [7], reseal=False)
    _write_at(first, 6 * record + layout.mask_offset + len(layout.mask_header), b"\xff")
    _write_at(first, 7 * record + 3, b"9")
    descr = layout.tokens_member_offset + 512 + layout.tokens_header.index(b"<u2")
    _write_at(first, 9 * record + descr, b"<u4")
    assert reader.check_sample(4) == "0000000004.tokens.npy: token id 300 is not below the vocabulary size 300"
    assert reader.check_sample(5) == "0000000005.tokens.npy: does not match its xxh3_64 digest"
    assert reader.check_sample(6) == "0000000006.doc_mask.npy: does not match its xxh3_64 digest"
    assert reader.check_sample(7) == "unexpected member '0009000007.doc_mask.npy' where '0000000007.doc_mask.npy' belongs"
    assert reader.check_sample(9) == ("0000000009.tokens.npy: .npy header does not match seq_len 16 and "
                                      "dtype uint16")
    _write_at(first, 11 * record + layout.tokens_member_offset + 124, b"00000000001")
    assert reader.check_sample(11) == "0000000011.tokens.npy: tar header gives 1 bytes, the layout 162"
    assert reader.check_shard(0) == reader.check_sample(4)
    with open(second, "r+b") as f:
        f.truncate(5 * record + 100)
    assert reader.check_shard(1) == "ends inside sample 28"
    with open(second, "r+b") as f:
        f.truncate(5 * record)
    assert reader.check_shard(1) == "holds 5 samples, manifest.json says 23"


def test_check_shard_sees_more_samples_than_listed(copy):
    path = os.path.join(copy, "manifest.json")
    with open(path) as f:
        raw = json.load(f)
    last = raw["splits"]["train"]["shards"][-1]
    last["num_samples"] -= 1
    raw["splits"]["train"]["num_samples"] -= 1
    with open(path, "w") as f:
        json.dump(raw, f)
    reader = SplitReader(copy, "train")
    key = f"{last['first_sample'] + last['num_samples']:010d}"
    assert reader.check_shard(len(reader.shard_paths) - 1) == (
        f"unexpected member '{key}.doc_mask.npy' after the {last['num_samples']} samples manifest.json lists")


def test_verify_says_where_a_damaged_shard_stops_matching(copy):
    manifest = load_manifest(copy)
    path = manifest.shard_paths("val")[0]
    _write_at(path, 2 * manifest.record_bytes + manifest.layout.tokens_offset, b"\x01")
    count, problems = verify_dataset(manifest)
    assert count == len(manifest.shard_paths("train")) + len(manifest.shard_paths("val"))
    [problem] = problems
    assert problem.startswith(f"{path}: sha256 ")
    first = manifest.split("val").shards[0].first_sample
    assert problem.endswith(f"; {first + 2:010d}.tokens.npy: does not match its xxh3_64 digest")


def test_importing_the_package_loads_neither_torch_nor_webdataset():
    code = ("import sys, data_pipeline, data_pipeline.encode; "
            "print(sorted({'torch', 'webdataset'} & set(sys.modules)))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
