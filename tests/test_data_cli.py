"""The command line: help, prepare/inspect/verify end to end, one-line errors, bench smoke run."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
from data_fixtures import synthetic_docs, write_jsonl

from data_pipeline.bench import add_arguments, run_bench
from data_pipeline.cli import build_parser
from data_pipeline.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_help_explains_every_flag():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == {"prepare", "inspect", "verify", "bench"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    result = _cli("prepare", "--help")
    assert result.returncode == 0 and "--strict" in result.stdout and "--workers" in result.stdout


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    docs = synthetic_docs(60, seed=8)
    corpus = write_jsonl(str(root / "corpus.jsonl"), docs)
    out = str(root / "data")
    result = _cli("prepare", "--input", corpus, "--output", out, "--seq-len", "16",
                  "--vocab-size", "300", "--val-fraction", "0.2", "--shard-mb", "0.05", "--quiet")
    assert result.returncode == 0, result.stderr
    return out, corpus, docs, result


def test_prepare_prints_a_summary(prepared):
    out, _, _, result = prepared
    assert result.stdout.startswith(f"prepared {out}: ")
    assert "tokens/s" in result.stdout and result.stderr == ""


def test_inspect_shows_the_manifest_and_decodes_a_sample(prepared):
    out, _, docs, _ = prepared
    result = _cli("inspect", out, "--max-chars", "100000")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "documents start at [0" in result.stdout
    decoded = result.stdout.split("text:\n", 1)[1]
    assert decoded.startswith(docs[0][:10]) or decoded.startswith(docs[1][:10])


def test_verify_passes_then_names_a_damaged_shard(prepared, tmp_path):
    out, _, _, _ = prepared
    ok = _cli("verify", out)
    assert ok.returncode == 0 and ok.stdout.startswith("ok: ")
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    with open(os.path.join(copy, "manifest.json")) as f:
        splits = json.load(f)["splits"]
    shard = splits["train"]["shards"][0]["file"]
    num_shards = len(splits["train"]["shards"]) + len(splits["val"]["shards"])
    with open(os.path.join(copy, shard), "r+b") as f:
        f.truncate(1000)
    bad = _cli("verify", copy)
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {os.path.join(copy, shard)}: 1000 bytes")
    assert lines[1:] == [f"1 problem(s) in {num_shards} shards"]


def test_user_errors_are_one_line_without_traceback(prepared, tmp_path):
    out, corpus, _, _ = prepared
    again = _cli("prepare", "--input", corpus, "--output", out, "--seq-len", "16",
                 "--vocab-size", "300", "--val-fraction", "0.2", "--shard-mb", "0.05", "--quiet")
    assert again.returncode == 2
    assert again.stderr.strip() == (f"error: {out}: already holds a finished dataset "
                                    "(manifest.json); pass --overwrite to replace it")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n', encoding="utf-8")
    strict = _cli("prepare", "--input", str(bad), "--output", str(tmp_path / "o"),
                  "--seq-len", "8", "--vocab-size", "300", "--strict", "--quiet")
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert strict.stderr.count("\n") == 1
    assert strict.stderr.startswith(f"error: {bad}:2: malformed JSON")
    missing = _cli("inspect", str(tmp_path))
    assert missing.returncode == 2
    assert missing.stderr == f"error: {tmp_path / 'manifest.json'}: not found (not a prepared " \
                             "dataset, or prepare did not finish)\n"


def test_bench_runs_on_a_tiny_corpus(tmp_path, capsys):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), synthetic_docs(80, seed=12))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--input", corpus, "--vocab-size", "300", "--seq-len", "16",
                              "--workers", "1", "2", "--repeats", "1", "--batch-size", "4",
                              "--loader-workers", "0", "--loader-seconds", "0.2",
                              "--json", str(tmp_path / "bench.json")])
    figures = run_bench(args)
    budgets = figures["budgets"]
    assert set(budgets) == {"1", "2"}
    for budget in budgets.values():
        assert budget["encode_batch"]["median"] > 0 and budget["prepare"]["median"] > 0
        assert budget["rounds"][0]["ratio"] == pytest.approx(
            budget["rounds"][0]["prepare"] / budget["rounds"][0]["encode_batch"])
    loader = figures["loader"]["0"]
    assert loader["tokens_per_s"] == loader["checked"]["median"] > 0 and loader["unchecked"]["median"] > 0
    assert len(loader["rounds"]) == 10
    for r in loader["rounds"]:
        assert r["cost"] == pytest.approx(1 - r["checked"] / r["unchecked"])
    printed = capsys.readouterr().out
    assert "(a) tokenizers encode_batch" in printed and "(b) prepare" in printed
    assert "(c) loader" in printed and "cost of the checks: median" in printed
    with open(tmp_path / "bench.json") as f:
        assert json.load(f)["num_documents"] == 80


def test_an_interrupted_bench_keeps_the_figures_it_measured(tmp_path, monkeypatch):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), synthetic_docs(40, seed=12))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["--input", corpus, "--vocab-size", "300", "--seq-len", "16", "--workers", "1",
                              "--repeats", "1", "--loader-workers", "0", "2", "--json", str(out)])
    loaders = []

    def loader_checks(data_dir, args, num_workers):
        if loaders:
            raise KeyboardInterrupt  # Ctrl-C while the second loader is timed
        loaders.append(num_workers)
        return {"tokens_per_s": 1.0}

    monkeypatch.setattr("data_pipeline.bench._loader_checks", loader_checks)
    with pytest.raises(KeyboardInterrupt):
        run_bench(args)
    with open(out) as f:
        figures = json.load(f)
    assert set(figures["budgets"]) == {"1"} and figures["budgets"]["1"]["prepare"]["median"] > 0
    assert figures["loader"] == {"0": {"tokens_per_s": 1.0}}


def test_bench_loader_only(tmp_path, capsys):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), synthetic_docs(80, seed=12))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--input", corpus, "--vocab-size", "300", "--seq-len", "16", "--loader-only",
                              "--batch-size", "4", "--loader-workers", "0", "2", "--loader-seconds", "0.4",
                              "--loader-rounds", "2"])
    figures = run_bench(args)
    assert figures["budgets"] == {} and set(figures["loader"]) == {"0", "2"}
    printed = capsys.readouterr().out
    assert "(a)" not in printed and printed.count("without the per-sample checks") == 2


def test_inspect_without_the_tokenizer_and_output_on_a_file_are_one_line_errors(prepared, tmp_path, capsys):
    out, corpus, _, _ = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    tokenizer = copy / "tokenizer.json"
    verify = f"run `python -m data_pipeline verify {copy}`"
    tokenizer.write_text(tokenizer.read_text().replace('"a"', '"b"', 1))
    assert cli_main(["inspect", str(copy)]) == 2
    assert capsys.readouterr().err == f"error: {tokenizer}: sha256 does not match manifest.json; {verify}\n"
    tokenizer.unlink()
    assert cli_main(["inspect", str(copy)]) == 2
    assert capsys.readouterr().err == f"error: {tokenizer}: missing; {verify}\n"
    target = tmp_path / "afile"
    target.write_text("keep me")
    for output, message in [(target, "exists and is not a directory; --output names the directory the dataset "
                                     "is written to"),
                            (target / "sub", "cannot create the output directory (Not a directory)")]:
        assert cli_main(["prepare", "--input", corpus, "--output", str(output), "--seq-len", "16",
                         "--vocab-size", "300", "--quiet"]) == 2
        assert capsys.readouterr().err == f"error: {output}: {message}\n"
    assert target.read_text() == "keep me"


def test_prepare_that_yields_no_training_sample_is_an_error_and_leaves_no_dataset(prepared, tmp_path, capsys):
    tokenizer = os.path.join(prepared[0], "tokenizer.json")
    corpus = write_jsonl(str(tmp_path / "short.jsonl"), ["hello world", "tiny doc"])
    out = tmp_path / "out"
    args = ["prepare", "--input", corpus, "--output", str(out), "--quiet"]
    assert cli_main([*args, "--seq-len", "512", "--tokenizer", tokenizer, "--val-fraction", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}: no training samples: the train split's 2 documents hold ")
    assert err.endswith("fewer than the 513 of one sample (--seq-len 512 + 1); add text or lower --seq-len; "
                        "nothing was written\n") and err.count("\n") == 1
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli_main([*args, "--seq-len", "4", "--tokenizer", tokenizer, "--val-fraction", "0.999"]) == 2
    assert capsys.readouterr().err == (f"error: {out}: no training samples: none of the 2 usable documents fell "
                                       "into the train split (--val-fraction 0.999); add documents or lower "
                                       "--val-fraction; nothing was written\n")
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert cli_main([*args, "--seq-len", "4", "--vocab-size", "300", "--val-fraction", "0.999"]) == 2
    assert capsys.readouterr().err == "error: no usable training documents in the inputs\n"
    assert sorted(os.listdir(out)) == ["notes.txt"]


@pytest.mark.parametrize("flags, message", [
    (["--workers", "0"], "argument --workers: must be at least 1, got 0"),
    (["--workers", "2", "two"], "argument --workers: expected an integer, got 'two'"),
    (["--loader-workers", "-1"], "argument --loader-workers: must be at least 0, got -1"),
    (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--seq-len", "-4"], "argument --seq-len: must be at least 1, got -4"),
    (["--max-docs", "0"], "argument --max-docs: must be at least 1, got 0"),
    (["--vocab-size", "100"], "argument --vocab-size: must be at least 260, got 100"),
    (["--loader-rounds", "0"], "argument --loader-rounds: must be at least 1, got 0"),
    (["--loader-seconds", "0"], "argument --loader-seconds: must be a number above 0, got 0"),
    (["--loader-seconds", "inf"], "argument --loader-seconds: must be a number above 0, got inf"),
])
def test_bench_refuses_bad_numbers_while_parsing(flags, message, capsys, monkeypatch):
    monkeypatch.setattr("data_pipeline.bench.run_bench", lambda args: pytest.fail("bench ran"))
    with pytest.raises(SystemExit) as exit_:
        cli_main(["bench", *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m data_pipeline bench: error: {message}"
