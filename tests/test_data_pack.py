"""Packing, the shard byte layout and the sample order, tested as pure functions."""

import numpy as np
import pytest

from data_pipeline.manifest import Manifest, SplitInfo
from data_pipeline.order import EpochOrder, permutation
from data_pipeline.pack import Packer
from data_pipeline.shard_format import SampleLayout, token_dtype
from data_pipeline.shard_writer import SplitWriter
from data_pipeline.split_reader import SplitReader


def _docs(seed, n, max_len=40, vocab=1000, eos=0):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        body = rng.integers(1, vocab, size=int(rng.integers(1, max_len)))
        docs.append(np.append(body, eos).astype(np.uint16))
    return docs


def _pack_all(docs, seq_len, start_sample=0):
    packer = Packer(seq_len, np.dtype(np.uint16), start_sample)
    samples = []
    for i, doc in enumerate(docs):
        samples += packer.add(i, doc)
    return packer, samples


@pytest.mark.parametrize("seq_len", [1, 7, 64, 200])
def test_samples_are_overlapping_windows_of_the_stream(seq_len):
    docs = _docs(0, 50)
    stream = np.concatenate(docs)
    packer, samples = _pack_all(docs, seq_len)
    assert len(samples) == (len(stream) - 1) // seq_len
    for i, sample in enumerate(samples):
        assert sample.index == i
        np.testing.assert_array_equal(sample.tokens, stream[i * seq_len: i * seq_len + seq_len + 1])
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    for sample in samples:
        first = sample.index * seq_len
        expected = starts[(starts >= first) & (starts <= first + seq_len)] - first
        np.testing.assert_array_equal(sample.doc_starts, expected)
    assert packer.stream_tokens == len(stream)
    assert packer.num_dropped_tokens == len(stream) - (len(samples) * seq_len + 1)


def test_resume_cursor_reproduces_the_remaining_samples():
    docs = _docs(1, 80)
    seq_len = 16
    _, full = _pack_all(docs, seq_len)
    cut = full[23]
    cursor = cut.resume
    packer = Packer(seq_len, np.dtype(np.uint16), start_sample=cut.index + 1)
    rest = []
    for i in range(cursor.doc, len(docs)):
        assert i != cursor.doc or len(docs[i]) == cursor.doc_tokens
        rest += packer.add(i, docs[i], skip=cursor.offset if i == cursor.doc else 0)
    assert [s.index for s in rest] == [s.index for s in full[24:]]
    for a, b in zip(rest, full[24:], strict=True):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.doc_starts, b.doc_starts)


def test_short_stream_gives_no_sample_and_counts_the_tail():
    packer, samples = _pack_all([np.array([5, 6, 0], dtype=np.uint16)], seq_len=8)
    assert samples == []
    assert packer.num_dropped_tokens == 3


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


@pytest.mark.parametrize("seq_len,dtype", [(64, np.uint16), (63, np.uint32), (1000, np.uint16)])
def test_written_tar_matches_the_fixed_record_layout(tmp_path, seq_len, dtype):
    layout = SampleLayout(seq_len, np.dtype(dtype).newbyteorder("<"))
    docs = [d.astype(dtype) + (70000 if dtype == np.uint32 else 0) for d in _docs(2, 60, 90)]
    for d in docs:
        d[-1] = 0
    packer = Packer(seq_len, layout.dtype)
    writer = SplitWriter(str(tmp_path), "train", layout, samples_per_shard=5)
    infos, samples = [], []
    for i, doc in enumerate(docs):
        for sample in packer.add(i, doc):
            samples.append((sample.tokens.copy(), sample.doc_starts.copy()))
            info = writer.write(sample)
            infos += [info] if info else []
    last = writer.close()
    infos += [last] if last else []
    manifest = Manifest(seq_len=seq_len, dtype=layout.dtype.name, vocab_size=2**20, eos_id=0,
                        eos_token="e", tokenizer_file="t", tokenizer_sha256="", tokenizer_origin="",
                        samples_per_shard=5, record_bytes=layout.record_bytes,
                        splits={"train": SplitInfo(0, len(samples), 0, 0, 0, tuple(infos))},
                        data_dir=str(tmp_path))
    with SplitReader(manifest, "train") as reader:
        assert [reader.check_shard(i) for i in range(len(infos))] == [None] * len(infos)
        for (tokens, starts), stored in zip(samples, reader.samples(doc_starts=True), strict=True):
            np.testing.assert_array_equal(stored.tokens, tokens)
            np.testing.assert_array_equal(stored.doc_starts, starts)


def test_permutation_is_deterministic_and_keyed():
    p = permutation(1000, 7, 0, 1)
    assert sorted(p.tolist()) == list(range(1000))
    np.testing.assert_array_equal(p, permutation(1000, 7, 0, 1))
    assert not np.array_equal(p, permutation(1000, 7, 1, 1))
    assert not np.array_equal(p, permutation(1000, 8, 0, 1))


@pytest.mark.parametrize("shuffle,window", [(False, 4), (True, 1), (True, 5), (True, 1000)])
def test_epoch_order_visits_every_sample_once(shuffle, window):
    sizes = np.array([5, 3, 7, 1, 9])
    order = EpochOrder(sizes, epoch=3, seed=11, shuffle=shuffle, window=window)
    shards, local = order.locate(np.arange(sizes.sum()))
    pairs = set(zip(shards.tolist(), local.tolist(), strict=True))
    assert pairs == {(s, i) for s, n in enumerate(sizes) for i in range(n)}
    if not shuffle:
        assert shards.tolist() == sorted(shards.tolist())
    again = EpochOrder(sizes, epoch=3, seed=11, shuffle=shuffle, window=window)
    np.testing.assert_array_equal(again.locate(np.arange(sizes.sum()))[1], local)
