"""Export a ZeRO checkpoint of a run to the standalone model layout (no DeepSpeed needed to load it).

    python -m pretrain.export RUN_DIR OUT_DIR [--tag latest|STEP] [--dtype fp32|bf16]

Writes OUT_DIR/model.safetensors (sharded above --max-shard-size), config.json, tokenizer.json
and export.json: step, tokens seen, the training seq_len, the sha256 of every weights file and the
provenance (run, tag, run name, code version, library versions). The model config and tokenizer
come from the checkpoint tag itself. Consolidation uses DeepSpeed's own `zero_to_fp32` in its
low-memory lazy mode: tensors are materialised one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys

import torch

from data_pipeline.journal import file_sha256
from model import AtmaConfig, AtmaForCausalLM
from model.persistence import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, check_state_dict, save_state_dict

from . import checkpoint as ckpt
from . import universal
from .accumulation import runs_bf16_optimizer
from .checkpoint import read_client_state  # noqa: F401  (re-exported: tests and tools read tags with it)
from .contract import read_record
from .hf_export import write_transformers_files

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOKENIZER_NAME = "tokenizer.json"
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# The rank-0 model states file of a tag, in the order checkpoint.read_client_state looks for it.
MODEL_STATES_NAMES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class ExportError(ValueError):
    """The run directory or checkpoint cannot be exported."""


def resolve_tag(run_dir: str, tag: str) -> str:
    """Map "latest" or a step number to an existing complete checkpoint tag."""
    root = os.path.join(run_dir, "checkpoints")
    tags = ckpt.complete_tags(root)
    if not tags:
        raise ExportError(f"{root}: no complete checkpoint to export")
    if tag == "latest":
        return tags[-1]
    wanted = ckpt.tag_for(int(tag)) if tag.isdigit() else tag
    if wanted not in tags:
        raise ExportError(f"{root}: no complete checkpoint {wanted} (have {', '.join(tags)})")
    return wanted


def consolidate(run_dir: str, tag: str, states: dict) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of the checkpoint (lazy ZeRO consolidation, DeepSpeed's BF16_Optimizer's fp32 weights,
    or the module for stage 0)."""
    stage = states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 0:
        return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    if runs_bf16_optimizer(states.get("ds_config", {})):
        return bf16_optimizer_weights(os.path.join(run_dir, "checkpoints", tag), states)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(os.path.join(run_dir, "checkpoints"), tag=tag, lazy_mode=True)


def bf16_optimizer_weights(tag_dir: str, states: dict) -> dict[str, torch.Tensor]:
    """The fp32 weights of a tag that DeepSpeed's BF16_Optimizer wrote (ZeRO-1 with fp32 gradient accumulation),
    whose optimizer states `zero_to_fp32` does not read: from DeepSpeed's universal copy of the tag (written into
    it once, as a resume on another number of ranks writes it), the module's own tensors for what has no copy."""
    try:
        zero = os.path.join(universal.convert(tag_dir), "zero")
    except RuntimeError as err:
        raise ExportError(str(err)) from None
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    for name in os.listdir(zero):
        path = os.path.join(zero, name, "fp32.pt")
        if os.path.isfile(path):
            tensors[name] = torch.load(path, map_location="cpu", weights_only=True)["param"]
    return tensors


def remove_weights(out_dir: str) -> None:
    """Delete weights an earlier export left in `out_dir` (a single file beside new shards would win on load)."""
    for name in os.listdir(out_dir):
        if name in (WEIGHTS_NAME, INDEX_NAME) or SHARD_RE.match(name):
            os.remove(os.path.join(out_dir, name))


def tag_model_config(tag_dir: str, record: dict | None, states: dict) -> AtmaConfig:
    """The model config the checkpoint was trained with: its run.json, else its client state."""
    data = (record or {}).get("model_config") or states.get("model_config")
    if not data:
        raise ExportError(f"{tag_dir}: the checkpoint records no model config (neither run.json nor client state)")
    return AtmaConfig.from_dict(data)


def provenance(run_dir: str, tag: str, record: dict | None, states: dict) -> dict:
    """Where the weights come from: run, tag, run name, code version and library versions at training time."""
    record = record or {}
    config = record.get("config") or states.get("config") or {}
    return {
        "run_dir": os.path.abspath(run_dir),
        "checkpoint": tag,
        "config_name": config.get("name"),
        "code_version": record.get("code_version"),
        "versions": record.get("versions"),
        "world_size": record.get("world_size"),
    }


def export(run_dir: str, out_dir: str, *, tag: str = "latest", dtype: str = "fp32",
           max_shard_bytes: int | None = 5 * 2**30) -> dict:
    """Export checkpoint `tag` of `run_dir` to `out_dir`; returns the export.json record.

    Everything comes from the tag itself (its run.json, client state and tokenizer copy), not from
    files the run directory rewrites at every start.
    """
    if not os.path.isdir(run_dir):
        raise ExportError(f"{run_dir}: run directory not found")
    checkpoints = os.path.realpath(os.path.join(run_dir, "checkpoints"))
    if os.path.commonpath([checkpoints, os.path.realpath(out_dir)]) == checkpoints:
        raise ExportError(f"{out_dir}: is or lies inside the run's checkpoints directory {checkpoints}; export to a "
                          f"directory outside it")
    tag = resolve_tag(run_dir, tag)
    tag_dir = os.path.join(run_dir, "checkpoints", tag)
    created = make_out_dir(out_dir)
    try:
        return _export(run_dir, tag, tag_dir, out_dir, dtype, max_shard_bytes)
    except BaseException:
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)  # made by this export, left empty: not left behind
        raise


