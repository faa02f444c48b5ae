"""The run record each checkpoint tag carries, and the resume check that compares it with this run.

A tag's `run.json` holds what the numbers of that checkpoint depend on: the resolved run config,
the model config, the sequence length, the identity of the training data (shards, tokenizer),
the ZeRO stage and world size, the code version, the library versions and the kernel settings made
in the environment (`ATMA_*`). Resume compares the
record with the run being started and sorts every difference into one of three kinds:

- free: the field does not change what is computed from here on (paths, logging, profiling,
  checkpoint cadence, run length, micro-batch size, loader workers, activation recomputation, the
  non-finite loss policy, the init seed: a resumed run keeps its saved random state; the gradient
  clip while both runs use Muon, which never clips); listed in one notice;
- intended: the continued run computes something else (learning rate, schedule, loss weights,
  batch size, precision); refused unless `--allow-config-change KEY` names the key or its section;
- fixed: the checkpoint cannot continue at all (model shape, sequence length, data, optimizer
  kind, data order, ZeRO stage); refused, the ways forward are another run directory or
  `--resume none`.
"""

from __future__ import annotations

import json
import os

from .config import ConfigError

RECORD_NAME = "run.json"
RECORD_FORMAT = 1

# Run-config keys (or whole sections) whose change leaves the computation as it was.
FREE_KEYS = ("name", "run_dir", "deepspeed_config", "data.dir", "data.num_workers", "batch.micro_batch_size",
             "train.max_steps", "train.nan_policy", "train.max_skipped_steps", "train.activation_checkpointing",
             "train.activation_memory_budget", "train.seed", "train.init_from", "checkpoint", "logging", "profile")
# Keys of this invocation, never reported as changes.
INVOCATION_KEYS = ("checkpoint.resume", "checkpoint.allow_changes")
# Run-config keys a checkpoint cannot continue with once changed.
FIXED_KEYS = ("optim.name", "data.seed", "data.shuffle")
# Free only while both runs use Muon, which never clips (`pretrain.trainer.build_ds_config`).
FREE_UNDER_MUON = ("optim.grad_clip",)
# Compared through the resolved model config instead (the preset and overrides resolve into it).
MODEL_SECTION = "model"
FIXED_WAYS = "set it back, train in a new --run-dir, or pass --resume none to start over in this one"


def build_record(*, step: int, tokens_seen: int, config: dict, model_config: dict, data: dict, zero_stage: int,
                 world_size: int, code_version: dict, versions: dict, kernel_settings: dict | None = None) -> dict:
    """The record stored in every checkpoint tag (see the module docstring); `kernel_settings` are the kernel
    choices made in the environment (`kernels.common.kernel_settings`)."""
    return {
        "format": RECORD_FORMAT,
        "step": step,
        "tokens_seen": tokens_seen,
        "seq_len": data["seq_len"],
        "world_size": world_size,
        "zero_stage": zero_stage,
        "data": data,
        "config": config,
        "model_config": model_config,
        "code_version": code_version,
        "versions": versions,
        "kernel_settings": dict(kernel_settings or {}),
    }


def data_identity(manifest, data_id: str) -> dict:
    """What identifies the training data: its id, sequence length, tokenizer and shards."""
    split = manifest.split("train")
    return {
        "id": data_id,
        "seq_len": manifest.seq_len,
        "vocab_size": manifest.vocab_size,
        "tokenizer_sha256": manifest.tokenizer_sha256,
        "num_samples": split.num_samples,
        "shards": {s.file: s.sha256 for s in split.shards},
    }


