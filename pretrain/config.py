"""Run configuration: a YAML file of nested sections, validated dataclasses, `--set a.b=v` overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import yaml

SIG_MODES = ("baseline", "weak", "discrete", "strong", "zipfian")
SCHEDULES = ("cosine", "wsd", "paper", "constant")
OPTIMIZERS = ("adamw", "muon")
CHECKPOINT_POLICIES = ("none", "global", "all")
NAN_POLICIES = ("stop", "skip")
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """A run configuration value is missing, unknown or impossible."""


@dataclass
class ModelSection:
    """Which model to train."""

    preset: str = "tiny"
    # Any AtmaConfig field, e.g. {core: nope, memory: false, window: 1024}.
    overrides: dict = field(default_factory=dict)
    # Pad the tokenizer's vocabulary up to a multiple of this (the paper pads 50,257 to 50,304).
    vocab_multiple: int = 128


@dataclass
class DataSection:
    """Where the shards are and how they are read."""

    dir: str = ""
    num_workers: int = 0
    shuffle: bool = True
    seed: int = 1234


@dataclass
class BatchSection:
    """Batch size in tokens per optimizer step and sequences per micro-batch per rank."""

    tokens: int = 4096
    micro_batch_size: int = 4


@dataclass
class OptimSection:
    """Optimizer: AdamW everywhere, or Muon for matrices with AdamW for the rest (DESIGN departure 5)."""

    name: str = "adamw"
    lr: float = 3e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Muon recipe (SPEC §6.2): Muon lr/momentum/decay for matrices in blocks; AdamW lrs per group.
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.01
    embed_lr: float = 0.3
    head_lr: float = 0.003125
    scalar_lr: float = 0.01


@dataclass
class ScheduleSection:
    """Learning-rate multiplier over steps."""

    kind: str = "cosine"
    warmup_steps: int = 0
    # cosine: decay to min_lr_ratio; wsd: stable until decay_start_fraction, then linear to min.
    min_lr_ratio: float = 0.1
    decay_start_fraction: float = 0.8
    # paper: flat for flat_fraction of the steps, then linear to 0 (SPEC §6.3).
    flat_fraction: float = 0.3


@dataclass
class LossSection:
    """Weights of the composite loss terms (DESIGN departure 2); each is a per-token mean."""

    lm_weight: float = 1.0
    sig_mode: str = "baseline"
    sig_weight: float = 0.0
    sig_sketch_dim: int = 64
    distractor_weight: float = 0.0
    num_random_keys: int = 0
    distill_weight: float = 0.0
    teacher: str = ""
    distill_temperature: float = 1.0
    loss_chunk_tokens: int = 8192


@dataclass
class TrainSection:
    """Length of the run and what happens on bad steps."""

    max_steps: int = 100
    seed: int = 0
    activation_checkpointing: str = "none"
    nan_policy: str = "stop"
    max_skipped_steps: int = 10
    precision: str = "auto"


@dataclass
class CheckpointSection:
    """When checkpoints are written and how many are kept."""

    every: int = 100
    keep_last: int = 3
    resume: str = "auto"


@dataclass
class LoggingSection:
    """Console, TensorBoard and Weights & Biases output; validation cadence."""

    every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "atma"
    wandb_mode: str = "offline"
    val_every: int = 100
    val_batches: int = 8
    progress: bool = True
    peak_flops: float = 0.0


@dataclass
class RunConfig:
    """A whole pretraining run."""

    name: str = "atma"
    run_dir: str = "runs/atma"
    deepspeed_config: str = "ds_configs/zero3_bf16.json"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        """The resolved config as plain data (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def validate(self) -> None:
        """Raise ConfigError naming the key of any impossible value."""
        checks = [
            (self.optim.name in OPTIMIZERS, "optim.name", f"one of {OPTIMIZERS}"),
            (self.schedule.kind in SCHEDULES, "schedule.kind", f"one of {SCHEDULES}"),
            (self.loss.sig_mode in SIG_MODES, "loss.sig_mode", f"one of {SIG_MODES}"),
            (self.train.activation_checkpointing in CHECKPOINT_POLICIES, "train.activation_checkpointing",
             f"one of {CHECKPOINT_POLICIES}"),
            (self.train.nan_policy in NAN_POLICIES, "train.nan_policy", f"one of {NAN_POLICIES}"),
            (self.train.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}"),
            (self.batch.tokens > 0, "batch.tokens", "positive"),
            (self.batch.micro_batch_size > 0, "batch.micro_batch_size", "positive"),
            (self.train.max_steps > 0, "train.max_steps", "positive"),
            (self.optim.lr > 0, "optim.lr", "positive"),
            (len(self.optim.betas) == 2, "optim.betas", "a pair [beta1, beta2]"),
            (self.optim.grad_clip >= 0, "optim.grad_clip", ">= 0"),
            (self.schedule.warmup_steps >= 0, "schedule.warmup_steps", ">= 0"),
            (0 <= self.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", "in [0, 1]"),
            (0 <= self.schedule.decay_start_fraction <= 1, "schedule.decay_start_fraction", "in [0, 1]"),
            (0 <= self.schedule.flat_fraction <= 1, "schedule.flat_fraction", "in [0, 1]"),
            (self.checkpoint.every > 0, "checkpoint.every", "positive"),
            (self.checkpoint.keep_last > 0, "checkpoint.keep_last", "positive"),
            (self.logging.every > 0, "logging.every", "positive"),
            (self.logging.val_every >= 0, "logging.val_every", ">= 0 (0 disables validation)"),
            (self.logging.wandb_mode in ("online", "offline", "disabled"), "logging.wandb_mode",
             "online, offline or disabled"),
            (self.loss.distill_temperature > 0, "loss.distill_temperature", "positive"),
            (self.loss.num_random_keys >= 0, "loss.num_random_keys", ">= 0"),
            (self.loss.loss_chunk_tokens > 0, "loss.loss_chunk_tokens", "positive"),
            (self.model.vocab_multiple > 0, "model.vocab_multiple", "positive"),
            (self.data.num_workers >= 0, "data.num_workers", ">= 0"),
        ]
        for weight in ("lm_weight", "sig_weight", "distractor_weight", "distill_weight"):
            checks.append((getattr(self.loss, weight) >= 0, f"loss.{weight}", ">= 0"))
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(f"{key} must be {what}")
        if not self.data.dir:
            raise ConfigError("data.dir is not set: pass --data DIR or set data.dir in the run config")
        if self.loss.distill_weight > 0 and not self.loss.teacher:
            raise ConfigError("loss.distill_weight > 0 needs loss.teacher (an exported model dir or HF model)")
        if self.loss.distractor_weight > 0 and self.loss.num_random_keys == 0:
            raise ConfigError("loss.distractor_weight > 0 needs loss.num_random_keys > 0")
        if self.loss.sig_weight > 0 and self.loss.sig_mode == "baseline":
            raise ConfigError("loss.sig_weight > 0 needs loss.sig_mode other than baseline")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _coerce(value, hint, key: str):
    """Convert a YAML value to the dataclass field's type, or raise ConfigError."""
    origin = getattr(hint, "__origin__", None)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot ("3e-4") as strings.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if hint is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, float, key) for v in value)
        raise ConfigError(f"{key} must be a list, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'the run config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f" in {prefix}" if prefix else ""
        raise ConfigError(f"unknown key(s){where}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` assignment (value parsed as YAML) to nested dict `data`."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set has an empty key: {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def load_run_config(path: str | None, overrides: list[str] = (), **cli: Any) -> RunConfig:
    """Read the YAML at `path` (or defaults), apply `--set` overrides and CLI values, validate."""
    data: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: run config not found")
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for assignment in overrides:
        apply_override(data, assignment)
    for key, value in cli.items():
        if value is not None:
            apply_override(data, f"{key}={value}") if not isinstance(value, str) else _set_str(data, key, value)
    config = _build(RunConfig, data, "")
    config.validate()
    return config


def _set_str(data: dict, key: str, value: str) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
