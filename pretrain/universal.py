"""Resume on another number of data-parallel ranks through DeepSpeed's universal checkpoint.

A ZeRO checkpoint holds one optimizer partition per rank, so it loads only at the world size that
wrote it. DeepSpeed's `ds_to_universal` (ZeRO-1/2/3) merges the partitions into one file per
parameter (fp32 weights, Adam moments); an engine built with `checkpoint.load_universal` then
cuts out its own share at any world size. The conversion is written once, into the tag's
`universal/` folder, and reused by later resumes from that tag.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

UNIVERSAL_DIR = "universal"


def universal_path(tag_dir: str) -> str:
    """Where the universal copy of a checkpoint tag lives."""
    return os.path.join(tag_dir, UNIVERSAL_DIR)


def conversion_command(tag_dir: str, output: str | None = None) -> list[str]:
    """DeepSpeed's own command that writes the universal copy of `tag_dir`."""
    # --inject_missing_state: ZeRO-1/2 conversion wants the version record Megatron-style clients
    # store in their checkpoints; this trainer has no tensor or pipeline parallelism to describe there.
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", tag_dir,
            "--output_folder", output or universal_path(tag_dir), "--num_extract_workers", "1",
            "--num_merge_workers", "1", "--inject_missing_state"]


def convert(tag_dir: str) -> str:
    """Write `tag_dir/universal` unless it exists; raise RuntimeError with DeepSpeed's last lines on failure.

    The conversion writes into a temporary folder that is renamed when complete, so an
    interrupted conversion is redone rather than used.
    """
    final = universal_path(tag_dir)
    if os.path.isdir(final):
        return final
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # The output folder is given relative to the tag: DeepSpeed 0.19.8 builds a regular expression
    # from the output path unescaped, so a run directory such as `runs/polar+mem` would break the merge.
    tag_dir = os.path.abspath(tag_dir)
    proc = subprocess.run(conversion_command(tag_dir, os.path.basename(tmp)), capture_output=True, text=True,
                          cwd=tag_dir)
    # ds_to_universal also writes `latest_universal` beside its output folder; nothing here reads it.
    stray = os.path.join(tag_dir, "latest_universal")
    if os.path.isfile(stray):
        os.remove(stray)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"ds_to_universal failed on {tag_dir} (exit code {proc.returncode}): {tail}")
    os.replace(tmp, final)
    return final


def untie_step_counters(optimizer) -> int:
    """Give every optimizer state its own `step` tensor; return how many were shared.

    DeepSpeed 0.19.8's ZeRO-3 universal load assigns one `step` tensor to every parameter
    group; PyTorch's Adam then advances that counter once per group on each optimizer step and
    the bias correction of every group after the first goes wrong.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    seen, untied = set(), 0
    for state in inner.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
                untied += 1
            seen.add(id(step))
    return untied
