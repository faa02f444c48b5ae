"""Corpus readers (text, JSON lines, gzip, parquet, saved datasets), mixing weights, splits."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import decoded_documents, synthetic_docs, write_jsonl

from data_pipeline.config import PrepareConfig
from data_pipeline.errors import DataError
from data_pipeline.manifest import load_manifest
from data_pipeline.mixing import iter_mixed, split_of
from data_pipeline.prepare import prepare
from data_pipeline.sources import resolve_sources

SMALL = dict(seq_len=8, vocab_size=300, val_fraction=0.0, progress=False)


def test_directory_of_mixed_formats_is_read_in_sorted_order(tmp_path):
    docs = synthetic_docs(12, seed=1)
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    write_jsonl(str(corpus / "a.jsonl"), docs[0:3])
    with gzip.open(corpus / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in docs[3:6]:
            f.write(json.dumps({"text": d}) + "\n")
    pq.write_table(pa.table({"text": docs[6:9]}), corpus / "c.parquet")
    (corpus / "d.txt").write_text(docs[9], encoding="utf-8")
    (corpus / "sub" / "e.md").write_text(docs[10], encoding="utf-8")
    (corpus / "ignored.csv").write_text("not,a,document\n")
    (corpus / ".hidden.txt").write_text("hidden")
    (corpus / "z.rst").write_text(docs[11], encoding="utf-8")
    out = str(tmp_path / "out")
    prepare(inputs=[str(corpus)], output=out, text_extensions=(".txt", ".md", ".rst"), **SMALL)
    got = decoded_documents(out, "train")
    expected = docs[0:10] + [docs[11], docs[10]]  # files of a directory come before its subdirectories
    assert got == expected[: len(got)] and len(got) >= len(expected) - 1
    corpus_stats = load_manifest(out).corpus
    assert corpus_stats["num_documents_read"] == 12 and corpus_stats["skipped"] == {}


def test_saved_hugging_face_dataset_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = synthetic_docs(8, seed=2)
    path = str(tmp_path / "saved")
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"content": docs}),
        "validation": datasets.Dataset.from_dict({"content": ["other words in a longer line"] * 3}),
    }).save_to_disk(path)
    out = str(tmp_path / "out")
    prepare(inputs=[path], output=out, text_field="content", **SMALL)
    got = decoded_documents(out, "train")
    assert got == docs[: len(got)] and len(got) >= 7
    out2 = str(tmp_path / "out2")
    prepare(inputs=[path], output=out2, text_field="content", hf_split="validation", **SMALL)
    assert load_manifest(out2).corpus["num_documents_used"] == 3


def _mixed(tmp_path, weights, seed=0):
    a = write_jsonl(str(tmp_path / "a.jsonl"), [f"a{i}" for i in range(10)])
    b = write_jsonl(str(tmp_path / "b.jsonl"), [f"b{i}" for i in range(200)])
    config = PrepareConfig(output=str(tmp_path / "o"), seq_len=8, inputs=[a, b], weights=weights,
                           seed=seed)
    return [m.record.origin for m in iter_mixed(resolve_sources(config.inputs, config.weights), config)]


def test_weights_repeat_and_subsample_deterministically(tmp_path):
    origins = _mixed(tmp_path, [2.0, 0.5])
    from_a = [o for o in origins if "a.jsonl" in o]
    from_b = [o for o in origins if "b.jsonl" in o]
    assert len(from_a) == 20 and len(set(from_a)) == 10
    assert 70 <= len(from_b) <= 130 and len(set(from_b)) == len(from_b)
    assert origins == _mixed(tmp_path, [2.0, 0.5])
    assert origins != _mixed(tmp_path, [2.0, 0.5], seed=1)
    assert "a.jsonl" in origins[0] and "b.jsonl" in origins[1]  # round robin


def test_split_is_a_stable_hash_of_the_document_key():
    keys = [f"doc-{i}" for i in range(4000)]
    val = [k for k in keys if split_of(k, 0.1, 0) == "val"]
    assert 300 < len(val) < 500
    assert val == [k for k in keys if split_of(k, 0.1, 0) == "val"]
    assert val != [k for k in keys if split_of(k, 0.1, 1) == "val"]


def test_missing_input_path_is_a_one_line_error(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="nope.jsonl: no such file") as e:
        prepare(inputs=[missing], output=str(tmp_path / "o"), **SMALL)
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "o" / "manifest.json")
