"""Checkpoints: DeepSpeed ZeRO shards plus per-rank loader/RNG state, the run record, a completion marker,
retention, and loading at the same or (through the universal copy) another world size."""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"  # the folder of a run directory that holds the tags
TAG_RE = re.compile(r"^step_(\d{8})$")
RANK_STATE_RE = re.compile(r"^rank_state_(\d{5})\.pt$")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format


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


def save(engine, root: str, step: int, client_state: dict, rank_state: dict, *, keep_last: int,
         record: dict | None = None, files: tuple[str, ...] = ()) -> str:
    """Save on every rank; mark complete only after all ranks wrote; keep the newest `keep_last`.

    Rank 0 also writes the tag's run record (`run.json`) and copies `files` (the tokenizer) into
    the tag, before the completion marker. A tag of the same step left by an earlier run in this
    directory is removed first, so its marker never vouches for a half-written save.
    """
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0 and os.path.isdir(os.path.join(root, tag)):
        shutil.rmtree(os.path.join(root, tag))
    dist.barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    _atomic_torch_save(rank_state, os.path.join(root, tag, f"rank_state_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        if record is not None:
            from .contract import write_record

            write_record(os.path.join(root, tag), record)
        for path in files:
            shutil.copyfile(path, os.path.join(root, tag, os.path.basename(path)))
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


def damaged_files(tag_dir: str) -> list[str]:
    """The tag's torch files that are empty or cut short (a zip archive without its closing record), sorted."""
    damaged = []
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if not (name.endswith(".pt") and os.path.isfile(path)):
            continue
        with open(path, "rb") as f:
            head = f.read(4)
        if not head or (head == ZIP_MAGIC and not zipfile.is_zipfile(path)):
            damaged.append(path)
    return damaged


def _checksum_mismatch(path: str) -> bool:
    """Whether a torch archive's data disagrees with the CRC-32 checksums stored when it was written."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0:  # written without checksums (torch's compute_crc32 off): nothing to compare
                    continue
                with archive.open(info) as member:  # raises BadZipFile at the end on a mismatch
                    while member.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, EOFError, ValueError):
        return True
    return False


def corrupt_files(tag_dir: str, part: tuple[int, int] = (0, 1)) -> list[str]:
    """The tag's torch archives, among share `part` = (index, count) of them, whose data fails its stored checksums.

    torch.save stores a CRC-32 for every record but torch.load does not check it: a changed byte loads
    as a changed number. Reading every byte costs about a second per 2 GB, so ranks split the files.
    """
    index, count = part
    archives = []
    for name in sorted(os.listdir(tag_dir)):
        path = os.path.join(tag_dir, name)
        if name.endswith(".pt") and os.path.isfile(path):
            with open(path, "rb") as f:
                if f.read(4) == ZIP_MAGIC:
                    archives.append(path)
    return [path for path in archives[index::count] if _checksum_mismatch(path)]


def saved_world_size(tag_dir: str) -> int:
    """How many data-parallel ranks wrote the checkpoint (one loader/RNG state file each)."""
    return len([f for f in os.listdir(tag_dir) if RANK_STATE_RE.match(f)])


def load(engine, tag_dir: str, *, universal: bool = False) -> tuple[dict, dict]:
    """Load engine state from `tag_dir`; return (client_state, this rank's loader/RNG state).

    With `universal`, the engine (built with `checkpoint.load_universal`) reads the tag's
    universal copy, which any world size can load; rank r then continues from the loader and RNG
    state of saved rank r mod (saved world size): the loader position is the same global one on
    every rank.
    """
    root, tag = os.path.split(tag_dir.rstrip("/"))
    rank, world = dist.get_rank(), dist.get_world_size()
    saved_world = saved_world_size(tag_dir)
    if saved_world != world and not universal:
        raise ValueError(f"{tag_dir}: written by {saved_world} data-parallel ranks, this run has {world}; "
                         "load its universal copy (pretrain/universal.py)")
    if universal:
        from .universal import UNIVERSAL_DIR

        root, tag = tag_dir, UNIVERSAL_DIR
    load_path, client_state = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
    if load_path is None:
        raise ValueError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    rank_file = os.path.join(tag_dir, f"rank_state_{rank % saved_world:05d}.pt")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
    return client_state or {}, rank_state


def read_client_state(tag_dir: str) -> dict:
    """The state stored in the tag's rank-0 model-states file (DeepSpeed's plus the client state)."""
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    for name in names:
        path = os.path.join(tag_dir, name)
        if os.path.isfile(path):
            return torch.load(path, map_location="cpu", weights_only=False)
    raise FileNotFoundError(f"{os.path.join(tag_dir, names[0])}: missing (no rank-0 model states file)")


def legacy_record(tag_dir: str) -> dict:
    """The run-record fields a checkpoint written before tags carried run.json still has (client state)."""
    states = read_client_state(tag_dir)
    return {key: states[key] for key in ("step", "tokens_seen", "config", "model_config") if key in states}


def aside_name(name: str, stamp: str) -> str:
    """`checkpoints` -> `checkpoints-before-STAMP`; a file keeps its extension (`metrics-before-STAMP.jsonl`)."""
    stem, ext = os.path.splitext(name)
    return f"{stem}-before-{stamp}{ext}"


def move_aside(run_dir: str, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """Rename an earlier run's outputs in `run_dir` to `<name>-before-<time>`, one time for all; return the
    (old, new) names.

    Of `names`, the checkpoints folder moves when it holds complete tags, anything else when it exists.
    The time gets a counter when another start in the same second already used it.
    """
    def present(name):
        path = os.path.join(run_dir, name)
        return complete_tags(path) if name == CHECKPOINTS else os.path.lexists(path)

    moving = [name for name in names if present(name)]
    if not moving:
        return []
    stamp = base = time.strftime("%Y%m%d-%H%M%S")
    count = 1
    while any(os.path.lexists(os.path.join(run_dir, aside_name(name, stamp))) for name in moving):
        count += 1
        stamp = f"{base}-{count}"
    for name in moving:
        os.replace(os.path.join(run_dir, name), os.path.join(run_dir, aside_name(name, stamp)))
    return [(name, aside_name(name, stamp)) for name in moving]


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
