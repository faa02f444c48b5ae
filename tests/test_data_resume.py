"""Restartable prepare: a killed or failed run resumes without redoing finished shards."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from data_fixtures import dir_bytes, synthetic_docs

from data_pipeline.errors import DataError
from data_pipeline.prepare import prepare
from data_pipeline.tokenizer import train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = dict(seq_len=64, val_fraction=0.1, shard_mb=0.5, progress=False)
PROGRESS = "prepare.progress.json"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(train_bpe(synthetic_docs(300, seed=9), 300).json_text)
    return path


def _journal_shards(out):
    try:
        with open(os.path.join(out, PROGRESS), encoding="utf-8") as f:
            return [e["shard"]["file"] for e in json.load(f)["splits"].get("train", [])]
    except (OSError, ValueError):
        return []


def _stamps(out, names):
    return {n: (os.stat(os.path.join(out, n)).st_ino, os.stat(os.path.join(out, n)).st_mtime_ns)
            for n in names}


def test_killed_prepare_resumes_to_identical_output(tmp_path, tokenizer_file, caplog):
    lines = [json.dumps({"text": d}) + "\n" for d in synthetic_docs(3000, seed=10)]
    corpus = str(tmp_path / "corpus.jsonl")
    os.mkfifo(corpus)
    out = str(tmp_path / "out")
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_pipeline", "prepare", "--input", corpus, "--output", out,
         "--seq-len", "64", "--val-fraction", "0.1", "--shard-mb", "0.5",
         "--tokenizer", tokenizer_file, "--quiet"], cwd=ROOT, stdout=log, stderr=log)
    fifo = open(corpus, "w", encoding="utf-8")  # blocks until prepare opens the corpus
    fifo.writelines(lines[:1800])
    fifo.flush()
    deadline = time.monotonic() + 120
    while len(_journal_shards(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    threading.Thread(target=fifo.close, daemon=True).start()
    finished = _journal_shards(out)
    assert len(finished) >= 3, open(tmp_path / "log.txt").read()
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    before = _stamps(out, finished)

    os.remove(corpus)
    with open(corpus, "w", encoding="utf-8") as f:
        f.writelines(lines)
    with caplog.at_level(logging.INFO, logger="data_pipeline"):
        prepare(inputs=[corpus], output=out, tokenizer=tokenizer_file, **SETTINGS)
    assert any(r.getMessage().startswith("resuming: ") for r in caplog.records)
    assert _stamps(out, finished) == before, "finished shards were rewritten"

    reference = str(tmp_path / "reference")
    prepare(inputs=[corpus], output=reference, tokenizer=tokenizer_file, **SETTINGS)
    assert dir_bytes(out) == dir_bytes(reference)


def _corpus_dir(tmp_path, n):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(synthetic_docs(n, seed=11, min_words=40, max_words=200)):
        (corpus / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    return corpus


def test_strict_failure_keeps_finished_shards_and_resumes_after_the_fix(tmp_path, tokenizer_file):
    corpus = _corpus_dir(tmp_path, 400)
    bad = corpus / "zzzz.txt"
    bad.write_bytes(b"\xff not utf-8")
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"zzzz\.txt: invalid UTF-8 at byte 0 \(--strict\)"):
        prepare(inputs=[str(corpus)], output=out, tokenizer=tokenizer_file, strict=True, **SETTINGS)
    finished = _journal_shards(out)
    assert len(finished) >= 2
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    before = _stamps(out, finished)
    bad.unlink()
    prepare(inputs=[str(corpus)], output=out, tokenizer=tokenizer_file, **SETTINGS)
    assert _stamps(out, finished) == before
    reference = str(tmp_path / "reference")
    prepare(inputs=[str(corpus)], output=reference, tokenizer=tokenizer_file, **SETTINGS)
    assert dir_bytes(out) == dir_bytes(reference)


def test_resume_redoes_a_damaged_shard_and_refuses_other_settings(tmp_path, tokenizer_file, caplog):
    corpus = _corpus_dir(tmp_path, 400)
    bad = corpus / "zzzz.txt"
    bad.write_bytes(b"")
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match="empty document"):
        prepare(inputs=[str(corpus)], output=out, tokenizer=tokenizer_file, strict=True, **SETTINGS)
    bad.unlink()
    finished = _journal_shards(out)
    with open(os.path.join(out, finished[1]), "r+b") as f:
        f.seek(5000)
        f.write(b"damage")
    with pytest.raises(DataError, match=r"other settings \(seq_len\)"):
        prepare(inputs=[str(corpus)], output=out, tokenizer=tokenizer_file,
                **{**SETTINGS, "seq_len": 32})
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        prepare(inputs=[str(corpus)], output=out, tokenizer=tokenizer_file, **SETTINGS)
    assert any(f"redoing {finished[1]}: sha256" in r.getMessage() for r in caplog.records)
    reference = str(tmp_path / "reference")
    prepare(inputs=[str(corpus)], output=reference, tokenizer=tokenizer_file, **SETTINGS)
    assert dir_bytes(out) == dir_bytes(reference)
