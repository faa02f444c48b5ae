"""Training throughput benchmark: the trainer's own step (`TrainStep`, `build_ds_config`, `build_engine`),
timed per case, with a breakdown and the top profiler ops.

    python -m pretrain.bench                       # atma-378m, T=2048, one GPU: polar vs nope, ZeRO-2 vs ZeRO-3
    python -m pretrain.bench --preset tiny --seq-len 128 --device cpu   # a smoke run on the CPU
    # framework overhead of the atma-378m module structure (near-zero compute), ZeRO-3 / ZeRO-0 in one run:
    python -m pretrain.bench --device cpu --cores polar --model-set hidden_size=64 --model-set head_dim=16 \\
        --model-set vocab_size=256 --seq-len 64 --micro-batch 1 --steps 20 --zero-stages 0,3 --interleave

A case is one combination of --cores, --zero-stages, --activation-checkpointing and --compile
(and of the shipped DeepSpeed JSON and each --ds-variant); each is built exactly as training builds
it (DeepSpeed JSON ds_configs/zero{N}_bf16.json, or the --config's own for its stage; precision
auto: bf16 on CUDA, fp32 on the CPU) and
timed on random tokens (or --data shards). Ratios compare cases that differ in one setting, all
measured in this run: core vs the last core of --cores, ZeRO-3 vs ZeRO-0 and ZeRO-2, compiled vs
eager, activation checkpointing (or an activation memory budget, AC value budget<F>) vs none, each
DeepSpeed variant vs the shipped JSON. A case that
fails is reported and the others still run, except with --interleave or under the deepspeed
launcher: there a failure ends the run with exit status 1 (the other cases, or the other ranks
waiting in that case's collectives, cannot go on without it), and the JSON keeps what was done.
With breakdown steps, each ZeRO-1/2/3 case also times its gradient norm both ways (DeepSpeed's, one tensor at
a time, and the trainer's, in one reduction) on the gradients of one more step. On CUDA each case also runs
--sync-steps more steps in which every wait of the host for the GPU is counted, with the line that made it
(`pretrain/host_syncs.py`). In one process, a measure after the timed steps that fails (the breakdown, the
norms, the profile, the waits) is reported with the case and keeps its step times; the measures after it are
not run, and the exit status is 1. Each case's startup is timed apart from its steps: building its engine, its
first warm-up step
(where compilation happens) and all its warm-up steps. Caches shared within the process (compiled
graphs, autotuning, op builds, the teacher) make a later case's startup shorter than a fresh run's.

    # every GPU of a node (one rank each, real collectives; tokens/s over all ranks, MFU per GPU):
    deepspeed --num_gpus 8 --module pretrain.bench --cases polar:3:none:auto,polar:2:none:auto
    # the paper recipe (Muon, micro-batch 16, gradient accumulation from batch.tokens), ZeRO-3 vs ZeRO-2:
    python -m pretrain.bench --config pretrain/configs/atma-378m.yaml --zero-stages 3,2
    # a DeepSpeed setting against the shipped ZeRO-3 JSON, with the ZeRO-0 baseline, in one run:
    python -m pretrain.bench --cases polar:0:none:auto,polar:3:none:auto,polar:3:none:auto:v1 \\
        --ds-variant zero_optimization.stage3_prefetch_bucket_size=0 --interleave
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from data_pipeline.argtypes import writable_file
from model import PRESETS, AtmaConfig, AtmaForCausalLM
from model.device import default_device, usable_device

from .config import ConfigError
from .flops import peak_flops_for, train_flops_per_token
from .host_syncs import count_host_syncs, host_sync_text
from .provenance import benchmark_provenance, describe_code

CPU_MAX_PARAMETERS = 50_000_000
SHOWN_LIBRARIES = ("torch", "cuda", "triton", "deepspeed", "fla-core")  # the header's; the JSON has them all
ZERO_CONFIGS = {0: "ds_configs/zero0_bf16.json", 1: "ds_configs/zero1_bf16.json", 2: "ds_configs/zero2_bf16.json",
                3: "ds_configs/zero3_bf16.json"}
COMPILE_CHOICES = ("auto", "off", "blocks", "deepcompile")
CHECKPOINT_POLICIES = ("none", "global", "all")
# An AC value "budget<F>" (e.g. budget0.5): no checkpointing, compiled blocks keep F of their activations.
BUDGET_PREFIX = "budget"
NORM_REPEATS = 5  # timings of each ZeRO gradient norm per case, after the breakdown steps


def is_ac_value(text: str) -> bool:
    """Whether `text` is an activation-recomputation setting of a case: a checkpointing policy or budget<F>, 0 <= F < 1."""
    if text in CHECKPOINT_POLICIES:
        return True
    try:
        return text.startswith(BUDGET_PREFIX) and 0.0 <= float(text[len(BUDGET_PREFIX):]) < 1.0
    except ValueError:
        return False


def ac_settings(ac: str) -> list[str]:
    """The run-config settings of a case's activation-recomputation value."""
    if ac in CHECKPOINT_POLICIES:
        return [f"train.activation_checkpointing={ac}", "train.activation_memory_budget=1.0"]
    return ["train.activation_checkpointing=none", f"train.activation_memory_budget={float(ac[len(BUDGET_PREFIX):])}"]


