"""Resume on another number of ranks (2 -> 1 -> 2) through DeepSpeed's universal checkpoint: the same
global data position, the Adam moments carried over, the numbers of a same-size resume up to the order
of the gradient sums."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

BASE = ["--config", "pretrain/configs/tiny-cpu.yaml", "--set", "batch.tokens=512", "--set", "logging.val_every=0",
        "--set", "logging.progress=false", "--set", "data.shuffle=false", "--set", "train.precision=fp32",
        "--set", "checkpoint.every=3", "--set", "logging.tensorboard=false"]


def train(data, run_dir, steps, ranks):
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    args = [*BASE, "--data", data, "--run-dir", str(run_dir), "--max-steps", str(steps)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "pretrain.train", *args]
    else:
        from launch.commands import free_port

        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), "pretrain/train.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}


def moments(tag_dir):
    """Per-parameter fp32 weights and Adam moments of a checkpoint, merged over its ranks."""
    from pretrain.universal import convert

    zero = os.path.join(convert(str(tag_dir)), "zero")
    found = {}
    for name in os.listdir(zero):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            path = os.path.join(zero, name, f"{key}.pt")
            if os.path.isfile(path):
                value = torch.load(path, weights_only=False)
                found[name, key] = value["param"] if isinstance(value, dict) else value
    return found


def test_two_ranks_to_one_and_back_continue_the_same_run(tiny_shards, tmp_path, two_rank_run):
    # A "+" in the run directory (as in launch.compare's polar+mem) must not reach a regular expression.
    same, moved = tmp_path / "same-size", tmp_path / "resized+mem"
    # 3 steps on 2 ranks: a copy of the shared two-rank run, which ended with a checkpoint of step 3.
    shutil.copytree(two_rank_run, same)
    shutil.copytree(same, moved)

    out = train(tiny_shards, moved, 6, ranks=1)  # written by 2 ranks, continued by 1
    assert "was written by 2 data-parallel rank(s) and this run has 1: DeepSpeed's ds_to_universal" in out
    assert f"resumed from {moved}/checkpoints/step_00000003 at step 3 (1,536 tokens seen)" in out
    out = train(tiny_shards, moved, 9, ranks=2)  # written by 1 rank, continued by 2
    assert "was written by 1 data-parallel rank(s) and this run has 2" in out
    train(tiny_shards, same, 9, ranks=2)  # the reference: resumed at the same size

    reference, got = losses(same), losses(moved)
    assert sorted(got) == sorted(reference) == list(range(1, 10))
    for step in range(4, 10):
        # Same samples per step (the loader continues the global stream); only sum order differs.
        assert got[step] == pytest.approx(reference[step], rel=1e-5), (step, got, reference)

    # The optimizer state went through both conversions: the weights and the Adam moments at step 6
    # (and so the update of every step) match the same-size run, not a fresh optimizer's.
    a, b = moments(same / "checkpoints" / "step_00000006"), moments(moved / "checkpoints" / "step_00000006")
    assert a.keys() == b.keys() and len(a) > 100
    for key in a:
        # Relative to each tensor's scale: zero-initialised projections hold elements near 0.
        scale = a[key].abs().max().item()
        assert (b[key] - a[key]).abs().max().item() <= 1e-3 * scale, key
    record = json.loads((moved / "checkpoints" / "step_00000009" / "run.json").read_text())
    assert record["world_size"] == 2 and record["step"] == 9 and record["tokens_seen"] == 9 * 512
