"""Inputs of ``prepare``: a text field per input, inputs that yield no documents, unreachable hub datasets."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import decoded_documents, synthetic_docs, write_jsonl

from data_pipeline.cli import main as cli_main
from data_pipeline.errors import DataError
from data_pipeline.manifest import load_manifest
from data_pipeline.prepare import prepare
from data_pipeline.sources import resolve_sources, split_field
from data_pipeline.tokenizer import train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(seq_len=16, vocab_size=300, val_fraction=0.0, progress=False)


def _parquet(path, column, texts):
    pq.write_table(pa.table({"id": list(range(len(texts))), column: texts}), str(path))
    return str(path)


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_each_input_reads_its_own_text_field(tmp_path):
    man_docs, info_docs = synthetic_docs(6, seed=1), synthetic_docs(9, seed=2)
    man = write_jsonl(str(tmp_path / "man.jsonl"), man_docs, field="body")
    info = _parquet(tmp_path / "info.parquet", "content", info_docs)
    out = str(tmp_path / "out")
    result = _cli("prepare", "--input", f"{man}:body", f"{info}:content", "--output", out, "--seq-len", "16",
                  "--vocab-size", "300", "--val-fraction", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"15 of 15 documents ({man}:body 6 of 6, {info}:content 9 of 9)" in result.stdout
    manifest = load_manifest(out)
    assert [(s["input"], s["num_documents_used"]) for s in manifest.corpus["sources"]] == [
        (f"{man}:body", 6), (f"{info}:content", 9)]
    assert manifest.settings["inputs"] == [f"{man}:body", f"{info}:content"]
    # Round robin over the two inputs, every document whole except the last one's tail.
    interleaved = [d for pair in zip(man_docs, info_docs) for d in pair] + info_docs[len(man_docs):]
    got = decoded_documents(out, "train")
    assert got == interleaved[: len(got)] and len(got) >= len(interleaved) - 1


def test_an_input_without_documents_stops_before_any_work(tmp_path):
    good = write_jsonl(str(tmp_path / "good.jsonl"), synthetic_docs(6, seed=3))
    wrong_column = _parquet(tmp_path / "info.parquet", "content", synthetic_docs(4, seed=4))
    wrong_field = write_jsonl(str(tmp_path / "man.jsonl"), synthetic_docs(5, seed=5), field="body")
    blank = write_jsonl(str(tmp_path / "blank.jsonl"), ["  ", "\n", ""])
    out = tmp_path / "out"
    cases = [
        (wrong_column, f"{wrong_column}: yields no documents: all 4 records were skipped (missing_field 4: no column "
                       f"'text'); name its text field as {wrong_column}:FIELD or with --text-field; pass "
                       "--allow-empty-inputs to go on without it"),
        (wrong_field, f"{wrong_field}: yields no documents: all 5 records were skipped (missing_field 5: no 'text' "
                      f"field); name its text field as {wrong_field}:FIELD or with --text-field; pass "
                      "--allow-empty-inputs to go on without it"),
        (blank, f"{blank}: yields no documents: all 3 records were skipped (empty 3: empty document); pass "
                "--allow-empty-inputs to go on without it"),
        (f"{wrong_field}:title", f"{wrong_field}:title: yields no documents: all 5 records were skipped "
                                 f"(missing_field 5: no 'title' field); name its text field as {wrong_field}:FIELD "
                                 "or with --text-field; pass --allow-empty-inputs to go on without it"),
    ]
    for bad, message in cases:
        with pytest.raises(DataError) as err:
            prepare(inputs=[good, bad], output=str(out), **SMALL)
        assert str(err.value) == message
        assert not out.exists()
    result = _cli("prepare", "--input", good, wrong_column, "--output", str(out), "--seq-len", "16",
                  "--vocab-size", "300", "--val-fraction", "0", "--allow-empty-inputs", "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"6 of 10 documents ({good} 6 of 6, {wrong_column} 0 of 4)" in result.stdout


def test_a_pipe_without_documents_is_caught_at_the_end(tmp_path):
    good = write_jsonl(str(tmp_path / "good.jsonl"), synthetic_docs(6, seed=3))
    pipe = str(tmp_path / "pipe.jsonl")
    os.mkfifo(pipe)

    def feed():
        with open(pipe, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"body": d}) + "\n" for d in synthetic_docs(4, seed=6))

    tokenizer = str(tmp_path / "tokenizer.json")
    with open(tokenizer, "w", encoding="utf-8") as f:  # given: training one would read the pipe twice
        f.write(train_bpe(synthetic_docs(50, seed=7), 300).json_text)
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with pytest.raises(DataError) as err:
        prepare(inputs=[good, pipe], output=str(tmp_path / "out"), tokenizer=tokenizer,
                **{**SMALL, "vocab_size": None})
    writer.join(timeout=30)
    assert str(err.value) == (f"{pipe}: yields no documents: all 4 records were skipped (missing_field 4: {pipe}:1: "
                              f"no 'text' field); name its text field as {pipe}:FIELD or with --text-field; pass "
                              "--allow-empty-inputs to go on without it")


def test_a_field_suffix_is_never_confused_with_a_path_or_a_hub_name(tmp_path):
    colon = write_jsonl(str(tmp_path / "a:b.jsonl"), ["x"])
    plain = write_jsonl(str(tmp_path / "plain.jsonl"), ["x"])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert split_field(colon) == (colon, None)
    assert split_field(f"{colon}:body") == (colon, "body")
    assert split_field(f"{plain}:body") == (plain, "body")
    both = write_jsonl(f"{plain}:title", ["x"])  # plain.jsonl and plain.jsonl:title both exist
    assert split_field(both) == (both, None)
    assert split_field("hf:user/corpus") == ("hf:user/corpus", None)
    assert split_field("hf:user/corpus:content") == ("hf:user/corpus", "content")
    assert split_field("builtin:stdlib") == ("builtin:stdlib", None)
    [source] = resolve_sources([f"{plain}:body"], None, "text")
    assert (source.path, source.text_field, source.field_given) == (plain, "body", True)
    [source] = resolve_sources([plain], None, "content")
    assert (source.text_field, source.field_given) == ("content", False)
    for spec, message in [
        (f"{tmp_path}/missing.jsonl:body", "missing.jsonl:body: no such file or directory"),
        (f"{tmp_path}/a:b/c.jsonl", "a:b/c.jsonl: no such file or directory"),
        (f"{plain}:", "plain.jsonl:: no field name after ':'"),
        (f"{text}:body", "a text field applies to JSON lines, parquet and dataset inputs"),
    ]:
        with pytest.raises(DataError, match=message):
            resolve_sources([spec], None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline", ["unreachable endpoint", "HF_HUB_OFFLINE"])
def test_an_unreachable_hub_dataset_fails_at_once_with_its_cause(tmp_path, offline):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    if offline == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
        cause = "cannot read dataset (ConnectionError: Couldn't reach 'someone/corpus' on the Hub (OfflineModeIsEnabled))"
    else:
        endpoint = f"http://127.0.0.1:{_closed_port()}"
        env["HF_ENDPOINT"] = endpoint
        cause = (f"the Hugging Face hub at {endpoint} is unreachable ([Errno 111] Connection refused); to work "
                 "offline, save the dataset with `datasets` (save_to_disk) and give its directory")
    started = time.monotonic()
    result = _cli("prepare", "--input", "hf:someone/corpus:content", "--output", str(tmp_path / "out"),
                  "--seq-len", "16", "--vocab-size", "300", env=env, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: hf:someone/corpus:content: yields no documents: {cause}; pass --allow-empty-inputs to go on "
        "without it"]
    assert seconds < 25, f"took {seconds:.0f} s"


def test_a_file_with_an_ending_no_reader_takes_is_refused(tmp_path, capsys):
    files_read = (".jsonl, .jsonl.gz, .ndjson, .ndjson.gz, .parquet and text files (.txt, .md, as set by "
                  "--text-extensions)")
    array = tmp_path / "docs.json"
    array.write_text(json.dumps([{"text": d} for d in synthetic_docs(4, seed=1)]))
    table = tmp_path / "docs.csv"
    table.write_text("text\nhello\n")
    packed = tmp_path / "docs.jsonl.zst"
    packed.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(40)))
    out = tmp_path / "out"
    for path, message in [
        (array, f"unsupported file ending .json; files read: {files_read}; other inputs: a directory, a saved "
                "dataset, hf:NAME, builtin:stdlib"),
        (table, "unsupported file ending .csv; "),
        (packed, "unsupported compression .zst: only JSON lines are read compressed, with gzip (.jsonl.gz, "
                 f".ndjson.gz); decompress it first. Files read: {files_read}"),
        (f"recall:{table}", "unsupported file ending .csv; "),
    ]:
        code = cli_main(["prepare", "--input", str(path), "--output", str(out), "--seq-len", "16",
                         "--vocab-size", "300", "--quiet"])
        [line] = capsys.readouterr().err.splitlines()
        assert code == 2 and line.startswith(f"error: {str(path).removeprefix('recall:')}: {message}")
        assert not out.exists()
    # A directory's walk leaves such files out; a file without an ending is one text document;
    # --text-extensions names more text endings.
    (tmp_path / "notes").write_text("plain words")
    assert [s.kind for s in resolve_sources([str(tmp_path), str(tmp_path / "notes")], None)] == ["dir", "file"]
    (tmp_path / "notes.rst").write_text(" ".join(synthetic_docs(20, seed=2)))
    assert cli_main(["prepare", "--input", str(tmp_path / "notes.rst"), "--text-extensions", ".rst", "--output",
                     str(out), "--seq-len", "16", "--vocab-size", "300", "--quiet"]) == 0
    assert load_manifest(str(out)).corpus["num_documents_used"] == 1
    with pytest.raises(DataError, match="unsupported file ending .rst; "):
        resolve_sources([str(tmp_path / "notes.rst")], None)