def _ac_list(text: str) -> list[str]:
    """An argparse type: comma-separated activation-recomputation values (policies or budget<F>)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or not all(is_ac_value(v) for v in values):
        raise argparse.ArgumentTypeError(f"choose from {', '.join(CHECKPOINT_POLICIES)} or budget<F> with 0 <= F < 1 "
                                         f"(e.g. budget0.5); got {text!r}")
    return values


def _list(kind, choices=None):
    """An argparse type: a comma-separated list of `kind` values (each in `choices` when given)."""

    def parse(text: str):
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        bad = [v for v in values if choices is not None and v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(map(str, choices or ()))}; got {text!r}")
        return values

    return parse


def _cases(text: str) -> list[tuple]:
    """An argparse type: CORE:ZERO:AC:COMPILE[:VARIANT] cases, comma-separated."""
    out = []
    for item in filter(None, (x.strip() for x in _split_settings(text))):
        parts = item.split(":")
        if len(parts) not in (4, 5) or parts[0] not in ("polar", "nope", "rope") \
                or parts[1] not in ("0", "1", "2", "3") or not is_ac_value(parts[2]) \
                or parts[3] not in COMPILE_CHOICES or (len(parts) == 5 and not parts[4]):
            raise argparse.ArgumentTypeError(
                f"a case is CORE:ZERO:AC:COMPILE[:VARIANT], e.g. polar:3:none:blocks or polar:3:none:blocks:v1; "
                f"got {item!r}")
        out.append((parts[0], int(parts[1]), parts[2], parts[3], *parts[4:]))
    if not out:
        raise argparse.ArgumentTypeError("--cases needs at least one case")
    return out


def _split_settings(text: str) -> list[str]:
    """Split KEY=VALUE,KEY=VALUE at the commas outside JSON brackets and strings."""
    items, depth, quoted, escaped, start = [], 0, False, False, 0
    for i, ch in enumerate(text):
        if quoted:
            quoted = escaped or ch != '"'
            escaped = not escaped and ch == "\\"
        elif ch == '"':
            quoted = True
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def _ds_variant(text: str) -> dict:
    """An argparse type: KEY=VALUE[,KEY=VALUE...] settings over the DeepSpeed JSON (dotted keys, JSON values)."""
    out = {}
    for item in filter(None, (x.strip() for x in _split_settings(text))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not all(part.isidentifier() for part in key.split(".")):
            raise argparse.ArgumentTypeError(
                f"expected KEY=VALUE with a dotted DeepSpeed key, e.g. zero_optimization.overlap_comm=false; "
                f"got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw.strip()
    if not out:
        raise argparse.ArgumentTypeError("--ds-variant needs at least one KEY=VALUE")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(prog="python -m pretrain.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="RUN.yaml",
                   help="time this run config's recipe: its optimizer, loss terms (with its distillation "
                        "teacher, loaded once), precision, DeepSpeed JSON (for its ZeRO stage), model preset and "
                        "overrides, micro-batch size and gradient accumulation (from batch.tokens); the flags below "
                        "still choose the cases and override those values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run-config key, as pretrain.train --set does (repeatable; without "
                        "--config, over the default run config, whose recipe the cases then take)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model preset (default: atma-378m, or the --config's model.preset)")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one model config field of the preset (repeatable), e.g. hidden_size=256")
    p.add_argument("--cores", type=_list(str, ("polar", "nope", "rope")), default=["polar", "nope"],
                   help="comma-separated cores; the last is the baseline of the core ratio (default: polar,nope)")
    p.add_argument("--no-memory", action="store_true", help="benchmark without the gated-delta memory")
    p.add_argument("--seq-len", type=int,
                   help="tokens per sequence (default: 2048, or the sequence length of the --data shards)")
    p.add_argument("--micro-batch", type=int,
                   help="sequences per micro-batch and rank (default: 8, or the --config's batch.micro_batch_size)")
    p.add_argument("--grad-accum", type=int,
                   help="micro-batches per optimizer step (default: 1, or what the --config's batch.tokens makes "
                        "of the micro-batch, the sequence length and the ranks)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per case (default: 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="steps before the timed ones (compilation, autotuning, allocator), timed apart as the "
                        "case's startup (default: 3)")
    p.add_argument("--zero-stages", "--zero-stage", type=_list(int, (0, 1, 2, 3)),
                   help="comma-separated DeepSpeed ZeRO stages (default: 2,3, or the stage of the --config's "
                        "DeepSpeed JSON, which that stage's cases use; the others use ds_configs/zero{N}_bf16.json)")
    p.add_argument("--activation-checkpointing", type=_ac_list,
                   help="comma-separated: none, global, all (checkpointing policies), or budget<F> for no "
                        "checkpointing and compiled blocks keeping F of their activations (0 <= F < 1, e.g. "
                        "budget0.5; needs compiled blocks) (default: none, or the --config's)")
    p.add_argument("--compile", type=_list(str, COMPILE_CHOICES), default=["auto"],
                   help="comma-separated: off, blocks, deepcompile, or auto (what training does: the --config's "
                        "train.compile, by default blocks on CUDA and off on the CPU)")
    p.add_argument("--cases", type=_cases, metavar="CORE:ZERO:AC:COMPILE[:VARIANT],...",
                   help="explicit cases instead of every combination of the four lists above, e.g. "
                        "polar:3:none:blocks,nope:3:none:blocks,polar:2:none:blocks; VARIANT names a --ds-variant "
                        "(v1, v2, ...; default: the shipped DeepSpeed JSON)")
    p.add_argument("--ds-variant", type=_ds_variant, action="append", default=[],
                   metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="DeepSpeed settings set over each case's JSON, e.g. "
                        "zero_optimization.contiguous_gradients=false (repeatable: variants v1, v2, ...; values "
                        "are read as JSON, so a list or an object keeps its commas); every case is also run with "
                        "each variant unless --cases names them")
    p.add_argument("--fla-timing-only", action="store_true",
                   help="use flash-linear-attention's backward even where its gradients are known to be wrong "
                        "(timing only; training never does). A fault inside its kernels would leave the process's "
                        "GPU unusable: time it in a run of its own")
    p.add_argument("--data", help="time on these shards through the training loader (default: random tokens)")
    p.add_argument("--breakdown-steps", type=int, default=3,
                   help="extra steps timed phase by phase (device synchronised between phases; default: 3); with "
                        "any, one more step of each ZeRO-1/2/3 case times DeepSpeed's gradient norm against the one "
                        "the trainer takes in one reduction, on the same gradients, and one more step of each bf16 "
                        "ZeRO-0/1/2 case times DeepSpeed's overflow check of every gradient, which the trainer does "
                        "not run")
    p.add_argument("--profile-steps", type=int, default=2, help="extra steps under torch.profiler (0: none)")
    p.add_argument("--top-ops", type=int, default=8, help="profiler ops listed per case (default: 8)")
    p.add_argument("--sync-steps", type=int, default=2,
                   help="extra steps per case on CUDA in which each wait of the host for the GPU is counted, with "
                        "the line that made it (torch's sync debug mode and explicit synchronisations; default: 2, "
                        "0: none)")
    p.add_argument("--trace-dir", metavar="DIR",
                   help="also write each case's profiled steps as a timeline, DIR/CASE.pt.trace.json.gz (open it in "
                        "https://ui.perfetto.dev: where the device waits for the host); needs --profile-steps > 0")
    p.add_argument("--interleave", action="store_true",
                   help="build every case first and alternate their timed steps (steadier ratios on a shared "
                        "machine; no per-case peak memory)")
    p.add_argument("--device", default=default_device(), help="cuda or cuda:N (default when present) or cpu")
    p.add_argument("--json", help="also write every figure to this JSON file")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    if args.steps < 1 or min(args.warmup, args.breakdown_steps, args.profile_steps, args.sync_steps) < 0:
        p.error("--steps must be >= 1; --warmup, --breakdown-steps, --profile-steps and --sync-steps >= 0")
    if any(v is not None and v < 1 for v in (args.seq_len, args.micro_batch, args.grad_accum)):
        p.error("--seq-len, --micro-batch and --grad-accum must be >= 1")
    if args.trace_dir and args.profile_steps == 0:
        p.error("--trace-dir writes the profiled steps: give --profile-steps > 0")
    args.rank, args.world_size = 0, 1  # this rank and the launcher's ranks, set once torch.distributed is up
    args.recipe_loaded = False  # load_recipe reads --config once
    args.teachers = {}  # distillation teachers the cases share (case_teacher)
    args.ds_notes = []  # what build_ds_config changed in the DeepSpeed JSONs, printed once each (and in the JSON)
    args.number_ids = None  # the copy loss's number tokens, when the recipe counts only those (--data)
    return args


def ds_json_stage(path: str) -> int:
    """The ZeRO stage a DeepSpeed JSON file sets (0 when it has none)."""
    from .trainer import read_ds_file

    return read_ds_file(path).get("zero_optimization", {}).get("stage", 0)


def load_recipe(args) -> None:
    """Read --config / --set into args.run_config (ConfigError) and fill the defaults it decides."""
    from .config import load_run_config

    if args.recipe_loaded:
        return
    args.recipe_loaded, args.run_config = True, None
    if args.config or args.set:
        cfg = load_run_config(args.config, ["data.dir=random-tokens", *args.set])
        if cfg.loss.distill_weight > 0:
            from .teacher import check_teacher

            try:
                check_teacher(cfg.loss.teacher)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        args.run_config = cfg
    cfg = args.run_config
    args.preset = args.preset or (cfg.model.preset if cfg else "atma-378m")
    args.micro_batch = args.micro_batch or (cfg.batch.micro_batch_size if cfg else 8)
    configured = cfg and (f"{BUDGET_PREFIX}{cfg.train.activation_memory_budget:g}"
                          if cfg.train.activation_memory_budget < 1.0 else cfg.train.activation_checkpointing)
    args.activation_checkpointing = args.activation_checkpointing or [configured or "none"]
    args.zero_stages = args.zero_stages or ([ds_json_stage(cfg.deepspeed_config)] if cfg else [2, 3])


def recipe_model_overrides(args) -> dict:
    """The model overrides of the --config (with its loss's random keys) under those of --model-set."""
    cfg = args.run_config
    if cfg is None:
        return dict(args.model_overrides)
    out = dict(cfg.model.overrides)
    out.pop("core", None)  # each case sets its core
    if cfg.loss.num_random_keys:
        out["num_random_keys"] = cfg.loss.num_random_keys
    return {**out, **args.model_overrides}


def plan_accumulation(args) -> None:
    """Set args.grad_accum: as given, from the --config's batch.tokens (ConfigError when it does not divide), or 1."""
    from .trainer import plan_batch

    if args.grad_accum is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's ranks, before torch.distributed is up
        cfg = args.run_config
        args.grad_accum = plan_batch(cfg.batch.tokens, args.micro_batch, args.seq_len, world).grad_accum if cfg else 1


def check_outputs_and_data(args, config: AtmaConfig) -> None:
    """Refuse (ConfigError) a --json that cannot be written and --data the model cannot train on; sets
    args.seq_len (the shards' sequence length with --data, else 2048 unless given) and args.number_ids (the
    copy loss's number tokens, from the shards' tokenizer, when the recipe counts only those)."""
    if args.json:
        try:
            writable_file(args.json)
        except argparse.ArgumentTypeError as err:
            raise ConfigError(f"--json {err}") from None
    if args.trace_dir:
        try:
            os.makedirs(args.trace_dir, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--trace-dir {args.trace_dir}: cannot create it ({err.strerror or err})") from None
        if not os.access(args.trace_dir, os.W_OK):
            raise ConfigError(f"--trace-dir {args.trace_dir}: not writable")
    cfg = args.run_config
    copy_numbers = cfg is not None and cfg.loss.copy_weight > 0 and cfg.loss.copy_targets == "numbers"
    args.number_ids = None
    if not args.data:
        if copy_numbers:
            raise ConfigError("loss.copy_targets=numbers: the number tokens come from the shards' tokenizer; give "
                              "--data SHARDS, or time the copy loss over all targets (--set loss.copy_targets=all)")
        args.seq_len = args.seq_len or 2048
        return
    from data_pipeline.errors import DataError
    from data_pipeline.manifest import load_manifest
    from data_pipeline.tokenizer import data_vocab_size

    try:
        manifest = load_manifest(args.data)
        data_vocab = data_vocab_size(manifest)
    except DataError as err:
        raise ConfigError(f"--data: {err}") from None
    if args.seq_len not in (None, manifest.seq_len):
        raise ConfigError(f"--seq-len {args.seq_len}: the shards in {args.data} hold sequences of {manifest.seq_len} "
                          "tokens; drop --seq-len or give that length")
    if config.vocab_size < data_vocab:
        raise ConfigError(f"--data {args.data}: its {data_vocab} token ids do not fit the model's vocab_size "
                          f"{config.vocab_size}; set --model-set vocab_size={data_vocab} or more")
    args.seq_len = manifest.seq_len
    if copy_numbers:
        from data_pipeline.tokenizer import number_token_ids

        args.number_ids = number_token_ids(manifest.tokenizer_path)
        if not args.number_ids:
            raise ConfigError(f"loss.copy_targets=numbers, but the tokenizer of {args.data} has no number tokens")


def model_overrides(assignments: list[str]) -> dict:
    """Parse `--model-set KEY=VALUE` assignments (values read as YAML scalars) into a dict."""
    import yaml

    out = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-set expects KEY=VALUE, got {item!r}")
        if key.strip() in ("core", "memory"):
            raise ValueError(f"--model-set {key.strip()}: use --cores / --no-memory instead")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def count_parameters(config: AtmaConfig) -> int:
    """Parameter count of `config`, built on the meta device (no memory used)."""
    with torch.device("meta"):
        return sum(p.numel() for p in AtmaForCausalLM(config).parameters())


def paper_flops_per_token(config: AtmaConfig, seq_len: int, num_parameters: int) -> float:
    """Training FLOPs per token by the paper's formula: 6N + 12 * L_attn * D * T."""
    return 6.0 * num_parameters + 12.0 * len(config.global_layers) * config.hidden_size * seq_len


@dataclass
class Case:
    """One benchmarked configuration and what was measured for it."""

    core: str
    zero_stage: int
    checkpointing: str
    compile: str
    variant: str = ""  # a --ds-variant name; "" is the shipped DeepSpeed JSON
    step_times: list[float] = field(default_factory=list)
    startup: dict = field(default_factory=dict)  # build_s, first_step_s, warmup_s (timed, not in step_times)
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        name = f"{self.core} z{self.zero_stage} ac={self.checkpointing} compile={self.compile}"
        return f"{name} ds={self.variant}" if self.variant else name

    def key_without(self, setting: str) -> tuple:
        """The case's settings other than `setting` (cases that differ only there share it)."""
        fields = {"core": self.core, "zero": self.zero_stage, "ac": self.checkpointing, "compile": self.compile,
                  "ds": self.variant}
        return tuple(v for k, v in fields.items() if k != setting)


class CaseRunner:
    """A case's engine and `TrainStep`, built through the trainer's own builders."""

    def __init__(self, case: Case, args, device: torch.device):
        from .config import load_run_config
        from .optim import adam_in_use, apply_lr
        from .step import PhaseTimer, TrainStep
        from .trainer import BatchPlan, build_ds_config, build_engine

        compile_setting = {"off": ["train.compile=false"], "auto": [],
                           "blocks": ["train.compile=true", "train.compile_method=blocks"],
                           "deepcompile": ["train.compile=true", "train.compile_method=deepcompile"]}[case.compile]
        self.cfg = load_run_config(args.config, [
            "data.dir=random-tokens", *args.set, f"deepspeed_config={case_ds_json(case, args)}",
            *ac_settings(case.checkpointing), *compile_setting,
        ])
        self.plan = BatchPlan(args.seq_len, args.micro_batch, args.grad_accum, args.world_size)
        self.config = case_model_config(case, args)
        notes: list[str] = []
        ds_config = build_ds_config(self.cfg, self.plan, device_type=device.type,
                                    overrides=args.ds_variants.get(case.variant),
                                    overrides_source=f"--ds-variant {case.variant}", notes=notes)
        for note in notes:
            if note not in args.ds_notes:
                args.ds_notes.append(note)
                print(f"[bench] {note} (a --ds-variant setting still wins)", flush=True)
        self.ds_config = ds_config
        self.engine, optimizer = build_engine(self.cfg, self.config, ds_config, device=device)
        self.adam = adam_in_use(optimizer)
        apply_lr(optimizer, 1.0)
        self.timer = PhaseTimer(device, synchronize=True)
        self.step = TrainStep(self.engine, grad_accum=args.grad_accum, loss=self.cfg.loss,
                              nan_policy=self.cfg.train.nan_policy, device=device, timer=self.timer,
                              teacher=case_teacher(self.cfg, self.config, ds_config, device, args.teachers),
                              number_ids=args.number_ids)
        self.batches = batch_stream(args, self.config.vocab_size)
        self.device = device
        self.loss_terms: list[str] = []

    def run(self):
        """One optimizer step; returns its StepOutcome (its loss terms' names kept in `loss_terms`)."""
        outcome = self.step.run(self.batches)
        self.loss_terms = sorted(outcome.terms)
        return outcome

    def timed_step(self) -> float:
        """Wall seconds of one optimizer step, device synchronised before and after."""
        synchronize(self.device)
        start = time.perf_counter()
        self.run()
        synchronize(self.device)
        return time.perf_counter() - start


def case_teacher(cfg, config: AtmaConfig, ds_config: dict, device: torch.device, loaded: dict):
    """The recipe's distillation teacher (None without distillation), loaded once per precision, vocabulary and
    whether the case compiles into `loaded` and shared by the cases, as each training run holds one."""
    if cfg.loss.distill_weight <= 0:
        return None
    from .compilation import compile_method
    from .teacher import load_teacher

    key = (ds_config["bf16"]["enabled"], config.vocab_size, compile_method(cfg.train, device.type) is not None)
    if key not in loaded:
        loaded[key] = load_teacher(cfg.loss.teacher, device=device, bf16=key[0], vocab_size=key[1],
                                   compile_blocks=key[2])
        if loaded[key].whole_logits_note:
            print(f"[bench] {loaded[key].whole_logits_note}", flush=True)
    return loaded[key]


def case_ds_json(case: Case, args) -> str:
    """The DeepSpeed JSON of a case: the --config's own for its ZeRO stage, else the shipped one of the stage."""
    cfg = args.run_config
    if cfg is not None and ds_json_stage(cfg.deepspeed_config) == case.zero_stage:
        return cfg.deepspeed_config
    return ZERO_CONFIGS[case.zero_stage]


def recipe_memory(args) -> bool:
    """Whether the cases' models have the gated-delta memory: the recipe's model.overrides, off with --no-memory."""
    return recipe_model_overrides(args).get("memory", True) and not args.no_memory


def case_model_config(case: Case, args) -> AtmaConfig:
    """The model a case trains: the preset with the recipe's and --model-set's overrides, the case's core."""
    overrides = recipe_model_overrides(args)
    overrides.pop("memory", None)
    return AtmaConfig.from_preset(args.preset, **overrides, core=case.core, memory=recipe_memory(args))


def settings_text(settings: dict) -> str:
    """A variant's settings as the command line gives them, values in JSON."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in settings.items())


def check_variants(cases: list[Case], args) -> None:
    """Refuse (ConfigError) a case naming an undefined variant or a variant DeepSpeed would not accept."""
    from .trainer import apply_ds_overrides, read_ds_file

    variants = args.ds_variants
    for case in cases:
        if case.variant and case.variant not in variants:
            defined = ", ".join(variants) or "none"
            raise ConfigError(f"--cases: {case.name}: no --ds-variant {case.variant} (defined: {defined})")
        if case.variant:
            apply_ds_overrides(read_ds_file(case_ds_json(case, args)), variants[case.variant],
                               f"--ds-variant {case.variant} ({settings_text(variants[case.variant])})")


def plan_cases(args) -> list[Case]:
    """The cases the parsed command line asks for, their DeepSpeed variants checked (ConfigError); reads the
    --config (load_recipe), sets args.ds_variants (name -> settings) and, with --cases, args.cores."""
    load_recipe(args)
    args.ds_variants = {f"v{i}": settings for i, settings in enumerate(args.ds_variant, start=1)}
    if args.cases:
        cases = [Case(*spec) for spec in args.cases]
        args.cores = list(dict.fromkeys(c.core for c in cases))
    else:
        cases = [Case(core, zero, ac, comp, variant) for variant, zero, ac, comp, core in itertools.product(
            ["", *args.ds_variants], args.zero_stages, args.activation_checkpointing, args.compile, args.cores)]
    check_variants(cases, args)
    return cases


def batch_stream(args, vocab_size: int):
    """Micro-batches of random tokens, or of --data shards through the training loader."""
    if args.data:
        from data_pipeline.loader import build_loader

        # under the launcher each rank reads its own part of every global batch, as in training
        yield from build_loader(args.data, split="train", batch_size=args.micro_batch, rank=args.rank,
                                world_size=args.world_size, num_epochs=None)
        return
    gen = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab_size, (args.micro_batch, args.seq_len + 1), generator=gen)
        yield {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def synchronize(device: torch.device) -> None:
    """Wait for the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def breakdown(runner: CaseRunner, steps: int) -> dict[str, float]:
    """Mean milliseconds per step in each phase (data, forward, sync, backward, optimizer)."""
    if steps == 0:
        return {}
    runner.timer.reset()
    runner.timer.enabled = True
    for _ in range(steps):
        runner.run()
    runner.timer.enabled = False
    return {name: 1000 * seconds / steps for name, seconds in runner.timer.seconds.items()}


def time_gradient_norms(runner: CaseRunner, repeats: int) -> dict[str, float] | None:
    """Median milliseconds of DeepSpeed's ZeRO gradient norm (one tensor at a time) and of the one-reduction
    norm the trainer uses (`pretrain/grad_norm.py`), timed `repeats` times each, alternately, device
    synchronised, on the gradients of one more step; None where the trainer keeps DeepSpeed's norm."""
    from .grad_norm import NORM_METHODS

    optimizer = runner.engine.optimizer
    method = NORM_METHODS.get(runner.engine.zero_optimization_stage())
    fused = vars(optimizer).get(method) if method else None
    if fused is None or repeats == 0:
        return None
    ways = {"deepspeed": lambda: getattr(type(optimizer), method)(optimizer), "one_reduction": fused}
    times: dict[str, list[float]] = {name: [] for name in ways}

    def timed_both_ways():
        for _ in range(repeats):
            for name, norms in ways.items():
                synchronize(runner.device)
                start = time.perf_counter()
                norms()
                synchronize(runner.device)
                times[name].append(time.perf_counter() - start)
        return fused()

    setattr(optimizer, method, timed_both_ways)
    try:
        runner.run()
    finally:
        setattr(optimizer, method, fused)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def time_overflow_check(runner: CaseRunner, repeats: int) -> float | None:
    """Median milliseconds of DeepSpeed's overflow check of every gradient tensor (ZeRO-1/2's `check_overflow`,
    ZeRO-0's `CheckOverflow.has_overflow`), which the trainer leaves to the check of the norm
    (`pretrain/step_reads.py`), timed `repeats` times, device synchronised, in one more step where the step
    would run it; None where the trainer keeps DeepSpeed's check, or the step runs none (fp32)."""
    optimizer = runner.engine.optimizer
    checker = getattr(optimizer, "overflow_checker", None)
    if "check_overflow" in vars(optimizer):
        owner, name = optimizer, "check_overflow"
    elif "has_overflow" in getattr(checker, "__dict__", {}):
        owner, name = checker, "has_overflow"
    else:
        return None
    ours, deepspeeds = getattr(owner, name), getattr(type(owner), name)
    times: list[float] = []

    def timed(*args, **kwargs):
        for _ in range(repeats):
            synchronize(runner.device)
            start = time.perf_counter()
            deepspeeds(owner, *args, **kwargs)
            synchronize(runner.device)
            times.append(time.perf_counter() - start)
        return ours(*args, **kwargs)

    setattr(owner, name, timed)
    try:
        runner.run()
    finally:
        setattr(owner, name, ours)
    return 1000 * statistics.median(times) if times else None


def profile_case(runner: CaseRunner, steps: int, limit: int, trace: str | None = None) -> dict:
    """Profile `steps` more steps: the `limit` ops with the most self time (device time on CUDA) and, on CUDA,
    the device's kernel time per step, whole and by kind of kernel; with `trace`, the steps' timeline is written
    there too."""
    if steps == 0:
        return {"top_ops": []}
    from torch.profiler import ProfilerActivity, profile

    from .profiling import device_ms_by_kind, device_ms_per_step, top_ops

    on_device = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            runner.run()
        synchronize(runner.device)
    if trace:
        prof.export_chrome_trace(trace)
    found = {"top_ops": top_ops(prof, steps=steps, limit=limit, on_device=on_device)}
    if on_device:
        found["device_ms_per_step"] = device_ms_per_step(prof, steps=steps)
        found["device_ms_by_kind"] = device_ms_by_kind(prof, steps=steps)
    return found


def host_syncs(runner: CaseRunner, steps: int) -> dict:
    """The host's waits for the GPU in `steps` more steps, per step and by site (`pretrain/host_syncs.py`);
    None on the CPU, where nothing waits for a device."""
    found = count_host_syncs(runner.run, steps, runner.device)
    return found or {"host_syncs_per_step": None, "host_syncs_all": None, "host_sync_sites": None}


def device_busy(result: dict) -> float | None:
    """The share of the timed step (median) the device spent in kernels, from the profiled steps (None on the CPU)."""
    busy = result.get("device_ms_per_step")
    return None if busy is None else busy / (1000 * result["step_s_median"])


def trace_path(case: Case, args) -> str | None:
    """Where --trace-dir puts the case's timeline (None without it): the case's name in safe characters."""
    if not args.trace_dir:
        return None
    return os.path.join(args.trace_dir, re.sub(r"[^A-Za-z0-9._-]+", "_", case.name) + ".pt.trace.json.gz")


def summarise(case: Case, runner: CaseRunner, args, peak: float | None, peak_memory: float | None) -> dict:
    """The case's figures from its step times (median) and model; tokens/s over all ranks, MFU per device."""
    step = statistics.median(case.step_times)
    tokens_per_s = args.micro_batch * args.grad_accum * args.seq_len * args.world_size / step
    peak = peak * args.world_size if peak else None
    flops = train_flops_per_token(runner.config, args.seq_len)
    paper_flops = paper_flops_per_token(runner.config, args.seq_len, count_parameters(runner.config))
    return {
        "case": case.name, "core": case.core, "zero_stage": case.zero_stage, "ranks": args.world_size,
        "activation_checkpointing": case.checkpointing, "compile": case.compile,
        "resolved_compile": runner.cfg.train.compile_method if runner_compiles(runner) else "off",
        "memory": runner.config.memory, "memory_kernel": memory_kernel(runner.device, runner.config, args),
        "loss_rows": loss_rows(runner.device),
        "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "optimizer": runner.cfg.optim.name,
        "adam": runner.adam,
        "loss_terms": runner.loss_terms, "teacher": runner.cfg.loss.teacher if runner.step.teacher else None,
        "run_config": args.config, "run_config_set": args.set,
        "ds_variant": case.variant, "ds_overrides": args.ds_variants.get(case.variant, {}),
        "ds_config": runner.ds_config,
        "step_s_median": step, "step_s_all": case.step_times,
        "step_s_stdev": statistics.stdev(case.step_times) if len(case.step_times) > 1 else 0.0,
        "tokens_per_s": tokens_per_s, "flops_per_token": flops, "tflops": flops * tokens_per_s / 1e12,
        "mfu": flops * tokens_per_s / peak if peak else None,
        "mfu_paper_formula": paper_flops * tokens_per_s / peak if peak else None,
        "peak_memory_gib": peak_memory,
    }


def runner_compiles(runner: CaseRunner) -> bool:
    """True when the case's engine was compiled."""
    from .compilation import compile_method

    return compile_method(runner.cfg.train, runner.device.type) is not None


def memory_kernel(device: torch.device, config, args) -> str:
    """Which gated-delta path training takes here for `config`'s model: "none" (no memory), "fla" (or "fla (...
    TileLang)" where FLA's fix for the Hopper bug runs), "fla (timing only: ...)", "chunked, triton carry" or
    "torch" (the chunked path's PyTorch loop)."""
    if not config.memory:
        return "none"
    from kernels import kernel_backend
    from kernels.gated_delta import fla_bridge
    from kernels.gated_delta.triton_impl import triton_carry_fits

    if kernel_backend(device) != "triton":
        return "torch"
    fla_version = fla_bridge._installed_fla_version()
    if device.type == "cuda" and fla_version is not None:
        capability = tuple(torch.cuda.get_device_capability(device))
        if fla_bridge.fla_refusal(capability) is None:
            if fla_bridge.fla_tilelang_fix(capability):
                return "fla (its gated backward's dq/dk/dg kernel in TileLang)"
            return "fla"
        if args.fla_timing_only:
            return "fla (timing only: guard bypassed)"
    fits = triton_carry_fits(config.head_dim, config.head_dim, config.mem_chunk, device)
    return "chunked, triton carry" if fits else "torch"


def loss_rows(device: torch.device) -> str:
    """What runs the LM head loss's rows here (with the distillation term too): "triton" (kernels.softcap_ce)
    or "torch" (bf16 and fp32 training take the same path)."""
    from model.lm_loss import uses_row_kernels

    return "triton" if uses_row_kernels(device, torch.bfloat16) else "torch"


def error_text(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def build_and_warm_up(case: Case, args, device, *, warm_up: bool = True) -> CaseRunner:
    """The case's runner, built (and, with `warm_up`, its warm-up steps run), each timed into case.startup."""
    synchronize(device)
    start = time.perf_counter()
    runner = CaseRunner(case, args, device)
    synchronize(device)
    case.startup = {"build_s": time.perf_counter() - start}
    if warm_up:
        warm_up_case(case, runner, args.warmup)
    return runner


def warm_up_case(case: Case, runner: CaseRunner, steps: int) -> None:
    """Run the case's warm-up steps (compilation, autotuning happen here); their time goes into case.startup."""
    times = [runner.timed_step() for _ in range(steps)]
    case.startup.update(first_step_s=times[0] if times else None, warmup_s=sum(times))


def measure_after_timing(case: Case, runner: CaseRunner, args) -> None:
    """The case's measures after its timed steps, into case.result: the breakdown, the gradient norms, the overflow
    check, the profile and the host's waits.

    Each runs more steps of its own. In one process a measure that fails keeps the timed figures: its error goes
    into case.result["measure_error"] and the measures after it are not run (the engine may have stopped mid-step).
    Under the launcher it is raised, as for a failing step: the other ranks would wait in its collectives.
    """
    repeats = NORM_REPEATS if args.breakdown_steps else 0
    trace = trace_path(case, args)
    measures = [
        ("breakdown", lambda: {"breakdown_ms": breakdown(runner, args.breakdown_steps)}),
        ("gradient norm", lambda: {"gradient_norm_ms": time_gradient_norms(runner, repeats)}),
        ("overflow check", lambda: {"overflow_check_ms": time_overflow_check(runner, repeats)}),
        ("profile", lambda: profile_case(runner, args.profile_steps, args.top_ops, trace)),
        ("host waits", lambda: host_syncs(runner, args.sync_steps)),
    ]
    for name, measure in measures:
        try:
            case.result.update(measure())
        except Exception as exc:
            if args.world_size > 1:
                raise
            case.result["measure_error"] = f"{name}: {error_text(exc)}"
            break
        if name == "profile":
            case.result.update(device_busy=device_busy(case.result), trace=trace)


def run_case(case: Case, args, device, peak) -> None:
    """Build, warm up, time, break down and profile one case; fills case.result (or its error)."""
    runner = None
    try:
        runner = build_and_warm_up(case, args, device)
        gc.collect()  # building engines leaves enough objects for a full collection (~0.2 s) to fall in a timed step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        case.step_times = [runner.timed_step() for _ in range(args.steps)]
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        case.result = summarise(case, runner, args, peak, memory)
        case.result.update(case.startup)
        measure_after_timing(case, runner, args)
    except Exception as exc:  # one failing case (e.g. DeepCompile without its CUDA build) must not end the run
        case.result = {"case": case.name, "error": error_text(exc)}
    finally:
        runner = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


class CaseFailed(RuntimeError):
    """A case of an interleaved run failed; the others cannot be timed without it."""


def run_interleaved(cases: list[Case], args, device, peak) -> None:
    """Build every case, warm each up, then time one step of each case per round (CaseFailed on an error)."""
    runners = []
    for case in cases:
        with _naming(case):
            runners.append(build_and_warm_up(case, args, device, warm_up=False))
    for case, runner in zip(cases, runners):
        with _naming(case):
            warm_up_case(case, runner, args.warmup)
    gc.collect()  # as in run_case: no full collection left pending for the timed steps
    for _ in range(args.steps):
        for case, runner in zip(cases, runners):
            with _naming(case):
                case.step_times.append(runner.timed_step())
    for case, runner in zip(cases, runners):
        case.result = summarise(case, runner, args, peak, None)
        case.result.update(case.startup)
        with _naming(case):
            measure_after_timing(case, runner, args)


@contextlib.contextmanager
def _naming(case: Case):
    """Re-raise an error inside the block as CaseFailed naming the case."""
    try:
        yield
    except Exception as exc:
        case.result = {"case": case.name, "error": error_text(exc)}
        raise CaseFailed(f"{case.name}: {case.result['error']}") from exc


def ratios(cases: list[Case], baseline_core: str) -> list[dict]:
    """Step-time ratios between cases of this run that differ in one setting only."""
    done = [c for c in cases if "step_s_median" in c.result]
    cores = sorted({c.core for c in done} - {baseline_core})
    comparisons = [
        ("core", "core", [(core, baseline_core) for core in cores], "{}/{} step"),
        ("zero", "zero_stage", [(3, 0), (2, 0), (1, 0), (3, 2)], "ZeRO-{}/ZeRO-{} step"),
        ("compile", "compile", [("blocks", "off"), ("deepcompile", "off"), ("deepcompile", "blocks")],
         "compile {}/{} step"),
        ("ac", "checkpointing", [(ac, "none") for ac in sorted({c.checkpointing for c in done} - {"none"})],
         "checkpointing {}/{} step"),
        ("ds", "variant", [(v, "") for v in sorted({c.variant for c in done} - {""})], "ds {}/shipped step"),
    ]
    out = []
    for setting, attribute, pairs, label in comparisons:
        groups: dict[tuple, dict] = {}
        for c in done:
            groups.setdefault(c.key_without(setting), {})[getattr(c, attribute)] = c
        for key, members in groups.items():
            for num, den in pairs:
                b = members.get(den)
                if b is None and setting == "zero" and num in members and members[num].variant:
                    # a variant's ZeRO-N case against the shipped JSON's ZeRO-M case when the run has no
                    # ZeRO-M case of that variant (e.g. a ZeRO-3 setting against the plain ZeRO-0 baseline)
                    b = groups.get(key[:-1] + ("",), {}).get(den)
                if num in members and b is not None:
                    a = members[num]
                    out.append({"ratio": label.format(num, den), "case": a.name, "baseline": b.name,
                                "value": a.result["step_s_median"] / b.result["step_s_median"]})
    return out


def polar_backward_picks() -> list[dict]:
    """What the Polar Triton backward's "auto" picked in this process, per shape, with its timings (none where
    the Triton path never ran): `kernels.polar.triton_impl.describe_auto_choices`."""
    polar = sys.modules.get("kernels.polar.triton_impl")
    return polar.describe_auto_choices() if polar is not None else []


def print_report(cases: list[Case], found: list[dict]) -> None:
    """The table of cases, the ratios, and each case's breakdown and top ops."""
    print(f"{'case':44} {'step ms':>9} {'±':>6} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'MFU(6N)':>8} {'GiB':>6}")
    for c in cases:
        r = c.result
        if "error" in r:
            print(f"{c.name:44} error: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        paper = f"{100 * r['mfu_paper_formula']:.1f}%" if r["mfu_paper_formula"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        print(f"{c.name:44} {1000 * r['step_s_median']:9.1f} {1000 * r['step_s_stdev']:6.1f} "
              f"{r['tokens_per_s']:10,.0f} {r['tflops']:8.2f} {mfu:>6} {paper:>8} {mem:>6}")
    started = [c for c in cases if "build_s" in c.result]
    if started:
        print("startup (not in the step times):")
        for c in started:
            print(f"  {c.name:42} {startup_text(c.result)}")
    if found:
        print("ratios (same run):")
        for r in found:
            print(f"  {r['ratio']:28} {r['value']:6.3f}x   {r['case']}  vs  {r['baseline']}")
    for c in cases:
        r = c.result
        if "error" in r or not (r.get("breakdown_ms") or r.get("top_ops") or r.get("trace")
                                or r.get("host_syncs_per_step") is not None or r.get("measure_error")):
            continue
        parts = " ".join(f"{k} {v:.1f}" for k, v in r.get("breakdown_ms", {}).items()) or "not run"
        print(f"{c.name}: breakdown ms/step (device synchronised per phase): {parts}; memory kernel "
              f"{r['memory_kernel']}; Adam {r['adam']}")
        norm = r.get("gradient_norm_ms")
        if norm:
            print(f"    gradient norm: DeepSpeed's {norm['deepspeed']:.2f} ms, in one reduction "
                  f"{norm['one_reduction']:.2f} ms ({norm['deepspeed'] / norm['one_reduction']:.2f}x), same gradients")
        if r.get("overflow_check_ms") is not None:
            print(f"    overflow check of every gradient: DeepSpeed's {r['overflow_check_ms']:.2f} ms, not run (left to "
                  "the norm's check), same gradients")
        if r.get("device_busy") is not None:
            print(f"    device kernels {r['device_ms_per_step']:.1f} ms per step: {100 * r['device_busy']:.0f}% of the "
                  "timed step (the rest the device waits for the host)")
            print("    by kind of kernel: " + ", ".join(f"{k['kind']} {k['ms_per_step']:.1f} ms ({100 * k['share']:.0f}%)"
                                                      for k in r.get("device_ms_by_kind", [])))
        if r.get("host_syncs_per_step") is not None:
            print(f"    host waits for the GPU: {host_sync_text(r)}")
        for op in r.get("top_ops", []):
            print(f"    {op['self_ms_per_step']:9.2f} ms  {op['calls_per_step']:7.1f} calls  {op['op'][:90]}")
        if r.get("measure_error"):
            print(f"    measure failed, the ones after it not run (the step times above stand): {r['measure_error']}")
        if r.get("trace"):
            print(f"    timeline: {r['trace']}")


def startup_text(result: dict) -> str:
    """A case's startup as one phrase: engine build, warm-up steps (compilation, autotuning) and the first alone."""
    text = f"engine built in {result['build_s']:.1f} s"
    if result.get("first_step_s") is not None:
        text += f", first step {result['first_step_s']:.1f} s, all warm-up steps {result['warmup_s']:.1f} s"
    return text


def rank_prefix(rank: int, args) -> str:
    """'rank R: ' under the deepspeed launcher, '' in one process."""
    return f"rank {rank}: " if args.world_size > 1 else ""


def main(argv=None) -> int:
    """Run every case and print the table, the ratios, the breakdowns and the top ops."""
    args = parse_args(argv)
    try:
        device = usable_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        load_recipe(args)
        args.model_overrides = model_overrides(args.model_set)
        config = AtmaConfig.from_preset(args.preset, **recipe_model_overrides(args))
    except (ConfigError, ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cpu" and count_parameters(config) > CPU_MAX_PARAMETERS:
        print(f"error: the {args.preset} preset ({count_parameters(config) / 1e6:.0f}M parameters) is too large "
              "to benchmark on the CPU; use --preset tiny for a smoke run, shrink it with --model-set, or run "
              "on a GPU", file=sys.stderr)
        return 2
    try:
        check_outputs_and_data(args, config)
        plan_accumulation(args)
        cases = plan_cases(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from kernels.gated_delta import fla_bridge

    from .trainer import init_distributed

    rank, args.world_size, rank_device = init_distributed()
    args.rank = rank
    if device.type == "cuda" and args.world_size > 1:
        device = rank_device  # under the deepspeed launcher each rank times the step on its own GPU
    if rank != 0:  # one report for the whole run: rank 0 prints it and writes the JSON (and the timelines)
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
        args.json = args.trace_dir = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = peak_flops_for(name) if device.type == "cuda" else None
    changed = "".join(f", {k}={v}" for k, v in args.model_overrides.items())
    ranks = f" x {args.world_size} ranks (tokens/s over all ranks, MFU per device)" if args.world_size > 1 else ""
    accumulated = f" x {args.grad_accum} accumulated" if args.grad_accum > 1 else ""
    memory = recipe_memory(args)
    print(f"device: {name}{ranks}; preset {args.preset}{changed}, T={args.seq_len}, micro-batch {args.micro_batch}"
          f"{accumulated} per rank, memory={'on' if memory else 'off'}, {args.steps} timed steps after "
          f"{args.warmup} warm-up")
    if args.run_config is not None:
        cfg = args.run_config
        sets = "".join(f" --set {item}" for item in args.set)
        print(f"run config: {args.config or 'defaults'}{sets}: optimizer {cfg.optim.name}, DeepSpeed JSON "
              f"{cfg.deepspeed_config} for its ZeRO-{ds_json_stage(cfg.deepspeed_config)} cases")
        if cfg.loss.distill_weight > 0:
            print(f"distillation teacher: {cfg.loss.teacher} (loaded once; its forward runs in every micro-batch "
                  "and counts in the step time, not in MFU)")
    provenance = benchmark_provenance()
    libraries = ", ".join(f"{k} {v}" for k, v in provenance["versions"].items() if k in SHOWN_LIBRARIES and v)
    print(f"code {describe_code(provenance['code_version'])}; {libraries}")
    from kernels.common import describe_settings

    print(f"kernel settings from the environment: {describe_settings(provenance['kernel_settings'])}")
    if memory:
        print(f"memory path: {memory_kernel(device, case_model_config(cases[0], args), args)}")
    print(f"LM head loss rows: {loss_rows(device)}")
    if args.fla_timing_only:
        print("FLA TIMING ONLY: flash-linear-attention's backward runs even where its gradients are known to be "
              "wrong (guard bypassed); these figures are timings, not a configuration to train with")
    for label, settings in args.ds_variants.items():
        print(f"ds variant {label}: {settings_text(settings)}")

    def write_json(complete=False):
        if args.json:
            shown = {k: v for k, v in vars(args).items() if k not in ("run_config", "teachers")}
            if args.run_config is not None:
                shown["run_config_resolved"] = args.run_config.to_dict()
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"device": name, "fla_timing_only": args.fla_timing_only, **provenance, "args": shown,
                           "results": [c.result for c in cases if c.result],
                           "ratios": ratios(cases, args.cores[-1]), "polar_backward_auto": polar_backward_picks(),
                           "complete": complete}, f, indent=2)

    with fla_bridge.fla_timing_only() if args.fla_timing_only else contextlib.nullcontext():
        if args.interleave:
            try:
                run_interleaved(cases, args, device, peak)
            except CaseFailed as err:
                print(f"error: {rank_prefix(rank, args)}--interleave: {err}", file=sys.stderr)
                write_json()
                return 1
        else:
            for case in cases:
                run_case(case, args, device, peak)
                print(f"[bench] {case.name}: " + (case.result.get("error") or
                      f"{1000 * case.result['step_s_median']:.1f} ms/step ({startup_text(case.result)})"
                      + (f"; measure failed: {case.result['measure_error']}" if "measure_error" in case.result
                         else "")), flush=True)
                write_json()  # what is done survives a time limit
                if args.world_size > 1 and "error" in case.result:
                    # the other ranks are still in this case's collectives and would wait for this rank
                    # until the process group times out; exiting makes the launcher stop them all now
                    print(f"error: {rank_prefix(rank, args)}{case.name}: {case.result['error']}; the run ends here "
                          "(the other ranks cannot go on without this one)", file=sys.stderr, flush=True)
                    return 1
    print_report(cases, ratios(cases, args.cores[-1]))
    for pick in polar_backward_picks():
        print(f"Polar backward (ATMA_POLAR_BWD=auto) at {pick['text']}")
    write_json(complete=True)
    return 0 if all("error" not in c.result and "measure_error" not in c.result for c in cases) else 1


if __name__ == "__main__":
    from .shutdown import exit_without_teardown

    exit_without_teardown(main())  # it may have started a process group (pretrain.shutdown)
