"""Checkpoints: DeepSpeed ZeRO shards plus per-rank loader/RNG state, a completion marker, retention."""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    """Checkpoint tag of optimizer step `step`."""
    return f"step_{step:08d}"


def rng_state() -> dict:
    """Capture every random generator this process uses."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore generators captured by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def complete_tags(root: str) -> list[str]:
    """Tags under `root` whose save finished on every rank, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if TAG_RE.match(t) and os.path.isfile(os.path.join(root, t, COMPLETE))]
    return sorted(tags)


def save(engine, root: str, step: int, client_state: dict, rank_state: dict, *, keep_last: int) -> str:
    """Save on every rank; mark complete only after all ranks wrote; keep the newest `keep_last`."""
    tag = tag_for(step)
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    _atomic_torch_save(rank_state, os.path.join(root, tag, f"rank_state_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        _atomic_write_text(os.path.join(root, tag, COMPLETE), f"{step}\n")
        # The `latest` file lets DeepSpeed's own tools (zero_to_fp32) find this checkpoint.
        _atomic_write_text(os.path.join(root, "latest"), tag)
        for old in complete_tags(root)[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return tag


def find_resume(root: str, resume: str) -> str | None:
    """Return the checkpoint tag directory to resume from: "auto" (newest complete), "none", or a PATH."""
    if resume == "none":
        return None
    if resume == "auto":
        tags = complete_tags(root)
        return os.path.join(root, tags[-1]) if tags else None
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return path
    tags = complete_tags(path)
    if tags:
        return os.path.join(path, tags[-1])
    raise ValueError(f"{resume}: not a complete checkpoint (no {COMPLETE} marker) nor a directory holding one")


def load(engine, tag_dir: str) -> tuple[dict, dict]:
    """Load engine state from `tag_dir`; return (client_state, this rank's loader/RNG state)."""
    root, tag = os.path.split(tag_dir.rstrip("/"))
    rank, world = dist.get_rank(), dist.get_world_size()
    rank_file = os.path.join(tag_dir, f"rank_state_{rank:05d}.pt")
    saved_world = len([f for f in os.listdir(tag_dir) if f.startswith("rank_state_")])
    if saved_world != world:
        raise ValueError(
            f"{tag_dir}: written by {saved_world} data-parallel ranks, this run has {world}; "
            "exact resume needs the same world size"
        )
    load_path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise ValueError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return client_state or {}, rank_state


def remove_incomplete(root: str) -> list[str]:
    """Delete tag directories left without a completion marker by an interrupted save."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for t in os.listdir(root):
        path = os.path.join(root, t)
        if TAG_RE.match(t) and not os.path.isfile(os.path.join(path, COMPLETE)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(t)
    return removed
