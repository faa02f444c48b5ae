"""Run configuration: a YAML file of nested sections, typed and checked dataclasses, `--set a.b=v` overrides.

OmegaConf merges the YAML and the overrides onto the dataclass schema (types, unknown keys, dotted
paths); each section checks its own values at construction and `RunConfig` checks the rules that
span sections. Every failure is one `ConfigError` line that names the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException
from omegaconf.errors import ValidationError

from model.config import PRESETS, AtmaConfig

COPY_TARGETS = ("all", "numbers")
SIG_MODES = ("baseline", "weak", "discrete", "strong", "zipfian")
SCHEDULES = ("cosine", "wsd", "paper", "constant")
OPTIMIZERS = ("adamw", "muon")
CHECKPOINT_POLICIES = ("none", "global", "all")
NAN_POLICIES = ("stop", "skip")
COMPILE_CHOICES = ("auto", "true", "false")
COMPILE_METHODS = ("blocks", "deepcompile")
PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("online", "offline", "disabled")
DATA_DIR_UNSET = "data.dir is not set: pass --data DIR or set data.dir in the run config"


class ConfigError(ValueError):
    """A run configuration value is missing, unknown or impossible."""


@dataclass(kw_only=True, slots=True)
class ModelSection:
    """Which model to train."""

    preset: str = "tiny"
    """Model preset: tiny, atma-155m or atma-378m (PRESETS in model/config.py)."""

    overrides: dict[str, Any] = field(default_factory=dict)
    """AtmaConfig fields that replace the preset's, e.g. {core: nope, memory: false, window: 1024}."""

    vocab_multiple: int = 128
    """Pad the tokenizer's vocabulary up to a multiple of this (the paper pads 50,257 to 50,304)."""

    def __post_init__(self):
        _require(self.preset in PRESETS, f"model.preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        _require(self.vocab_multiple > 0, f"model.vocab_multiple must be positive, got {self.vocab_multiple}")
        self.overrides = _typed_model_overrides(self.preset, self.overrides)


@dataclass(kw_only=True, slots=True)
class DataSection:
    """Where the shards are and how they are read."""

    dir: str
    """Shard directory written by `python -m data_pipeline prepare` (or --data DIR)."""

    num_workers: int = 0
    """Data-loader worker processes per rank; 0 reads in the training process."""

    shuffle: bool = True
    """Shuffle shards and samples (with seed); false reads the stream in order."""

    seed: int = 1234
    """Seed of the shuffle."""

    def __post_init__(self):
        _require(bool(self.dir), DATA_DIR_UNSET)
        _require(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass(kw_only=True, slots=True)
class BatchSection:
    """Batch size in tokens per optimizer step and sequences per micro-batch per rank."""

    tokens: int = 4096
    """Tokens per optimizer step over all ranks; gradient accumulation is derived from it."""

    micro_batch_size: int = 4
    """Sequences per forward/backward pass on one rank."""

    def __post_init__(self):
        _require(self.tokens > 0, f"batch.tokens must be positive, got {self.tokens}")
        _require(self.micro_batch_size > 0, f"batch.micro_batch_size must be positive, got {self.micro_batch_size}")


@dataclass(kw_only=True, slots=True)
class OptimSection:
    """Optimizer: AdamW everywhere, or Muon for matrices with AdamW for the rest (DESIGN departure 5)."""

    name: str = "adamw"
    """adamw (any ZeRO stage) or muon (block matrices; AdamW for the other groups)."""

    lr: float = 3e-4
    """Peak AdamW learning rate (with muon: unused; see the per-group rates below)."""

    betas: tuple[float, ...] = (0.9, 0.95)
    """AdamW [beta1, beta2]."""

    eps: float = 1e-8
    """AdamW epsilon."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay."""

    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 turns it off (not applied with muon)."""

    muon_lr: float = 0.02
    """Muon learning rate of the block matrices (SPEC §6.2)."""

    muon_momentum: float = 0.95
    """Muon momentum, in [0, 1)."""

    muon_weight_decay: float = 0.01
    """Muon weight decay."""

    embed_lr: float = 0.3
    """AdamW learning rate of the embedding under muon."""

    head_lr: float = 0.003125
    """AdamW learning rate of the LM head under muon."""

    scalar_lr: float = 0.01
    """AdamW learning rate of conv kernels and 1-D parameters under muon."""

    def __post_init__(self):
        _require_one_of(self.name, OPTIMIZERS, "optim.name")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas must be a pair [beta1, beta2] in [0, 1), got {list(self.betas)}")
        self.betas = tuple(self.betas)
        for name in ("lr", "eps", "muon_lr", "embed_lr", "head_lr", "scalar_lr"):
            value = getattr(self, name)
            _require(value > 0, f"optim.{name} must be positive, got {value}")
        for name in ("weight_decay", "grad_clip", "muon_weight_decay"):
            value = getattr(self, name)
            _require(value >= 0, f"optim.{name} must be >= 0, got {value}")
        _require(0 <= self.muon_momentum < 1, f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}")


@dataclass(kw_only=True, slots=True)
class ScheduleSection:
    """Learning-rate multiplier over steps."""

    kind: str = "cosine"
    """cosine, wsd (warmup-stable-decay), paper (flat, then linear to 0; SPEC §6.3) or constant."""

    warmup_steps: int = 0
    """Steps of linear warmup from 0 (cosine, wsd, constant)."""

    min_lr_ratio: float = 0.1
    """cosine and wsd: final multiplier of the peak rate, in [0, 1]."""

    decay_start_fraction: float = 0.8
    """wsd: fraction of the steps spent at the peak before the linear decay, in [0, 1]."""

    flat_fraction: float = 0.3
    """paper: fraction of the steps at the peak before the linear decay to 0, in [0, 1]."""

    def __post_init__(self):
        _require_one_of(self.kind, SCHEDULES, "schedule.kind")
        _require(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("min_lr_ratio", "decay_start_fraction", "flat_fraction"):
            value = getattr(self, name)
            _require(0 <= value <= 1, f"schedule.{name} must be in [0, 1], got {value}")


@dataclass(kw_only=True, slots=True)
class LossSection:
    """Weights of the composite loss terms (DESIGN departure 2); each is a per-token mean."""

    lm_weight: float = 1.0
    """Weight of the next-token cross-entropy."""

    sig_mode: str = "baseline"
    """Signature regularizer (SPEC §5.2): baseline (off), weak, discrete, strong or zipfian."""

    sig_weight: float = 0.0
    """Weight of the signature regularizer; > 0 needs a sig_mode other than baseline."""

    sig_sketch_dim: int = 64
    """Width of the random sketch the signature regularizer compares."""

    distractor_weight: float = 0.0
    """Weight of the distractor alignment loss (SPEC §5.3); > 0 needs num_random_keys > 0."""

    num_random_keys: int = 0
    """Random keys per sequence for the distractor loss (sets the model's num_random_keys)."""

    distill_weight: float = 0.0
    """Weight of knowledge distillation from teacher (SPEC §5.5); > 0 needs a teacher."""

    teacher: str | None = None
    """Frozen teacher: an exported ATMA model directory, or a Hugging Face causal LM (hub name or saved
    directory)."""

    distill_temperature: float = 1.0
    """Softmax temperature of the distillation targets."""

    distill_recompute: bool = False
    """Changes nothing in training any more (accepted so that run configs that set it still load): the
    trainer takes the LM head's terms as one weighted sum whose gradients the forward computes, so it
    keeps no teacher targets from forward to backward (this setting asked the teacher's head again in
    backward instead of keeping them) and asks the teacher once per chunk."""

    copy_weight: float = 0.0
    """Weight of an extra cross-entropy over the in-context copy targets only: tokens that continue an
    earlier occurrence, in the same sample, of the copy_context tokens before them (the recalled value
    of a key-value recall episode, a repeated name). It teaches small models retrieval (docs/results.md)."""

    copy_context: int = 3
    """Tokens before a target that must repeat, together with the target, for it to count as a copy."""

    copy_targets: str = "all"
    """Which copy targets the copy loss counts: all, or numbers (only targets that are number tokens:
    recalled values and passkeys, without the repeated names and phrases around them)."""

    loss_chunk_tokens: int = 8192
    """Tokens per chunk of the LM-head loss (bounds the memory of the logits)."""

    def __post_init__(self):
        _require_one_of(self.sig_mode, SIG_MODES, "loss.sig_mode")
        _require(self.copy_context >= 1, f"loss.copy_context must be >= 1, got {self.copy_context}")
        _require_one_of(self.copy_targets, COPY_TARGETS, "loss.copy_targets")
        for name in ("lm_weight", "sig_weight", "distractor_weight", "distill_weight", "copy_weight"):
            value = getattr(self, name)
            _require(value >= 0, f"loss.{name} must be >= 0, got {value}")
        _require(self.sig_sketch_dim > 0, f"loss.sig_sketch_dim must be positive, got {self.sig_sketch_dim}")
        _require(self.num_random_keys >= 0, f"loss.num_random_keys must be >= 0, got {self.num_random_keys}")
        _require(self.distill_temperature > 0,
                 f"loss.distill_temperature must be positive, got {self.distill_temperature}")
        _require(self.loss_chunk_tokens > 0, f"loss.loss_chunk_tokens must be positive, got {self.loss_chunk_tokens}")
        if self.distill_recompute:
            warnings.warn("loss.distill_recompute changes nothing: the trainer keeps no teacher targets for the "
                          "backward (the LM head's gradients are computed in the forward)", stacklevel=2)
        _require(self.distill_weight == 0 or bool(self.teacher),
                 "loss.distill_weight > 0 needs loss.teacher (an exported model dir or HF model)")
        _require(self.distractor_weight == 0 or self.num_random_keys > 0,
                 "loss.distractor_weight > 0 needs loss.num_random_keys > 0")
        _require(self.sig_weight == 0 or self.sig_mode != "baseline",
                 "loss.sig_weight > 0 needs loss.sig_mode other than baseline")


@dataclass(kw_only=True, slots=True)
class TrainSection:
    """Length of the run and what happens on bad steps."""

    max_steps: int = 100
    """Optimizer steps to train for (or --max-steps N)."""

    seed: int = 0
    """Seed of the model init and of every rank's random state."""

    activation_checkpointing: str = "none"
    """Recompute block activations in backward: none, global (global blocks only) or all."""

    nan_policy: str = "stop"
    """On a non-finite loss: stop the run (no update, no checkpoint of that step), or skip the whole
    optimizer step (its gradients are discarded; needs ZeRO stage 1-3)."""

    max_skipped_steps: int = 10
    """With nan_policy skip: stop after this many skipped steps."""

    precision: str = "auto"
    """auto (the DeepSpeed JSON's bf16 on a GPU, fp32 on the CPU), bf16 or fp32."""

    compile: str = "auto"
    """torch.compile the model: true, false, or auto (on with CUDA, off on the CPU)."""

    init_from: str | None = None
    """An exported model directory (python -m pretrain.export) whose weights start this run; the
    optimizer, schedule and step counter start fresh (continued pretraining, e.g. a second curriculum
    stage on other data). A run that resumes from its own checkpoint ignores it."""

    compile_method: str = "blocks"
    """blocks (torch.compile of each block's computation; ZeRO-3 gathers stay outside the graphs) or
    deepcompile (DeepSpeed's engine.compile() with DeepCompile; CUDA only)."""

    activation_memory_budget: float = 1.0
    """With compiled blocks: the share of each block's activations the backward keeps, the compiler
    recomputing the cheapest of the rest (torch._functorch's activation_memory_budget); 1.0 keeps what it
    saves by default, 0.0 recomputes all it can. An alternative to activation_checkpointing."""

    def __post_init__(self):
        _require(self.max_steps > 0, f"train.max_steps must be positive, got {self.max_steps}")
        _require_one_of(self.activation_checkpointing, CHECKPOINT_POLICIES, "train.activation_checkpointing")
        _require_one_of(self.nan_policy, NAN_POLICIES, "train.nan_policy")
        _require(self.max_skipped_steps >= 0, f"train.max_skipped_steps must be >= 0, got {self.max_skipped_steps}")
        _require_one_of(self.precision, PRECISIONS, "train.precision")
        self.compile = str(self.compile).lower()  # YAML true/false arrive as "True"/"False"
        _require_one_of(self.compile, COMPILE_CHOICES, "train.compile")
        _require_one_of(self.compile_method, COMPILE_METHODS, "train.compile_method")
        budget = self.activation_memory_budget
        _require(isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0.0 <= budget <= 1.0,
                 f"train.activation_memory_budget must be a number from 0 to 1 (1: keep what the compiler saves, 0: "
                 f"recompute all it can), got {budget!r}")
        if budget < 1.0:
            _require(self.activation_checkpointing == "none",
                     f"train.activation_memory_budget={budget} and train.activation_checkpointing="
                     f"{self.activation_checkpointing}: choose one (checkpointing recomputes whole blocks, the budget "
                     "lets the compiler recompute inside each compiled block)")
            _require(self.compile != "false" and self.compile_method == "blocks",
                     f"train.activation_memory_budget={budget} needs compiled blocks (train.compile=true, or auto on "
                     f"CUDA, with train.compile_method=blocks); got train.compile={self.compile}, "
                     f"train.compile_method={self.compile_method}")


@dataclass(kw_only=True, slots=True)
class CheckpointSection:
    """When checkpoints are written and how many are kept."""

    every: int = 100
    """Write a checkpoint every this many steps (and at the end)."""

    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted."""

    resume: str = "auto"
    """auto (newest complete checkpoint), none (start over: earlier checkpoints, metrics.jsonl, tensorboard/,
    W&B files and profile/ are moved aside to NAME-before-TIME), or a checkpoint PATH (or --resume)."""

    allow_changes: list[str] = field(default_factory=list)
    """Run-config keys or sections that may differ from the checkpoint's on resume, e.g. [optim.lr]
    (or --allow-config-change KEY); see pretrain/contract.py for the keys that never may."""

    def __post_init__(self):
        _require(self.every > 0, f"checkpoint.every must be positive, got {self.every}")
        _require(self.keep_last > 0, f"checkpoint.keep_last must be positive, got {self.keep_last}")
        _require(bool(self.resume), "checkpoint.resume must be auto, none or a checkpoint path, got ''")


@dataclass(kw_only=True, slots=True)
class LoggingSection:
    """Console, TensorBoard and Weights & Biases output; validation cadence."""

    every: int = 10
    """Log training metrics every this many steps."""

    tensorboard: bool = True
    """Write TensorBoard events under run_dir/tensorboard."""

    wandb: bool = False
    """Log to Weights & Biases."""

    wandb_project: str = "atma"
    """W&B project name."""

    wandb_mode: str = "offline"
    """W&B mode: online, offline or disabled (WANDB_MODE in the environment wins)."""

    val_every: int = 100
    """Run validation every this many steps; 0 turns validation off."""

    val_batches: int = 8
    """Micro-batches per validation, over all ranks together (each evaluates its share; rounded up to a multiple of
    the data-parallel size): the same validation samples at any world size."""

    progress: bool = True
    """Show a progress bar on rank 0."""

    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 looks the GPU up by name."""

    throughput_warmup_steps: int = 3
    """Optimizer steps after start or resume left out of tokens/s and MFU (compilation, autotuning)."""

    def __post_init__(self):
        _require(self.every > 0, f"logging.every must be positive, got {self.every}")
        _require_one_of(self.wandb_mode, WANDB_MODES, "logging.wandb_mode")
        _require(self.val_every >= 0, f"logging.val_every must be >= 0 (0 disables validation), got {self.val_every}")
        _require(self.val_batches > 0, f"logging.val_batches must be positive, got {self.val_batches}")
        _require(self.peak_flops >= 0, f"logging.peak_flops must be >= 0, got {self.peak_flops}")
        _require(self.throughput_warmup_steps >= 0,
                 f"logging.throughput_warmup_steps must be >= 0, got {self.throughput_warmup_steps}")


@dataclass(kw_only=True, slots=True)
class ProfileSection:
    """torch.profiler traces of a window of training steps, written to run_dir/profile (pretrain/profiling.py)."""

    steps: int = 0
    """Optimizer steps to trace; 0 traces nothing."""

    start_step: int = 10
    """First traced optimizer step, numbered as in the logs (over the whole run, resumes included)."""

    ranks: list[int] = field(default_factory=lambda: [0])
    """Ranks that trace; [] traces every rank."""

    record_shapes: bool = False
    """Record each op's input shapes (larger traces)."""

    with_stack: bool = False
    """Record the Python stack of each op (larger traces, more overhead)."""

    profile_memory: bool = False
    """Record tensor allocations and frees."""

    memory_snapshot: bool = False
    """CUDA only: also record the caching allocator's history over the window and write it as a snapshot
    (steps{A}-{B}-rank{R}-memory.pickle, for https://pytorch.org/memory_viz): what holds the memory at peak."""

    def __post_init__(self):
        _require(self.steps >= 0, f"profile.steps must be >= 0 (0 traces nothing), got {self.steps}")
        _require(self.start_step >= 1, f"profile.start_step must be >= 1, got {self.start_step}")
        self.ranks = list(self.ranks)
        _require(all(r >= 0 for r in self.ranks), f"profile.ranks must be ranks >= 0, got {self.ranks}")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """A whole pretraining run."""

    name: str = "atma"
    """Run name (dashboards, W&B)."""

    run_dir: str = "runs/atma"
    """Where checkpoints, logs, dashboards and the resolved config.yaml go (or --run-dir DIR)."""

    deepspeed_config: str = "ds_configs/zero3_bf16.json"
    """DeepSpeed JSON (ZeRO stage, offload); batch, precision and clipping are filled in from here."""

    model: ModelSection = field(default_factory=ModelSection)
    """Which model to train."""

    data: DataSection
    """Where the shards are and how they are read."""

    batch: BatchSection = field(default_factory=BatchSection)
    """Batch size."""

    optim: OptimSection = field(default_factory=OptimSection)
    """Optimizer."""

    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    """Learning-rate schedule."""

    loss: LossSection = field(default_factory=LossSection)
    """Loss terms and weights."""

    train: TrainSection = field(default_factory=TrainSection)
    """Length of the run and handling of bad steps."""

    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    """Checkpoint cadence and resume."""

    logging: LoggingSection = field(default_factory=LoggingSection)
    """Logging and validation."""

    profile: ProfileSection = field(default_factory=ProfileSection)
    """torch.profiler traces of a window of steps (off by default)."""

    def __post_init__(self):
        _require(bool(self.run_dir), "run_dir must not be empty")
        _require(bool(self.deepspeed_config), "deepspeed_config must name a DeepSpeed JSON file")
        model_keys = self.model.overrides.get("num_random_keys")
        _require(model_keys is None or not self.loss.num_random_keys or model_keys == self.loss.num_random_keys,
                 f"model.overrides.num_random_keys ({model_keys}) differs from loss.num_random_keys "
                 f"({self.loss.num_random_keys}); set loss.num_random_keys only")

    def to_dict(self) -> dict:
        """The resolved config as plain data (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def load_run_config(path: str | None, overrides: list[str] = (), **cli: Any) -> RunConfig:
    """Read the YAML at `path` (or defaults), apply `--set` overrides and CLI values, check, build."""
    data = _read_yaml(path) if path else {}
    schema = OmegaConf.structured(RunConfig)
    try:
        for key, value in data.items():
            if not (value is None and dataclasses.is_dataclass(_field_type(RunConfig, str(key)))):
                # an empty section (`optim:` with nothing under it) keeps its defaults
                _apply(schema, str(key), value)
        for assignment in overrides:
            _apply(schema, *_parse_assignment(assignment))
        for key, value in cli.items():
            if value is not None:
                _apply(schema, key, value)
        return OmegaConf.to_object(schema)
    except OmegaConfBaseException as err:
        raise _one_line(err, data) from None


# ---------------------------------------------------------------------- helpers
def _parse_assignment(assignment: str) -> tuple[str, Any]:
    """Split one `a.b.c=value` override into the dotted key and its value parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key or "" in key.split("."):
        raise ConfigError(f"--set has an empty key: {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _typed_model_overrides(preset: str, overrides: dict) -> dict:
    """Check `overrides` against AtmaConfig (names, types, values) and return them typed (e.g. "3e-4" -> 3e-4)."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"model.overrides must be a mapping, got {overrides!r}")
    known = [f.name for f in dataclasses.fields(AtmaConfig) if f.name != "preset"]
    unknown = sorted(str(k) for k in overrides if k not in known)
    if unknown:
        raise ConfigError(f"unknown key(s) in model.overrides: {', '.join(unknown)} (known: {', '.join(known)})")
    schema = OmegaConf.structured(AtmaConfig.from_preset(preset))
    try:
        config = OmegaConf.to_object(OmegaConf.merge(schema, overrides))
    except OmegaConfBaseException as err:
        raise _one_line(err, overrides, prefix="model.overrides.") from None
    except ValueError as err:
        raise ConfigError(f"model.overrides: {err}") from None
    return {name: getattr(config, name) for name in overrides}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _require_one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    _require(value in choices, f"{key} must be one of {', '.join(choices)}; got {value!r}")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: run config not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _apply(schema: DictConfig, key: str, value: Any) -> None:
    """Set dotted `key` to `value`; a mapping for a section is applied key by key, so errors name the leaf."""
    if isinstance(value, dict) and value and isinstance(_node(schema, key), DictConfig):
        for name, item in value.items():
            _apply(schema, f"{key}.{name}", item)
        return
    parts = key.split(".")
    for depth in range(1, len(parts)):
        parent, name = ".".join(parts[:depth - 1]), parts[depth - 1]
        node = _node(schema, parent)
        if not isinstance(node, DictConfig):
            break
        missing = OmegaConf.is_missing(node, name)
        if missing and dataclasses.is_dataclass(_field_type(OmegaConf.get_type(node), name)):
            OmegaConf.update(schema, ".".join(parts[:depth]), {}, merge=True)  # fill an unset section first
        elif missing or (name in node and not isinstance(node[name], DictConfig)):
            raise ConfigError(f"{key}: {'.'.join(parts[:depth])} is a value, not a section")
    OmegaConf.update(schema, key, value, merge=True)


def _node(schema: DictConfig, key: str) -> Any:
    """The config node at dotted `key`, or None where the path is unknown or unset."""
    node = schema
    for part in filter(None, key.split(".")):
        if not isinstance(node, DictConfig) or OmegaConf.is_missing(node, part) or part not in node:
            return None
        node = node[part]
    return node


def _one_line(err: OmegaConfBaseException, data: dict, prefix: str = "") -> ConfigError:
    """Turn an OmegaConf error into one ConfigError line naming the key."""
    key = prefix + (err.full_key or "")
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(err.object_type):
        section = key.rpartition(".")[0]
        known = [f.name for f in dataclasses.fields(err.object_type)]
        given = _lookup(data, err.full_key.rpartition(".")[0]) if not prefix else data
        unknown = sorted(str(k) for k in given if k not in known) if isinstance(given, dict) else []
        where = f" in {section}" if section else ""
        return ConfigError(f"unknown key(s){where}: {', '.join(unknown or [str(err.key)])} (known: {', '.join(known)})")
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(DATA_DIR_UNSET if key in ("data", "data.dir") else f"{key} is not set")
    hint = _field_type(err.object_type, err.key)
    if isinstance(err, ValidationError) and hint is not None:
        return ConfigError(f"{key} must be {_expected(hint)}, got {_shown(err.value)}")
    return ConfigError(f"{key or 'run config'}: {str(err).splitlines()[0]}")


def _lookup(data: Any, dotted: str) -> Any:
    for part in filter(None, dotted.split(".")):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _field_type(cls, name) -> Any:
    if not dataclasses.is_dataclass(cls) or not isinstance(name, str):
        return None
    return typing.get_type_hints(cls).get(name)


def _expected(hint) -> str:
    """Describe a field type for an error message, e.g. float -> "a number"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_expected(a) for a in args if a is not type(None)) + " or null"
    if origin in (tuple, list):
        return {float: "a list of numbers", int: "a list of integers"}.get(args[0], "a list")
    if origin is dict or hint is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping (a section)"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _shown(value) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return repr(value)
