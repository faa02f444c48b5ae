"""Save and load models as safetensors + config.json, with one-line errors naming the bad file."""

from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import AtmaConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A model directory is missing a file or holds a file that does not fit the model."""


def _atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most `max_shard_bytes` (one tensor may exceed it)."""
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def save_state_dict(state: dict[str, torch.Tensor], directory: str, *, max_shard_bytes: int | None = None) -> list[str]:
    """Write tensors as model.safetensors, or as shards plus an index above `max_shard_bytes`."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    meta = {"format": "pt"}
    if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
        _atomic_save(tensors, os.path.join(directory, WEIGHTS_NAME), meta)
        return [WEIGHTS_NAME]
    groups = plan_shards(sizes, max_shard_bytes)
    files, weight_map = [], {}
    for i, names in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _atomic_save({n: tensors[n] for n in names}, os.path.join(directory, fname), meta)
        weight_map.update({n: fname for n in names})
        files.append(fname)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return files


def save_model(model, directory: str, *, max_shard_bytes: int | None = None) -> None:
    """Write a model's weights and config.json to `directory`."""
    save_state_dict(model.state_dict(), directory, max_shard_bytes=max_shard_bytes)
    model.config.save(os.path.join(directory, CONFIG_NAME))


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def load_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """Read all tensors of a model directory (single file or sharded with an index)."""
    single = os.path.join(directory, WEIGHTS_NAME)
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.isfile(single):
        return _read_safetensors(single)
    if not os.path.isfile(index_path):
        raise CheckpointError(f"{single}: missing (no weights file and no {INDEX_NAME})")
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_path}: not a valid shard index ({err})") from None
    state = {}
    for fname in sorted(set(weight_map.values())):
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (listed in {INDEX_NAME})")
        state.update(_read_safetensors(path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but not found in shards: {', '.join(missing[:5])}")
    return state


def _short(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming `source` unless `found` has exactly the expected names and shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {_short(missing)}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {_short(unexpected)}")
    for name, ref in expected.items():
        if tuple(found[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(found[name].shape)}, the config expects {tuple(ref.shape)}"
            )


def load_model(cls, directory: str, *, map_location="cpu"):
    """Build `cls` from directory/config.json and load its safetensors weights exactly."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: model directory not found")
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: missing")
    try:
        config = AtmaConfig.load(config_path)
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(str(err)) from None
    model = cls(config)
    state = load_state_dict(directory)
    source = os.path.join(directory, WEIGHTS_NAME if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)) else INDEX_NAME)
    check_state_dict(model.state_dict(), state, source)
    model.load_state_dict(state, strict=True)
    return model.to(map_location)
