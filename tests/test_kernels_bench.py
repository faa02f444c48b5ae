"""`python -m kernels.bench`: argument parsing, the FLOP convention, and the no-GPU exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernels import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults():
    args = bench.parse_args([])
    assert args.seq_lens == [2048, 8192, 32768]
    assert args.iters == 20 and args.json is None
    assert (args.heads, args.kv_heads, args.head_dim) == (8, 2, 128)


def test_options():
    args = bench.parse_args(["--seq-lens", "1024", "4096", "--iters", "3", "--json", "out.json", "--skip-memory"])
    assert args.seq_lens == [1024, 4096] and args.iters == 3 and args.json == "out.json"
    assert args.skip_memory and not args.skip_conv


@pytest.mark.parametrize("argv", [["--iters", "0"], ["--seq-lens", "0"], ["--heads", "8", "--kv-heads", "3"], ["--bogus"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2


def test_batch_and_flops_follow_the_stated_convention():
    assert [bench.batch_for(t) for t in (2048, 8192, 32768, 65536)] == [8, 2, 1, 1]
    fwd = bench.attention_flops(2, 8, 8192, 128, backward=False)
    assert fwd == 2 * 2 * 8 * 8192**2 * 128
    assert bench.attention_flops(2, 8, 8192, 128, backward=True) == pytest.approx(3.5 * fwd)


def test_no_gpu_returns_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--iters", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA" in err


def test_module_entry_point_without_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "kernels.bench", "--iters", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    help_proc = subprocess.run([sys.executable, "-m", "kernels.bench", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
    assert help_proc.returncode == 0 and "--seq-lens" in help_proc.stdout and "--json" in help_proc.stdout
