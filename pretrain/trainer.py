"""The DeepSpeed training loop: engine setup, composite loss, validation, checkpoints, monitoring."""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
import os
import pickle
import re
import resource
import shutil
import socket
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels.common import kernel_settings
from model import AtmaConfig, AtmaForCausalLM

from . import checkpoint as ckpt
from . import contract
from .accumulation import accumulation_dtype, check_accumulation, communication_dtype, runs_bf16_optimizer
from .bf16_step import one_read_bf16_step
from .compilation import compile_engine, compile_method, configure_compile, dynamo_summary
from .config import ConfigError, RunConfig
from .cpu_comm import without_shm_comm_op
from .flops import peak_flops_for, train_flops_per_token
from .grad_norm import fuse_gradient_norm
from .init_from import load_initial_weights
from .monitor import OUTPUTS, Monitor
from .opbuild import announce_builds, check_build_locks
from .one_rank import (keep_parameters_gathered, reduce_gradients_into_partitions, zero3_for_one_rank,
                       zero12_for_one_rank)
from .optim import apply_lr, build_optimizer, choose_adam, lr_multiplier, match_loaded_step_counters
from .profiling import PROFILE_DIR, StepProfiler, check_profile
from .provenance import code_version, library_versions
from .signals import StopRequests
from .step import NonFiniteStep, TrainingError, TrainStep, check_skip_supported
from .step_reads import fewer_step_reads
from .throughput import ThroughputMeter

# torch.distributed deprecation notices raised from inside DeepSpeed on every step.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

# Fault injection for tests of the non-finite-loss guard: the loss of this optimizer step is NaN.
NAN_STEP_ENV = "ATMA_FAULT_NAN_AT_STEP"

