"""Bad input: each kind is skipped and counted, named in one line, and fatal under strict."""

import gzip
import json
import logging
import os
import shutil

import pytest
from data_fixtures import decoded_documents, synthetic_docs, write_jsonl

from data_pipeline.errors import DataError, ShardError
from data_pipeline.loader import build_loader
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import prepare
from data_pipeline.verify import verify_dataset

SMALL = dict(seq_len=8, vocab_size=300, val_fraction=0.0, progress=False)

JSONL_CASES = [
    ("invalid_utf8", b'{"text": "caf\xe9 au lait"}', "invalid UTF-8 at byte 13"),
    ("malformed_json", b'{"text": "unterminated}', "malformed JSON"),
    ("malformed_json", b'["a", "list"]', "expected a JSON object"),
    ("missing_field", b'{"body": "no text here"}', "no 'text' field"),
    ("missing_field", b'{"text": 42}', "'text' is a int, not a string"),
    ("empty", b'{"text": "   \\n "}', "empty document"),
]


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _jsonl_with_bad_line(tmp_path, bad_line):
    good = synthetic_docs(9, seed=3)
    lines = [json.dumps({"text": d}).encode() for d in good]
    lines.insert(2, bad_line)
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path), good


@pytest.mark.parametrize("reason,bad_line,fragment", JSONL_CASES)
def test_bad_json_line_is_skipped_counted_and_named(tmp_path, caplog, reason, bad_line, fragment):
    path, good = _jsonl_with_bad_line(tmp_path, bad_line)
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        prepare(inputs=[path], output=out, **SMALL)
    corpus = load_manifest(out).corpus
    assert corpus["skipped"] == {reason: 1}
    assert corpus["num_documents_read"] == 10 and corpus["num_documents_used"] == 9
    [example] = corpus["skip_examples"][reason]
    assert example.startswith(f"{path}:3: ") and fragment in example
    warned = [w for w in _warnings(caplog) if path in w]
    assert len(warned) == 1 and f"{path}:3: " in warned[0] and fragment in warned[0]
    assert "\n" not in warned[0]
    got = decoded_documents(out, "train")
    assert got == good[: len(got)] and len(got) >= 8
    with pytest.raises(DataError) as e:
        prepare(inputs=[path], output=str(tmp_path / "strict"), strict=True, **SMALL)
    message = str(e.value)
    assert message.startswith(f"{path}:3: ") and fragment in message and "\n" not in message


