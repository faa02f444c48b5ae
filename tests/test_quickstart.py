"""The main job end to end at reduced size: every artifact a new user is pointed at exists and is valid."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from helpers import write_finished_manifest
from launch import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quickstart_produces_every_artifact(tmp_path):
    out = tmp_path / "qs"
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "launch.quickstart", "--out", str(out), "--steps", "4", "--max-docs", "60",
           "--seq-len", "64", "--vocab-size", "512", "--batch-tokens", "1024", "--micro-batch", "4",
           "--eval-multiples", "1,2", "--trials", "1", "--no-progress"]
    with socket.socket() as busy:
        # DeepSpeed's default rendezvous port is taken (another run on this machine): the quickstart uses a free one.
        try:
            busy.bind(("127.0.0.1", 29500))
            busy.listen()
        except OSError:
            pass  # taken by another process already: the same situation
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in proc.stdout
    assert "Report:" in proc.stdout and "tensorboard --logdir" in proc.stdout

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["seq_len"] == 64 and manifest["splits"]["train"]["num_samples"] > 0
    assert any(f.startswith("train-") and f.endswith(".tar") for f in os.listdir(out / "shards"))

    ckpts = out / "run" / "checkpoints"
    assert (ckpts / "step_00000004" / "COMPLETE").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "run" / "tensorboard"))
    acc.Reload()
    assert {"loss/total", "loss/lm", "lr", "perf/tokens_per_s", "loss/val"} <= set(acc.Tags()["scalars"])

    from model import AtmaForCausalLM

    model = AtmaForCausalLM.from_pretrained(str(out / "exported"))
    assert model.config.vocab_size >= 512
    assert json.loads((out / "exported" / "export.json").read_text())["step"] == 4
    assert (out / "exported" / "tokenizer.json").exists()

    results = json.loads((out / "eval" / "results.json").read_text())
    assert len(results["retrieval"]) == 2 * 2 * 2 * 3  # tasks x haystacks x lengths x depths
    assert {r["length"] for r in results["perplexity"]} == {64, 128}
    for png in ("perplexity.png", "retrieval.png"):
        data = (out / "eval" / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    assert (out / "eval" / "report.md").read_text().strip()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training"]["steps"] == 4 and summary["timings"]["total_s"] > 0
    assert (out / "README.md").exists()


def _must_not_run(*args, **kwargs):
    raise AssertionError("a bad flag reached the pipeline")


@pytest.mark.parametrize("argv, message", [
    (["--seq-len", "0"], "argument --seq-len: must be at least 1, got 0"),
    (["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (["--max-docs", "-3"], "argument --max-docs: must be at least 1, got -3"),
    (["--batch-tokens", "x"], "argument --batch-tokens: expected an integer, got 'x'"),
    (["--micro-batch", "0"], "argument --micro-batch: must be at least 1, got 0"),
    (["--ranks", "0"], "argument --ranks: must be at least 1, got 0"),
    (["--trials", "0"], "argument --trials: must be at least 1, got 0"),
    (["--vocab-size", "100"], "argument --vocab-size: must be at least 260, got 100"),
    (["--eval-multiples", "1,0"], "argument --eval-multiples: expected comma-separated positive integers"),
])
def test_bad_flags_stop_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(quickstart, "run_prepare", _must_not_run)
    with pytest.raises(SystemExit) as stop:
        quickstart.main(["--out", str(tmp_path / "qs"), *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


def test_a_batch_that_does_not_split_stops_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(quickstart, "run_prepare", _must_not_run)
    argv = ["--out", str(tmp_path / "qs"), "--batch-tokens", "1000", "--ranks", "2"]
    assert quickstart.main(argv) == 2
    assert capsys.readouterr().err.strip() == ("error: --batch-tokens 1000 is not a multiple of --micro-batch (8) x "
                                               "--seq-len (256) x ranks (2) = 4096")
    assert not (tmp_path / "qs").exists()


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as stop:
        quickstart.parse_args(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--vocab-size", 2048), ("--batch-tokens", 8192), ("--micro-batch", 8),
                          ("--eval-multiples", "1,2,4,8"), ("--seq-len", 256)):
        assert re.search(rf"{flag} [A-Z_]+ ((?! --[a-z0-9-]+ [A-Z_]+ ).)*\(default: {default}\)", text), flag


def test_shards_prepared_with_other_settings_are_refused_not_reused(tmp_path, capsys):
    shards = tmp_path / "qs" / "shards"
    write_finished_manifest(str(shards), 64, vocab_size=512, max_docs=200)
    manifest = (shards / "manifest.json").read_text()
    argv = ["--out", str(tmp_path / "qs"), "--ranks", "1", "--batch-tokens", "1024", "--micro-batch", "4"]
    assert quickstart.main(argv + ["--seq-len", "128", "--vocab-size", "512", "--max-docs", "200"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {shards} was prepared with --seq-len 64, not --seq-len 128; use another --out or "
                   f"remove {shards}")
    assert quickstart.main(argv + ["--seq-len", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "prepared with --vocab-size 512, --max-docs 200, not --vocab-size 2048, --max-docs 400;" in err
    assert os.listdir(shards) == ["manifest.json"] and (shards / "manifest.json").read_text() == manifest
    wanted = {"--seq-len": ("seq_len", 64), "--vocab-size": ("vocab_size", 512), "--max-docs": ("max_docs", 200)}
    assert quickstart.finished_shards(str(shards), wanted)
    assert not quickstart.finished_shards(str(tmp_path / "none"), wanted)


def test_a_run_started_with_other_flags_is_refused_not_resumed(tmp_path, capsys, monkeypatch):
    out = tmp_path / "qs"
    argv = ["--out", str(out), "--ranks", "1", "--batch-tokens", "1024", "--micro-batch", "4", "--steps", "6"]
    started = []
    monkeypatch.setattr(quickstart, "run_prepare", lambda args, shards: {})

    def stop_at_training(args, shards, run_dir, *rest, **kwargs):
        started.append(json.loads((out / "run" / quickstart.RUN_SETTINGS_FILE).read_text()))
        raise SystemExit(130)

    monkeypatch.setattr(quickstart, "run_pretrain", stop_at_training)
    with pytest.raises(SystemExit):
        quickstart.main(argv)
    assert started == [{"--seq-len": 256, "--vocab-size": 2048, "--max-docs": 400, "--steps": 6,
                        "--batch-tokens": 1024}]
    with pytest.raises(SystemExit):  # the same flags, or another --micro-batch / --ranks: resumed
        quickstart.main(argv + ["--micro-batch", "2", "--ranks", "2"])
    assert len(started) == 2 and started[1] == started[0]
    monkeypatch.setattr(quickstart, "run_prepare", _must_not_run)
    assert quickstart.main(argv + ["--steps", "9", "--batch-tokens", "2048"]) == 2
    run = out / "run"
    assert capsys.readouterr().err == (f"error: {run} was trained with --steps 6, --batch-tokens 1024, not --steps 9, "
                                       f"--batch-tokens 2048; rerun with --steps 6, --batch-tokens 1024 to continue "
                                       f"it, or use another --out or remove {run} to start fresh\n")
    quickstart.check_run_settings(str(run), started[0])
    quickstart.check_run_settings(str(tmp_path / "none"), {"--steps": 1})