__all__ = ["Trainer", "TrainingError", "build_ds_config", "build_engine", "init_distributed", "plan_batch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed (also for a plain single process)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if use_cuda:
            deepspeed.init_distributed(dist_backend="nccl")
        else:
            with without_shm_comm_op():
                deepspeed.init_distributed(dist_backend="gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if dist.get_world_size() > 1:
        # Every rank has finished joining before any goes on: rank 0 holds the rendezvous store, and a
        # start-up error that makes it exit at once would otherwise cut off a rank still connecting
        # (gloo: "Connection reset by peer", a traceback and exit code 1 instead of the one error line).
        dist.barrier()
    return dist.get_rank(), dist.get_world_size(), device


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """Round the tokenizer's vocabulary up to a multiple (tensor-core friendly)."""
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass
class BatchPlan:
    """How the token batch splits into micro-batches, accumulation steps and ranks."""

    seq_len: int
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len


def plan_batch(tokens: int, micro_batch_size: int, seq_len: int, world_size: int) -> BatchPlan:
    """Derive gradient accumulation from the token batch; raise ConfigError when it does not divide."""
    per_pass = micro_batch_size * seq_len * world_size
    if tokens % per_pass != 0:
        raise ConfigError(
            f"batch.tokens={tokens} is not a multiple of micro_batch_size ({micro_batch_size}) x seq_len "
            f"({seq_len}) x data-parallel ranks ({world_size}) = {per_pass}"
        )
    return BatchPlan(seq_len, micro_batch_size, tokens // per_pass, world_size)


# Top-level keys read by deepspeed.initialize itself (to build a device mesh), not by DeepSpeedConfig.
_DS_KEYS_OUTSIDE_CONFIG = frozenset({"data_parallel_size", "sequence_parallel_size"})


class _KeyRecorder(dict):
    """A config dict that records every top-level key DeepSpeed looks up in it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: set[str] = set()

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def __copy__(self):  # DeepSpeedConfig parses a copy.copy of the dict it is given
        return self

    def keys(self):
        return _RecordedKeys(self)


class _RecordedKeys:
    """`config.keys()` whose membership tests (`KEY in config.keys()`) are recorded too."""

    def __init__(self, config: _KeyRecorder):
        self.config = config

    def __contains__(self, key):
        return key in self.config

    def __iter__(self):
        return iter(dict.keys(self.config))

    def __len__(self):
        return len(self.config)


@functools.lru_cache(maxsize=1)
def deepspeed_top_level_keys() -> frozenset[str]:
    """The top-level keys DeepSpeed's own config parser reads, recorded while it parses a minimal config."""
    from deepspeed.runtime.config import DeepSpeedConfig

    config = _KeyRecorder(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    DeepSpeedConfig(config)
    return frozenset(config.seen - set(_removed_top_level_keys())) | _DS_KEYS_OUTSIDE_CONFIG


def _removed_top_level_keys() -> dict[str, str]:
    """DeepSpeed's removed top-level keys and its message for each (which it raises only at engine build)."""
    from deepspeed.runtime import config

    return getattr(config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {})


def check_top_level_keys(ds: dict, path: str) -> None:
    """Refuse a top-level key DeepSpeed does not read (it would silently ignore it); ConfigError names the key."""
    known, removed = deepspeed_top_level_keys(), _removed_top_level_keys()
    for key in ds:
        if key in removed:
            raise ConfigError(f"{path}: {key}: {removed[key]}")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: {key}: unknown key (not a DeepSpeed setting{hint})")


def check_zero_section(ds: dict, path: str) -> None:
    """Check the DeepSpeed JSON's zero_optimization with DeepSpeed's own model; ConfigError names the first bad key."""
    import pydantic
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be a JSON object, got {zero!r}")
    try:
        DeepSpeedZeroConfig(**zero)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        key = ".".join(["zero_optimization", *map(str, first["loc"])])
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"{path}: {key}: unknown key (not a DeepSpeed ZeRO setting)") from None
        value = first.get("input")
        shown = f", got {value!r}" if isinstance(value, (str, int, float, bool, type(None))) else ""
        if first["type"] == "enum":  # DeepSpeed's stage enum repeats 3 (its alias max_stage)
            choices = list(dict.fromkeys(re.split(r", | or ", first["ctx"]["expected"])))
            raise ConfigError(f"{path}: {key} must be {', '.join(choices[:-1])} or {choices[-1]}{shown}") from None
        raise ConfigError(f"{path}: {key}: {first['msg']}{shown}") from None
    except (TypeError, ValueError) as err:  # DeepSpeed's own checks of a section's shape
        raise ConfigError(f"{path}: zero_optimization: {str(err).splitlines()[0]}") from None


def read_ds_file(path: str) -> dict:
    """Read and check the DeepSpeed JSON the run config names (ConfigError names the file and the first bad key)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: DeepSpeed config not found (deepspeed_config in the run config)")
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{path}: remove the {section!r} section; the run config's optim/schedule set it")
    check_top_level_keys(ds, path)
    check_zero_section(ds, path)
    accumulation_dtype(ds, path)
    communication_dtype(ds, path)
    return ds


# DeepSpeed keys that build_ds_config fills in from the run config (an override would be overwritten).
_DS_KEYS_FROM_RUN_CONFIG = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                            "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler", "compile")


def apply_ds_overrides(ds: dict, overrides: dict, source: str) -> dict:
    """Set each dotted DeepSpeed key of `overrides` in `ds` (in place) and check the result as a file is checked."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        if (parents or [leaf])[0] in _DS_KEYS_FROM_RUN_CONFIG:
            raise ConfigError(f"{source}: {dotted}: set from the run config (batch, precision, optimizer, "
                              "clipping, compile), not in the DeepSpeed JSON")
        node = ds
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                where = ".".join(parents[:i + 1])
                raise ConfigError(f"{source}: {where} is not a JSON object, so {dotted} cannot be set")
        node[leaf] = value
    check_top_level_keys(ds, source)
    check_zero_section(ds, source)
    accumulation_dtype(ds, source)
    communication_dtype(ds, source)
    return ds


def build_ds_config(cfg: RunConfig, plan: BatchPlan, *, device_type: str, overrides: dict | None = None,
                    overrides_source: str = "overrides", notes: list[str] | None = None) -> dict:
    """Read the DeepSpeed JSON named by the run config (dotted `overrides` set over it) and fill in batch,
    precision and clipping; what was changed from the file is appended to `notes`."""
    path = cfg.deepspeed_config
    ds = read_ds_file(path)
    precision = cfg.train.precision
    if precision == "auto":
        file_bf16 = bool(ds.get("bf16", {}).get("enabled", False))
        precision = "bf16" if device_type == "cuda" and file_bf16 else "fp32"
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds.pop("fp16", None)
    # What DeepSpeed will build once the overrides are set: its BF16_Optimizer has no ZeRO buffers to change.
    final = apply_ds_overrides(copy.deepcopy(ds), overrides, overrides_source) if overrides else ds
    note = zero3_for_one_rank(ds, plan.world_size,
                              module_hooks=compile_method(cfg.train, device_type) != "deepcompile")
    if not runs_bf16_optimizer(final):
        note = note or zero12_for_one_rank(ds, plan.world_size, muon=cfg.optim.name == "muon")
    if note and notes is not None:
        notes.append(note)
    if overrides:
        apply_ds_overrides(ds, overrides, overrides_source)
    accumulation_warning = check_accumulation(ds, plan.grad_accum,
                                              f"{path} with {overrides_source}" if overrides else path)
    if accumulation_warning:
        warnings.warn(accumulation_warning, stacklevel=2)
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = plan.sequences_per_step
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds.setdefault("steps_per_print", 10**9)
    # DeepSpeed's throughput timer (on by default) synchronises the device as each micro-batch's forward starts and
    # as its step ends, which keeps the host from queuing ahead; the trainer measures throughput itself.
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if cfg.optim.name == "muon":
        if zero.get("stage", 0) == 3 and zero.get("reduce_scatter", True):
            raise ConfigError(f"{path}: Muon under ZeRO-3 needs zero_optimization.reduce_scatter = false")
        if cfg.optim.grad_clip > 0:
            # DeepSpeed's ZeRO-3 Muon writes the orthogonalised update into the gradient buffer
            # before the global-norm clip, so clipping would shrink every Muon step by the norm of
            # all updates (~30-80x on the tiny model). The Muon step is normalised anyway and
            # AdamW is invariant to gradient scale, so the clip is switched off instead.
            warnings.warn("optim.grad_clip is not applied with Muon (DeepSpeed clips the Muon update, "
                          "not the raw gradient); training runs without gradient clipping", stacklevel=2)
            ds["gradient_clipping"] = 0.0
    configure_compile(ds, compile_method(cfg.train, device_type), device_type=device_type, source=path,
                      budget=cfg.train.activation_memory_budget)
    if cfg.train.nan_policy == "skip":
        try:
            check_skip_supported(ds)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return ds


def build_engine(cfg: RunConfig, model_config: AtmaConfig, ds_config: dict, *, device: torch.device,
                 init_from: str | None = None):
    """Build the model (ZeRO-3: partitioned at construction; weights from the exported model `init_from` when
    given), its optimizer and the DeepSpeed engine, compiled as the run config says; returns (engine, optimizer)."""
    import deepspeed

    zero_stage = ds_config["zero_optimization"].get("stage", 0)
    torch.manual_seed(cfg.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage == 3):
        model = AtmaForCausalLM(model_config)
    if init_from:
        load_initial_weights(model, init_from, model_config)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)
    offload = ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "cpu"
    adam = choose_adam(device.type, offload)
    if adam.note and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"[atma] {adam.note}", flush=True)
    if adam.builds:
        check_build_locks([adam.builds])
        announce_builds([adam.builds])
    optimizer = build_optimizer(model, cfg.optim, adam)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    keep_parameters_gathered(engine, ds_config)
    reduce_gradients_into_partitions(engine, ds_config)
    fewer_step_reads(engine, fuse_gradient_norm(engine, ds_config))
    one_read_bf16_step(engine, ds_config)
    compile_engine(engine, compile_method(cfg.train, device.type),
                   activation_memory_budget=cfg.train.activation_memory_budget)
    return engine, optimizer


def _first_existing(path: str) -> str:
    """`path` itself, or its nearest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def check_inputs(cfg: RunConfig) -> None:
    """Refuse what would otherwise fail only after the engine build or at step 1 (ConfigError): a file given
    as the shard or run directory, a bad DeepSpeed JSON, an unusable teacher name, an unknown ATMA_KERNELS."""
    from kernels import kernel_choice

    if os.path.isfile(cfg.data.dir):
        parent = os.path.dirname(os.path.abspath(cfg.data.dir))
        hint = f" (here perhaps {parent})" if os.path.isfile(os.path.join(parent, "manifest.json")) else ""
        raise ConfigError(f"{cfg.data.dir}: a file, not a directory; --data (data.dir) takes the shard directory, "
                          f"the one holding manifest.json{hint}")
    existing = _first_existing(cfg.run_dir)
    if not os.path.isdir(existing):
        raise ConfigError(f"{existing}: a file, not a directory; --run-dir (run_dir) must be a directory or a "
                          "path that does not exist yet")
    read_ds_file(cfg.deepspeed_config)
    try:
        kernel_choice()
        if cfg.loss.distill_weight > 0:
            from .teacher import check_teacher

            check_teacher(cfg.loss.teacher)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def seconds_text(seconds: float) -> str:
    """A duration for the console: two decimals under a second (a small checkpoint saves in hundredths)."""
    return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s"


def resume_alternatives(tag_dir: str) -> str:
    """How to go on when checkpoint `tag_dir` cannot be loaded: the newest earlier intact tag, else starting over."""
    root, tag = os.path.split(tag_dir.rstrip(os.sep))
    earlier = [t for t in ckpt.complete_tags(root) if t < tag and not ckpt.damaged_files(os.path.join(root, t))]
    if earlier:
        return (f"resume from the previous complete checkpoint with --resume {os.path.join(root, earlier[-1])}, "
                "or pass --resume none to start over")
    return "there is no earlier complete checkpoint: pass --resume none to start over"


def check_loadable(tag_dir: str) -> None:
    """Refuse a checkpoint with an empty, cut-short or corrupted file (ConfigError naming it and what to resume
    from instead); under torch.distributed each rank reads a share of the files and all give the same answer."""
    damaged = ckpt.damaged_files(tag_dir)
    if damaged:
        raise ConfigError(f"{damaged[0]}: empty or cut short, so checkpoint {tag_dir} cannot be loaded; "
                          f"{resume_alternatives(tag_dir)}")
    distributed = dist.is_available() and dist.is_initialized()
    part = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    corrupt = ckpt.corrupt_files(tag_dir, part)
    if distributed:
        shares = [None] * part[1]
        dist.all_gather_object(shares, corrupt)
        corrupt = sorted(path for share in shares for path in share)
    if corrupt:
        raise ConfigError(f"{corrupt[0]}: its data does not match the checksums stored when it was saved (the "
                          f"file was changed or damaged since), so checkpoint {tag_dir} cannot be loaded; "
                          f"{resume_alternatives(tag_dir)}")


def start_over(run_dir: str) -> str | None:
    """Move an earlier run's checkpoints, dashboards and profiles in `run_dir` aside (--resume none); return the
    line saying so."""
    moved = ckpt.move_aside(run_dir, (ckpt.CHECKPOINTS, *OUTPUTS, PROFILE_DIR))
    if not moved:
        return None
    renames = ", ".join(f"{old} -> {new}" for old, new in moved)
    return (f"[atma] --resume none: starting over at step 0; the earlier run's files in {run_dir} are moved aside: "
            f"{renames}")


class Trainer:
    """Owns the engine, data, teacher, monitor and the train/validate/checkpoint cadence."""

    def __init__(self, cfg: RunConfig, stop: StopRequests | None = None):
        from data_pipeline.loader import build_loader
        from data_pipeline.manifest import load_manifest
        from data_pipeline.tokenizer import data_vocab_size
        from kernels.gated_delta.fla_bridge import fla_timing_only_active

        if fla_timing_only_active():
            raise TrainingError("flash-linear-attention's guard is bypassed for timing in this process; "
                                "training never runs on known-wrong gradients")
        check_inputs(cfg)
        self.cfg = cfg
        self.stop = stop or StopRequests(rank=int(os.environ.get("RANK", "0")))
        self.rank, self.world, self.device = init_distributed()
        check_profile(cfg.profile, self.world, self.device)
        self.manifest = load_manifest(cfg.data.dir)
        self.plan = plan_batch(cfg.batch.tokens, cfg.batch.micro_batch_size, self.manifest.seq_len, self.world)
        ds_notes: list[str] = []
        self.ds_config = build_ds_config(cfg, self.plan, device_type=self.device.type, notes=ds_notes)
        for note in ds_notes if self.rank == 0 else ():
            print(f"[atma] {note}", flush=True)
        self.zero_stage = self.ds_config["zero_optimization"].get("stage", 0)

        overrides = dict(cfg.model.overrides)
        overrides.setdefault("vocab_size", padded_vocab(self.manifest.vocab_size, cfg.model.vocab_multiple))
        if cfg.loss.num_random_keys:
            overrides["num_random_keys"] = cfg.loss.num_random_keys
        try:
            self.model_config = AtmaConfig.from_preset(cfg.model.preset, **overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from None
        data_vocab = data_vocab_size(self.manifest)
        if self.model_config.vocab_size < data_vocab:
            raise ConfigError(f"model vocab_size {self.model_config.vocab_size} is below the {data_vocab} token ids of "
                              f"the data in {self.manifest.data_dir} (manifest.json, tokenizer.json): set "
                              f"model.overrides.vocab_size to at least {data_vocab}, or run `python -m data_pipeline "
                              f"verify {self.manifest.data_dir}` if tokenizer.json changed")

        loader_args = dict(dataset=self.manifest, batch_size=self.plan.micro_batch_size, rank=self.rank,
                           world_size=self.world, num_workers=cfg.data.num_workers, seed=cfg.data.seed)
        self.train_loader = build_loader(split="train", shuffle=cfg.data.shuffle, num_epochs=None, **loader_args)
        self.val_loader = None
        if cfg.logging.val_every and "val" in self.manifest.splits and self.manifest.num_samples("val") > 0:
            self.val_loader = build_loader(split="val", shuffle=False, num_epochs=None, **loader_args)
        # logging.val_batches counts micro-batches over all ranks: each rank evaluates its share, so a
        # validation covers the same samples, and takes 1/world of the time, at any world size.
        self.val_batches_per_rank = -(-cfg.logging.val_batches // self.world)
        if self.val_loader is not None and self.rank == 0 and cfg.logging.val_batches % self.world:
            print(f"[atma] validation: logging.val_batches={cfg.logging.val_batches} is not a multiple of the "
                  f"{self.world} data-parallel ranks; each rank evaluates {self.val_batches_per_rank} micro-batches, "
                  f"{self.val_batches_per_rank * self.world} in all", flush=True)

        self.step = 0
        self.tokens_seen = 0
        self.skipped = 0
        self.pending_scalars: dict[str, float] = {}  # durations (warm-up, checkpoint load, save) for the next log
        self.resume_check_s = 0.0
        self.ckpt_root = os.path.join(cfg.run_dir, ckpt.CHECKPOINTS)
        self.run_record = contract.build_record(
            step=0, tokens_seen=0, config=cfg.to_dict(), model_config=self.model_config.to_dict(),
            data=contract.data_identity(self.manifest, self.train_loader.dataset.data_id),
            zero_stage=self.zero_stage, world_size=self.world, code_version=code_version(),
            versions=library_versions(), kernel_settings=kernel_settings(),
        )
        self.universal = False
        # Before the engine: a tag from another world size makes the engine load a universal checkpoint.
        self.resume_from = self._checkpoint_to_resume()

        init_from = cfg.train.init_from if self.resume_from is None else None
        self.engine, self.optimizer = build_engine(cfg, self.model_config, self.ds_config, device=self.device,
                                                   init_from=init_from)
        if init_from and self.rank == 0:
            print(f"[atma] weights from {init_from}; optimizer and schedule start at step 0", flush=True)
        self.teacher = None
        if cfg.loss.distill_weight > 0:
            from .teacher import load_teacher

            self.teacher = load_teacher(cfg.loss.teacher, device=self.device, bf16=self.ds_config["bf16"]["enabled"],
                                        vocab_size=self.model_config.vocab_size,
                                        compile_blocks=compile_method(cfg.train, self.device.type) is not None)
            if self.rank == 0 and self.teacher.whole_logits_note:
                print(f"[atma] {self.teacher.whole_logits_note}", flush=True)
        number_ids = None
        if cfg.loss.copy_weight > 0 and cfg.loss.copy_targets == "numbers":
            from data_pipeline.tokenizer import number_token_ids

            number_ids = number_token_ids(self.manifest.tokenizer_path)
        self.runner = TrainStep(self.engine, grad_accum=self.plan.grad_accum, loss=cfg.loss,
                                nan_policy=cfg.train.nan_policy, device=self.device, teacher=self.teacher,
                                number_ids=number_ids)

        self.flops_per_token = train_flops_per_token(self.model_config, self.manifest.seq_len)
        self.peak_flops = cfg.logging.peak_flops or (
            peak_flops_for(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        )
        self._write_run_files()
        self._resume()
        self.monitor = Monitor(
            cfg.run_dir, rank=self.rank, name=cfg.name, config=cfg.to_dict(), total_steps=cfg.train.max_steps,
            start_step=self.step, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
            progress=cfg.logging.progress and self.step < cfg.train.max_steps,
        )

    # ------------------------------------------------------------------ setup helpers
    def _write_run_files(self) -> None:
        """Record this start's resolved config, DeepSpeed config and tokenizer in the run directory (rank 0).

        They describe the latest start only; each checkpoint tag keeps its own record (run.json).
        """
        if self.rank == 0:
            os.makedirs(self.cfg.run_dir, exist_ok=True)
            import yaml

            with open(os.path.join(self.cfg.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)
            shutil.copyfile(self.manifest.tokenizer_path, os.path.join(self.cfg.run_dir, "tokenizer.json"))
            with open(os.path.join(self.cfg.run_dir, "ds_config.json"), "w", encoding="utf-8") as f:
                json.dump(self.ds_config, f, indent=2)
        dist.barrier()

    def _checkpoint_to_resume(self) -> str | None:
        """Pick the tag to resume from and check it against this run (before the engine is built).

        Raises ConfigError for a change that breaks resume (contract.check_resume). A tag written at
        another world size is converted to DeepSpeed's universal format, and the engine is then
        configured to load that.
        """
        if self.rank == 0:
            for tag in ckpt.remove_incomplete(self.ckpt_root):
                print(f"[atma] removed incomplete checkpoint {tag} (interrupted save)", flush=True)
            if self.cfg.checkpoint.resume == "none":
                notice = start_over(self.cfg.run_dir)
                if notice:
                    print(notice, flush=True)
        dist.barrier()
        contract.check_allowed_keys(self.cfg.checkpoint.allow_changes, self.run_record["config"])
        ways = "resume from another checkpoint with --resume PATH, or pass --resume none to start over"
        try:
            tag_dir = ckpt.find_resume(self.ckpt_root, self.cfg.checkpoint.resume)
        except ValueError as err:
            raise ConfigError(f"{err}; {ways}") from None
        if tag_dir is None:
            return None
        started = time.perf_counter()
        check_loadable(tag_dir)
        self.resume_check_s = time.perf_counter() - started
        saved = contract.read_record(tag_dir)
        if saved is None:
            try:
                saved = ckpt.legacy_record(tag_dir)
            except FileNotFoundError as err:
                raise ConfigError(f"{err}; {ways}") from None
        notices = contract.check_resume(saved, self.run_record, tag_dir=tag_dir,
                                        allowed=self.cfg.checkpoint.allow_changes)
        if self.rank == 0:
            for line in notices:
                print(line, flush=True)
        saved_world = ckpt.saved_world_size(tag_dir)
        if saved_world != self.world:
            self._convert_to_universal(tag_dir, saved_world)
        return tag_dir

    def _convert_to_universal(self, tag_dir: str, saved_world: int) -> None:
        """Convert a tag written at another world size once (rank 0) and make the engine load that copy."""
        from .universal import convert, universal_path

        failure = ""
        if self.rank == 0:
            print(f"[atma] {tag_dir} was written by {saved_world} data-parallel rank(s) and this run has "
                  f"{self.world}: DeepSpeed's ds_to_universal merges its ZeRO partitions once into "
                  f"{universal_path(tag_dir)}, then each rank loads its share of the weights and Adam moments; "
                  f"training continues at the same global sample (exact data order; the numbers match a "
                  f"same-size resume up to the order of the gradient sums)", flush=True)
            try:
                convert(tag_dir)
            except RuntimeError as err:
                failure = str(err)
        flag = torch.tensor([1.0 if failure else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            raise ConfigError(f"{failure or 'the universal conversion failed on rank 0'}; resume on "
                              f"{saved_world} rank(s), or pass --resume none to start over")
        self.ds_config["checkpoint"] = {"load_universal": True}
        self.universal = True

    def _resume(self) -> None:
        """Load the checkpoint chosen by _checkpoint_to_resume, if any."""
        if self.resume_from is None:
            return
        # The optimizer's hyperparameters come from this run's config (the resume check allowed any
        # change), not from the checkpoint, which would silently restore the old ones.
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        started = time.perf_counter()
        try:
            client, rank_state = ckpt.load(self.engine, self.resume_from, universal=self.universal)
        except (EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
            raise ConfigError(f"{self.resume_from}: a checkpoint file cannot be read ({type(err).__name__}: {err}); "
                              f"{resume_alternatives(self.resume_from)}") from None
        for group, settings in zip(self.optimizer.param_groups, groups):
            group.update(settings)
        match_loaded_step_counters(self.optimizer)
        if self.universal:
            from .universal import untie_step_counters

            untie_step_counters(self.optimizer)
        self.step = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        self.skipped = int(rank_state.get("skipped", 0))
        self.train_loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        loaded = time.perf_counter() - started
        self.pending_scalars["perf/checkpoint_load_s"] = self.resume_check_s + loaded
        if self.rank == 0:
            print(f"[atma] resumed from {self.resume_from} at step {self.step} ({self.tokens_seen:,} tokens seen); "
                  f"checksums checked in {seconds_text(self.resume_check_s)}, "
                  f"state loaded in {seconds_text(loaded)}", flush=True)

    # ------------------------------------------------------------------ steps
    def train_step(self, batches):
        """One optimizer step (`TrainStep.run`: one host sync); applies train.nan_policy to its outcome."""
        apply_lr(self.optimizer, lr_multiplier(self.step, self.cfg.train.max_steps, self.cfg.schedule))
        nan_step = os.environ.get(NAN_STEP_ENV)
        inject = nan_step is not None and int(nan_step) == self.step and self.skipped == 0
        try:
            outcome = self.runner.run(batches, stop_requested=self.stop.requested, inject_nan=inject)
        except NonFiniteStep as err:
            raise TrainingError(
                f"{err} at optimizer step {self.step + 1}; stopping (train.nan_policy=stop). The last complete "
                f"checkpoint in {self.ckpt_root} is intact; lower the learning rate or set train.nan_policy=skip."
            ) from None
        if outcome.applied:
            self.step += 1
            self.tokens_seen += self.plan.tokens_per_step
        else:
            self._count_skipped()
        return outcome

    def _count_skipped(self) -> None:
        """Count a skipped optimizer step (nan_policy=skip); stop after train.max_skipped_steps."""
        self.skipped += 1
        if self.rank == 0:
            print(f"[atma] non-finite loss at optimizer step {self.step + 1}: step skipped ({self.skipped} so far)",
                  flush=True)
        if self.skipped > self.cfg.train.max_skipped_steps:
            raise TrainingError(f"more than train.max_skipped_steps={self.cfg.train.max_skipped_steps} "
                                "skipped steps (non-finite losses); stopping")

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean LM loss over the validation split's first logging.val_batches micro-batches, shared among the ranks."""
        if self.val_loader is None:
            return None
        self.engine.module.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        # The same validation batches every time: restart the loader at its first batch.
        self.val_loader.reset()
        batches = iter(self.val_loader)
        for _ in range(self.val_batches_per_rank):
            input_ids, labels = self.runner.to_device(next(batches))
            total += self.engine(input_ids, labels, loss_chunk_tokens=self.cfg.loss.loss_chunk_tokens).loss.double()
        self.engine.module.train()
        dist.all_reduce(total)
        return total.item() / (self.world * self.val_batches_per_rank)

    def save(self, *, announce: bool = True) -> str:
        """Write a checkpoint of the current step on every rank; return its tag."""
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict(),
                  "model_config": self.model_config.to_dict()}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": ckpt.rng_state(), "skipped": self.skipped}
        record = dict(self.run_record, step=self.step, tokens_seen=self.tokens_seen)
        started = time.perf_counter()
        tag = ckpt.save(self.engine, self.ckpt_root, self.step, client, rank_state,
                        keep_last=self.cfg.checkpoint.keep_last, record=record, files=(self.manifest.tokenizer_path,))
        seconds = time.perf_counter() - started  # every rank's share: the save ends with a barrier
        self.pending_scalars["perf/checkpoint_save_s"] = seconds
        self.last_saved = self.step
        if announce:
            self.monitor.print(f"[atma] saved checkpoint {tag} in {seconds_text(seconds)}")
        return tag

    def _memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train until train.max_steps or a stop signal; checkpoint, validate and log on their cadences."""
        cfg = self.cfg
        self.stopped = False
        if self.step >= cfg.train.max_steps:
            self.monitor.close()
            self.monitor.print(f"[atma] nothing to train: {self.resume_from} is at step {self.step} and "
                               f"train.max_steps is {cfg.train.max_steps}; pass a larger --max-steps to train further")
            return {}
        self.stop.watch_training()
        batches = iter(self.train_loader)
        self.last_saved = self.step
        self.engine.module.train()
        meter = ThroughputMeter(warmup_steps=cfg.logging.throughput_warmup_steps, device=self.device)
        profiler = StepProfiler(cfg.profile, run_dir=cfg.run_dir, rank=self.rank, device=self.device)
        meter.start()
        last = {}
        try:
            while self.step < cfg.train.max_steps:
                profiler.before_step(self.step + 1)
                if profiler.in_window(self.step + 1):  # on every rank: one traced rank slows every rank's step
                    meter.pause()
                outcome = self.train_step(batches)
                meter.record(self.plan.tokens_per_step, outcome.data_wait_s)
                self._report_warmup(meter)
                profiler.after_step()
                if not profiler.in_window(self.step + 1):
                    meter.resume()
                if outcome.applied:
                    last = self._log(outcome, meter)
                    self._validate_on_cadence(meter)
                    self.monitor.advance()
                self._report_trace(profiler)
                if outcome.stop:
                    tag = self.save(announce=False) if self.last_saved != self.step else ckpt.tag_for(self.step)
                    self.stopped = True
                    why = "Ctrl-C" if self.stop.interrupted else self.stop.signal_name or "a signal on another rank"
                    self.monitor.print(f"[atma] stopped by {why} after step {self.step}: checkpoint {tag} saved; "
                                       "run the same command again to continue from it")
                    break
                if outcome.applied and self._save_due() and self.last_saved != self.step:
                    with meter.set_aside():  # not training: left out of tokens/s and MFU
                        self.save()
        finally:
            profiler.close()  # a run that ends inside the window keeps the steps traced so far
            self._report_trace(profiler)
        if self.last_saved != self.step:
            self.save()
        self.monitor.close()
        return last

    def _report_warmup(self, meter: ThroughputMeter) -> None:
        """Once the throughput warm-up is over, say how long it took (compilation, autotuning); the next logged
        step carries the figures."""
        warmup = meter.take_warmup()
        if warmup is None:
            return
        n, seconds, first = meter.warmup_steps, warmup["perf/warmup_s"], warmup["perf/first_step_s"]
        took = (f"the first step took {seconds:.1f} s" if n == 1 else
                f"the first {n} steps took {seconds:.1f} s, the first alone {first:.1f} s")
        self.monitor.print(f"[atma] warm-up (compilation, autotuning, allocator): {took}; left out of tokens/s "
                           "and MFU (logging.throughput_warmup_steps)")
        self.pending_scalars.update(warmup)

    def _report_trace(self, profiler: StepProfiler) -> None:
        """Say where this rank's trace went, once it is written."""
        message = profiler.take_report()
        if message is None:
            return
        if self.rank == 0:
            self.monitor.print(message)
        else:
            print(message, flush=True)

    def _save_due(self) -> bool:
        return self.step % self.cfg.checkpoint.every == 0 or self.step == self.cfg.train.max_steps

    def _log(self, outcome, meter: ThroughputMeter) -> dict:
        """Log the step's scalars on the logging cadence (the only place values are read beyond the step's
        own sync); return the scalars known without reading."""
        cfg = self.cfg
        scalars = dict(outcome.terms)
        scalars.update({"lr": self.optimizer.param_groups[0]["lr"], "perf/tokens_seen": self.tokens_seen,
                        "perf/skipped_steps": self.skipped})
        if not (self.step % cfg.logging.every == 0 or self.step == cfg.train.max_steps or self.step == 1):
            return scalars
        grad_norm = self.engine.get_global_grad_norm()
        scalars["grad_norm"] = float(grad_norm) if grad_norm is not None else None
        scalars["perf/memory_gib"] = self._memory_gib()
        scalars.update(meter.read())
        scalars.update(self.pending_scalars)
        self.pending_scalars = {}
        if self.peak_flops and "perf/tokens_per_s" in scalars:
            scalars["perf/mfu"] = self.flops_per_token * scalars["perf/tokens_per_s"] / (self.peak_flops * self.world)
        if compile_method(cfg.train, self.device.type) is not None:
            scalars.update({f"compile/{k}": v for k, v in dynamo_summary().items()})
        self.monitor.log(self.step, scalars)
        if self.step == 1:
            self._report_polar_backward_picks()
        return scalars

    def _report_polar_backward_picks(self) -> None:
        """Print, once, which Polar backward "auto" picked on the first step's shapes, with its timings."""
        polar = sys.modules.get("kernels.polar.triton_impl")
        for pick in polar.describe_auto_choices() if polar else ():
            self.monitor.print(f"[atma] Polar backward (ATMA_POLAR_BWD=auto) at {pick['text']}")

    def _validate_on_cadence(self, meter: ThroughputMeter) -> None:
        cfg = self.cfg
        if cfg.logging.val_every and (self.step % cfg.logging.val_every == 0 or self.step == cfg.train.max_steps):
            with meter.set_aside() as took:  # not training: left out of tokens/s and MFU
                val = self.validate()
            if val is not None:
                self.monitor.log(self.step, {"loss/val": val, "perf/val_s": took["seconds"]}, console=False)
                self.monitor.print(f"[atma] step {self.step}: val loss {val:.4f} ({seconds_text(took['seconds'])})")

    def close(self) -> None:
        """Tear down the process group."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