def make_out_dir(out_dir: str) -> bool:
    """Create `out_dir` (before any heavy work) and check that it is writable; True when it was created."""
    created = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as err:
        raise ExportError(f"{out_dir}: cannot create the output directory ({err.strerror or err})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ExportError(f"{out_dir}: the output directory is not writable")
    return created


def read_states(tag_dir: str) -> dict:
    """The tag's rank-0 model states; ExportError naming the file when it is missing or unreadable."""
    try:
        return ckpt.read_client_state(tag_dir)
    except FileNotFoundError as err:
        raise ExportError(str(err)) from None
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError):
        path = next(p for p in (os.path.join(tag_dir, n) for n in MODEL_STATES_NAMES) if os.path.isfile(p))
        raise ExportError(f"{path}: cannot be read (empty, truncated or damaged); export another checkpoint "
                          f"with --tag STEP") from None


def _export(run_dir: str, tag: str, tag_dir: str, out_dir: str, dtype: str, max_shard_bytes: int | None) -> dict:
    """The export of one resolved tag into an existing `out_dir`."""
    states = read_states(tag_dir)
    corrupt = ckpt.corrupt_files(tag_dir)
    if corrupt:
        raise ExportError(f"{corrupt[0]}: its data does not match the checksums stored when it was saved (the file "
                          f"was changed or damaged since); export another checkpoint with --tag STEP")
    record = read_record(tag_dir)
    config = tag_model_config(tag_dir, record, states)
    lazy = consolidate(run_dir, tag, states)
    with torch.device("meta"):
        skeleton = AtmaForCausalLM(config)
    expected = skeleton.state_dict()
    target = DTYPES[dtype]
    tensors = {}
    for name in expected:
        if name not in lazy:
            continue
        t = lazy[name]
        t = t.contiguous() if hasattr(t, "contiguous") else t
        tensors[name] = t.to(target) if t.is_floating_point() else t
    check_state_dict(expected, tensors, tag_dir)
    remove_weights(out_dir)
    weight_files = save_state_dict(tensors, out_dir, max_shard_bytes=max_shard_bytes)
    config.save(os.path.join(out_dir, CONFIG_NAME))
    tokenizer = next((p for p in (os.path.join(tag_dir, TOKENIZER_NAME), os.path.join(run_dir, TOKENIZER_NAME))
                      if os.path.isfile(p)), None)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(out_dir, TOKENIZER_NAME))
    write_transformers_files(out_dir)
    # None for a checkpoint written before tags carried run.json.
    seq_len = (record or {}).get("seq_len")
    result = {
        "source_run": os.path.abspath(run_dir),
        "checkpoint": tag,
        "step": int(states.get("step", -1)),
        "tokens_seen": int(states.get("tokens_seen", -1)),
        "seq_len": seq_len,
        "dtype": dtype,
        "num_parameters": skeleton.num_parameters(),
        "weights_sha256": {name: file_sha256(os.path.join(out_dir, name)) for name in weight_files},
        "provenance": provenance(run_dir, tag, record, states),
    }
    with open(os.path.join(out_dir, "export.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    return result


def parse_size(text: str) -> int | None:
    """Parse "5GB", "500MB", "1.5GB", a number of bytes, or "0" (no sharding) into bytes; ValueError otherwise."""
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    text = text.strip().upper()
    if text in ("0", "NONE"):
        return None
    number, factor = text, 1
    for unit, size in units.items():
        if text.endswith(unit):
            number, factor = text[: -len(unit)], size
            break
    value = int(float(number) * factor) if factor > 1 else int(number)
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def shard_size(text: str) -> int | None:
    """argparse type of --max-shard-size."""
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or a number of bytes (0: no "
                                         f"sharding), got {text!r}") from None


def main(argv=None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m pretrain.export",
        description="Consolidate a run's ZeRO checkpoint into model.safetensors + config.json + tokenizer.json "
        "(loadable with model.AtmaForCausalLM.from_pretrained, no DeepSpeed needed).",
    )
    p.add_argument("run_dir", help="run directory written by pretrain.train")
    p.add_argument("out_dir", help="where to write the exported model")
    p.add_argument("--tag", default="latest", help="'latest' or a step number (default: latest)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default: fp32)")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB",
                   help="shard model.safetensors above this size: 5GB, 500MB, 1.5GB or bytes (0: never; "
                        "default: 5GB)")
    args = p.parse_args(argv)
    try:
        record = export(args.run_dir, args.out_dir, tag=args.tag, dtype=args.dtype,
                        max_shard_bytes=args.max_shard_size)
    except (ExportError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {record['checkpoint']} (step {record['step']}, {record['tokens_seen']:,} tokens) "
          f"to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
