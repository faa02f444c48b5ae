"""The main job end to end at reduced size: every artifact a new user is pointed at exists and is valid."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
PNG = b"\x89PNG\r\n\x1a\n"


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