def write_record(tag_dir: str, record: dict) -> None:
    """Write `run.json` into a tag directory atomically."""
    path = os.path.join(tag_dir, RECORD_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_record(tag_dir: str) -> dict | None:
    """The tag's `run.json`, or None for a checkpoint written before tags carried one."""
    path = os.path.join(tag_dir, RECORD_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable run record ({err}); resume from another tag with "
                          "--resume PATH, or pass --resume none to start over") from None


def flatten(tree: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; lists and scalars are leaves."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _under(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def check_allowed_keys(allowed: list[str], config: dict) -> None:
    """Raise ConfigError for an --allow-config-change name that is no run-config key or section."""
    keys = flatten(config)
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    for name in allowed:
        if name not in keys and name not in sections:
            raise ConfigError(f"--allow-config-change {name}: not a run config key or section "
                              "(e.g. optim.lr, schedule, loss.sig_weight)")


def _shown(value) -> str:
    return json.dumps(value) if not isinstance(value, float) else repr(value)


def _changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def describe_data_change(old: dict, new: dict) -> str:
    """Say what differs between two data identities: seq_len, tokenizer, shards added, removed or changed."""
    parts = []
    for key in ("seq_len", "vocab_size"):
        if old.get(key) != new.get(key):
            parts.append(f"{key} {old.get(key)} -> {new.get(key)}")
    if old.get("tokenizer_sha256") != new.get("tokenizer_sha256"):
        parts.append(f"tokenizer sha256 {str(old.get('tokenizer_sha256'))[:12]} -> "
                     f"{str(new.get('tokenizer_sha256'))[:12]}")
    before, after = old.get("shards") or {}, new.get("shards") or {}
    for label, names in (("shards added", sorted(set(after) - set(before))),
                         ("shards removed", sorted(set(before) - set(after))),
                         ("shards with other contents",
                          sorted(f for f in set(before) & set(after) if before[f] != after[f]))):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            parts.append(f"{label}: {shown}")
    if not parts:
        parts.append(f"data id {old.get('id')} -> {new.get('id')}")
    return "; ".join(parts)


def check_resume(saved: dict, current: dict, *, tag_dir: str, allowed: list[str]) -> list[str]:
    """Compare a tag's record with this run's; raise ConfigError on a refused change, else return notices.

    Args:
        saved: the tag's record (`read_record`, or the fields an older checkpoint kept).
        current: this run's record (`build_record` at the current step).
        tag_dir: the checkpoint, named in messages.
        allowed: run-config keys or sections named by --allow-config-change.
    Returns:
        Lines to print on rank 0: allowed changes, free changes, code and library changes.
    """
    where = f"checkpoint {tag_dir}"
    if saved.get("data") and saved["data"].get("id") != current["data"]["id"]:
        raise ConfigError(f"the training data differs from {where}: {describe_data_change(saved['data'], current['data'])}; "
                          f"a run continues only on the data it started with: point --data at those shards, "
                          f"train in a new --run-dir, or pass --resume none to start over in this one")
    fixed = []
    if saved.get("seq_len") is not None and saved["seq_len"] != current["seq_len"]:
        fixed.append(("seq_len", saved["seq_len"], current["seq_len"]))
    if saved.get("zero_stage") is not None and saved["zero_stage"] != current["zero_stage"]:
        fixed.append(("ZeRO stage", saved["zero_stage"], current["zero_stage"]))
    old_model = {k: v for k, v in (saved.get("model_config") or {}).items() if k != "preset"}
    new_model = {k: v for k, v in current["model_config"].items() if k != "preset"}
    if old_model:
        fixed += [(f"model.{k}", a, b) for k, a, b in _changes(old_model, new_model)]
    config_changes = _changes(flatten(saved.get("config") or {}), flatten(current["config"]))
    config_changes = [c for c in config_changes if not _under(c[0], INVOCATION_KEYS + (MODEL_SECTION,))]
    fixed += [c for c in config_changes if _under(c[0], FIXED_KEYS)]
    if fixed:
        key, old, new = fixed[0]
        more = f" (also changed: {', '.join(c[0] for c in fixed[1:])})" if len(fixed) > 1 else ""
        raise ConfigError(f"{key} was {_shown(old)} in {where} and is {_shown(new)} now; a run cannot continue "
                          f"with another {key}{more}: {FIXED_WAYS}")
    free_keys = FREE_KEYS + _free_for_optimizer(saved, current)
    intended = [c for c in config_changes if not _under(c[0], free_keys + FIXED_KEYS)]
    refused = [c for c in intended if not _under(c[0], allowed)]
    if refused:
        key, old, new = refused[0]
        names = " ".join(f"--allow-config-change {c[0]}" for c in refused)
        more = f" (also changed: {', '.join(c[0] for c in refused[1:])})" if len(refused) > 1 else ""
        raise ConfigError(f"{key} was {_shown(old)} in {where} and is {_shown(new)} now{more}; to continue with "
                          f"the new value pass {names}, else set it back, or pass --resume none to start over")
    notices = [f"[atma] {key}: {_shown(old)} -> {_shown(new)} (allowed by --allow-config-change)"
               for key, old, new in intended]
    free = [c for c in config_changes if _under(c[0], free_keys)]
    if free:
        notices.append("[atma] changed since the checkpoint (safe for resume): "
                       + ", ".join(f"{k} {_shown(a)} -> {_shown(b)}" for k, a, b in free))
    notices += _environment_notices(saved, current)
    return notices


def _free_for_optimizer(saved: dict, current: dict) -> tuple[str, ...]:
    """Keys that change nothing under the optimizer both records use (the clip under Muon)."""
    names = {(record.get("config") or {}).get("optim", {}).get("name") for record in (saved, current)}
    return FREE_UNDER_MUON if names == {"muon"} else ()


def _environment_notices(saved: dict, current: dict) -> list[str]:
    from .provenance import describe_code

    changes = []
    if saved.get("code_version") and saved["code_version"] != current["code_version"]:
        changes.append(f"code {describe_code(saved['code_version'])} -> {describe_code(current['code_version'])}")
    old, new = saved.get("versions") or {}, current["versions"]
    changes += [f"{name} {old[name]} -> {new.get(name)}" for name in sorted(old) if old[name] != new.get(name)]
    if "kernel_settings" in saved:  # records written before they were kept have none to compare
        old, new = saved["kernel_settings"], current.get("kernel_settings") or {}
        changes += [f"{name} {old.get(name, 'unset')} -> {new.get(name, 'unset')}" for name in sorted({*old, *new})
                    if old.get(name) != new.get(name)]
    if not changes:
        return []
    return ["[atma] the checkpoint was written by other code, libraries or kernel settings (" + ", ".join(changes)
            + "); training continues, the last bits of the numbers may differ"]