def test_bad_text_files_are_skipped_counted_and_named(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = synthetic_docs(4, seed=4)
    for i, doc in enumerate(docs):
        (corpus / f"{i}.txt").write_text(doc, encoding="utf-8")
    (corpus / "1a.txt").write_bytes(b"fine start \xff\xfe then junk")
    (corpus / "2a.txt").write_bytes(b"")
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        prepare(inputs=[str(corpus)], output=out, **SMALL)
    corpus_stats = load_manifest(out).corpus
    assert corpus_stats["skipped"] == {"invalid_utf8": 1, "empty": 1}
    warned = _warnings(caplog)
    assert f"skipped {corpus / '1a.txt'}: invalid UTF-8 at byte 11" in warned
    assert f"skipped {corpus / '2a.txt'}: empty document" in warned
    assert decoded_documents(out, "train") == docs[: len(decoded_documents(out, "train"))]
    with pytest.raises(DataError, match=r"1a\.txt: invalid UTF-8 at byte 11 \(--strict\)"):
        prepare(inputs=[str(corpus)], output=str(tmp_path / "strict"), strict=True, **SMALL)


def test_empty_source_is_reported_and_strict_fails(tmp_path, caplog):
    good = write_jsonl(str(tmp_path / "good.jsonl"), synthetic_docs(6, seed=5))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        prepare(inputs=[good, str(empty), str(empty_dir)], output=out, allow_empty_inputs=True, **SMALL)
    corpus = load_manifest(out).corpus
    assert corpus["skipped"] == {"empty_source": 2}
    assert corpus["num_documents_read"] == 6
    assert [s["skipped"] for s in corpus["sources"]] == [{}, {"empty_source": 1}, {"empty_source": 1}]
    assert f"skipped {empty}: no documents found" in _warnings(caplog)
    with pytest.raises(DataError, match=r"empty\.jsonl: no documents found \(--strict\)"):
        prepare(inputs=[good, str(empty)], output=str(tmp_path / "s"), strict=True, allow_empty_inputs=True,
                **SMALL)
    with pytest.raises(DataError, match="no usable"):
        prepare(inputs=[str(empty)], output=str(tmp_path / "e"), allow_empty_inputs=True, **SMALL)


def test_truncated_gzip_source_keeps_what_was_readable(tmp_path, caplog):
    docs = synthetic_docs(300, seed=13)
    full = tmp_path / "full.jsonl.gz"
    with gzip.open(full, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        prepare(inputs=[str(cut)], output=out, **SMALL)
    corpus = load_manifest(out).corpus
    assert corpus["skipped"] == {"source_error": 1}
    assert 0 < corpus["num_documents_used"] < len(docs)
    [warning] = [w for w in _warnings(caplog) if str(cut) in w]
    assert warning.startswith(f"skipped {cut}: unreadable after line {corpus['num_documents_used']}")
    got = decoded_documents(out, "train")
    assert got == docs[: len(got)] and len(got) >= corpus["num_documents_used"] - 1


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    corpus = write_jsonl(str(root / "c.jsonl"), synthetic_docs(200, seed=6))
    out = str(root / "data")
    prepare(inputs=[corpus], output=out, seq_len=16, vocab_size=300, val_fraction=0.0,
            shard_mb=0.1, progress=False)
    return out


@pytest.fixture
def copy(dataset, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(dataset, target)
    return target


def _shard(copy, i):
    return os.path.join(copy, load_manifest(copy).split("train").shards[i].file)


def _read_all(copy):
    loader = build_loader(copy, batch_size=8, shuffle=False, num_epochs=1, drop_last=False)
    return sum(1 for _ in loader)


def test_truncated_shard_is_named_by_verify_and_loader(copy):
    path = _shard(copy, 1)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 3000)
    count, problems = verify_dataset(load_manifest(copy))
    assert len(problems) == 1 and count == len(load_manifest(copy).split("train").shards)
    assert problems[0].startswith(f"{path}: {size - 3000} bytes, manifest.json says {size}")
    assert "\n" not in problems[0]
    with pytest.raises(ShardError, match=f"{path}: {size - 3000} bytes, manifest.json says {size}"):
        build_loader(copy, batch_size=4)


def test_corrupt_shard_is_named_by_verify_and_loader(copy):
    path = _shard(copy, 0)
    layout = load_manifest(copy).layout
    with open(path, "r+b") as f:
        f.seek(3 * layout.record_bytes + layout.tokens_member_offset + 1)
        f.write(b"\x00garbage\x00" * 8)
    _, problems = verify_dataset(load_manifest(copy))
    assert len(problems) == 1 and problems[0].startswith(f"{path}: sha256 ")
    assert problems[0].endswith("; unexpected member '0' where '0000000003.tokens.npy' belongs")
    with pytest.raises(ShardError) as e:
        _read_all(copy)
    assert str(e.value) == (f"{path}: sample 3 (train sample 3) is not where manifest.json says (corrupt shard, "
                            f"or a manifest of other shards); run `python -m data_pipeline verify {copy}`")


def test_manifest_that_does_not_match_its_shards(copy):
    a, b = _shard(copy, 0), _shard(copy, 1)
    os.rename(a, a + ".x")
    os.rename(b, a)
    os.rename(a + ".x", b)
    _, problems = verify_dataset(load_manifest(copy))
    assert [p.split(":")[0] for p in problems] == [a, b]
    assert all("unexpected member" in p for p in problems)
    with pytest.raises(ShardError, match="not where manifest.json says"):
        _read_all(copy)
    with open(os.path.join(copy, "manifest.json"), "w") as f:
        f.write('{\n  "format": "atma-token-shards",\n  "version": 1,\n  oops\n}')
    with pytest.raises(DataError, match=r"manifest\.json:4: malformed JSON"):
        load_manifest(copy)
