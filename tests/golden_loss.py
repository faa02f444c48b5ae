"""Golden losses of the CPU debug run: the first 20 optimizer-step losses on built-in shards.

    python tests/golden_loss.py --write     # regenerate tests/assets/losses/tiny-cpu.txt
    python tests/golden_loss.py             # compare a fresh run with the file (exit 1 on a mismatch)

A pure refactor must reproduce these numbers; regenerate the file only for a change that is meant
to alter training numerics, and say why in the commit message. The run is one process, fp32 on the
CPU, ZeRO-3 through DeepSpeed, the `tiny-cpu` run config and a fixed sample order.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_FILE = os.path.join(ROOT, "tests", "assets", "losses", "tiny-cpu.txt")
NUM_STEPS = 20
# Relative tolerance: fp32 CPU runs repeat bit for bit on one machine; the slack covers other CPUs
# and library builds, far below what a change in the model, loss or optimizer moves.
RTOL = 1e-4
# The built-in shards the golden run reads (the `tiny_shards` test fixture prepares the same ones).
SHARDS = dict(seq_len=64, vocab_size=512, max_docs=200, val_fraction=0.1)
RUN_ARGS = ["--config", "pretrain/configs/tiny-cpu.yaml", "--set", "batch.tokens=512",
            "--set", "logging.val_every=0", "--set", "logging.progress=false", "--set", "data.shuffle=false",
            "--set", "train.precision=fp32", "--set", "checkpoint.every=1000", "--max-steps", str(NUM_STEPS)]


def prepare_shards(out: str) -> str:
    """Prepare the golden run's shards from the built-in corpus into `out`."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from data_pipeline.prepare import prepare

    prepare(output=out, progress=False, **SHARDS)
    return out


def data_id(shards: str) -> str:
    """Identity of the training split (hash of its shards' sha256 values)."""
    from data_pipeline.loader import build_loader

    return build_loader(shards, batch_size=1).dataset.data_id


def run_losses(shards: str, run_dir: str) -> list[float]:
    """Train NUM_STEPS steps on `shards` into `run_dir` and return the logged total losses."""
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pretrain.train", *RUN_ARGS, "--data", shards, "--run-dir", run_dir]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"golden run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return read_losses(run_dir)


def read_losses(run_dir: str) -> list[float]:
    """The logged total losses of steps 1 to NUM_STEPS of a finished run in `run_dir`."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    by_step = {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}
    return [by_step[s] for s in range(1, NUM_STEPS + 1)]


def read_golden(path: str = GOLDEN_FILE) -> tuple[dict, list[float]]:
    """The header fields (`# key value` lines) and the losses (`step loss` lines) of a golden file."""
    header, losses = {}, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# ") and len(line.split()) == 3:
                _, key, value = line.split()
                header[key] = value
            elif line.strip() and not line.startswith("#"):
                step, loss = line.split()
                if int(step) != len(losses) + 1:
                    raise ValueError(f"{path}: step {step} out of order")
                losses.append(float(loss))
    return header, losses


def write_golden(path: str, shards_id: str, losses: list[float]) -> None:
    """Write the golden file: how to regenerate it, what it was made from, one `step loss` per line."""
    import deepspeed
    import torch

    lines = [
        "# Golden losses of the tiny-cpu debug run on built-in shards (tests/golden_loss.py).",
        "# Regenerate only for an intended numerics change: python tests/golden_loss.py --write",
        f"# data_id {shards_id}",
        f"# python {sys.version.split()[0]}",
        f"# torch {torch.__version__}",
        f"# deepspeed {deepspeed.__version__}",
    ]
    lines += [f"{step} {loss:.8f}" for step, loss in enumerate(losses, start=1)]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def mismatches(expected: list[float], got: list[float], rtol: float = RTOL) -> list[str]:
    """One line per step whose loss differs from the golden one by more than `rtol`."""
    if len(got) != len(expected):
        return [f"{len(got)} steps, the golden file has {len(expected)}"]
    return [f"step {s}: {g:.8f} vs golden {e:.8f}" for s, (e, g) in enumerate(zip(expected, got), start=1)
            if abs(g - e) > rtol * abs(e)]


def main(argv=None) -> int:
    """Regenerate (--write) or check the golden file."""
    p = argparse.ArgumentParser(prog="python tests/golden_loss.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="rewrite the golden file from a fresh run")
    p.add_argument("--file", default=GOLDEN_FILE, help="golden file (default: tests/assets/losses/tiny-cpu.txt)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        shards = prepare_shards(os.path.join(tmp, "shards"))
        losses = run_losses(shards, os.path.join(tmp, "run"))
        shards_id = data_id(shards)
    if args.write:
        write_golden(args.file, shards_id, losses)
        print(f"wrote {args.file}")
        return 0
    header, expected = read_golden(args.file)
    problems = mismatches(expected, losses)
    if header.get("data_id") != shards_id:
        problems.insert(0, f"the built-in shards differ (data_id {shards_id}, golden {header.get('data_id')})")
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
