"""The DeepSpeed training loop: engine setup, composite loss, validation, checkpoints, monitoring."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import socket
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model import AtmaConfig, AtmaForCausalLM

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig
from .flops import peak_flops_for, train_flops_per_token
from .losses import LossWeights, combine_losses, signature_loss
from .monitor import Monitor
from .optim import apply_lr, build_optimizer, lr_multiplier

# torch.distributed deprecation notices raised from inside DeepSpeed on every step.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

# Fault injection for tests of the non-finite-loss guard: the loss of this optimizer step is NaN.
NAN_STEP_ENV = "ATMA_FAULT_NAN_AT_STEP"


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss under nan_policy=stop, too many skips, ...)."""


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
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
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


def build_ds_config(cfg: RunConfig, plan: BatchPlan, *, device_type: str) -> dict:
    """Read the DeepSpeed JSON named by the run config and fill in batch, precision and clipping."""
    path = cfg.deepspeed_config
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: DeepSpeed config not found (deepspeed_config in the run config)")
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{path}: remove the {section!r} section; the run config's optim/schedule set it")
    ds["train_micro_batch_size_per_gpu"] = plan.micro_batch_size
    ds["gradient_accumulation_steps"] = plan.grad_accum
    ds["train_batch_size"] = plan.sequences_per_step
    ds["gradient_clipping"] = cfg.optim.grad_clip
    precision = cfg.train.precision
    if precision == "auto":
        file_bf16 = bool(ds.get("bf16", {}).get("enabled", False))
        precision = "bf16" if device_type == "cuda" and file_bf16 else "fp32"
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds.pop("fp16", None)
    ds.setdefault("steps_per_print", 10**9)
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
    return ds


class Trainer:
    """Owns the engine, data, teacher, monitor and the train/validate/checkpoint cadence."""

    def __init__(self, cfg: RunConfig):
        import deepspeed

        from data_pipeline.loader import build_loader
        from data_pipeline.manifest import load_manifest
        from data_pipeline.tokenizer import data_vocab_size

        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self.manifest = load_manifest(cfg.data.dir)
        self.plan = plan_batch(cfg.batch.tokens, cfg.batch.micro_batch_size, self.manifest.seq_len, self.world)
        self.ds_config = build_ds_config(cfg, self.plan, device_type=self.device.type)
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

        torch.manual_seed(cfg.train.seed)
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config, enabled=self.zero_stage == 3):
            model = AtmaForCausalLM(self.model_config)
        model.set_activation_checkpointing(cfg.train.activation_checkpointing)
        offload = self.ds_config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "cpu"
        optimizer = build_optimizer(model, cfg.optim, device_type=self.device.type, cpu_offload=offload)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config
        )
        self.weights = LossWeights(cfg.loss.lm_weight, cfg.loss.sig_weight, cfg.loss.distractor_weight,
                                   cfg.loss.distill_weight)
        self.teacher = None
        if cfg.loss.distill_weight > 0:
            from .teacher import Teacher

            dtype = torch.bfloat16 if self.ds_config["bf16"]["enabled"] else torch.float32
            self.teacher = Teacher(cfg.loss.teacher, device=self.device, dtype=dtype,
                                   vocab_size=self.model_config.vocab_size)

        loader_args = dict(dataset=self.manifest, batch_size=self.plan.micro_batch_size, rank=self.rank,
                           world_size=self.world, num_workers=cfg.data.num_workers, seed=cfg.data.seed)
        self.train_loader = build_loader(split="train", shuffle=cfg.data.shuffle, num_epochs=None, **loader_args)
        self.val_loader = None
        if cfg.logging.val_every and "val" in self.manifest.splits and self.manifest.num_samples("val") > 0:
            self.val_loader = build_loader(split="val", shuffle=False, num_epochs=None, **loader_args)

        self.step = 0
        self.tokens_seen = 0
        self.skipped = 0
        self.flops_per_token = train_flops_per_token(self.model_config, self.manifest.seq_len)
        self.peak_flops = cfg.logging.peak_flops or (
            peak_flops_for(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        )
        self.ckpt_root = os.path.join(cfg.run_dir, "checkpoints")
        self.stop_requested = False
        self._write_run_files()
        self._resume()
        self.monitor = Monitor(
            cfg.run_dir, rank=self.rank, name=cfg.name, config=cfg.to_dict(), total_steps=cfg.train.max_steps,
            start_step=self.step, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project, wandb_mode=cfg.logging.wandb_mode,
            progress=cfg.logging.progress,
        )

    # ------------------------------------------------------------------ setup helpers
    def _write_run_files(self) -> None:
        """Record the resolved config, model config and tokenizer in the run directory (rank 0)."""
        if self.rank == 0:
            os.makedirs(self.cfg.run_dir, exist_ok=True)
            import yaml

            with open(os.path.join(self.cfg.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                yaml.safe_dump(self.cfg.to_dict(), f, sort_keys=False)
            self.model_config.save(os.path.join(self.cfg.run_dir, "model_config.json"))
            shutil.copyfile(self.manifest.tokenizer_path, os.path.join(self.cfg.run_dir, "tokenizer.json"))
            with open(os.path.join(self.cfg.run_dir, "ds_config.json"), "w", encoding="utf-8") as f:
                json.dump(self.ds_config, f, indent=2)
        dist.barrier()

    def _resume(self) -> None:
        """Load the checkpoint chosen by checkpoint.resume, if any."""
        if self.rank == 0:
            removed = ckpt.remove_incomplete(self.ckpt_root)
            for tag in removed:
                print(f"[atma] removed incomplete checkpoint {tag} (interrupted save)", flush=True)
        dist.barrier()
        try:
            tag_dir = ckpt.find_resume(self.ckpt_root, self.cfg.checkpoint.resume)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if tag_dir is None:
            return
        client, rank_state = ckpt.load(self.engine, tag_dir)
        self.step = int(client["step"])
        self.tokens_seen = int(client["tokens_seen"])
        self.skipped = int(rank_state.get("skipped", 0))
        self.train_loader.load_state_dict(rank_state["loader"])
        ckpt.set_rng_state(rank_state["rng"])
        if self.rank == 0:
            print(f"[atma] resumed from {tag_dir} at step {self.step} ({self.tokens_seen:,} tokens seen)", flush=True)

    # ------------------------------------------------------------------ one micro-batch
    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["input_ids"].to(self.device, non_blocking=True), batch["labels"].to(self.device, non_blocking=True)

    def compute_terms(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward one micro-batch and return every enabled loss term (per-token means)."""
        want_sig = self.weights.sig > 0
        kl_targets = self.teacher.target_rows(input_ids) if self.teacher is not None else None
        out = self.engine(
            input_ids, labels if self.weights.lm > 0 else None, output_hidden_states=want_sig,
            loss_chunk_tokens=self.cfg.loss.loss_chunk_tokens, kl_targets=kl_targets,
            kl_temperature=self.cfg.loss.distill_temperature,
        )
        terms = {}
        if out.loss is not None:
            terms["lm"] = out.loss
        if want_sig:
            terms["sig"] = signature_loss(out.hidden_states, self.cfg.loss.sig_mode, self.cfg.loss.sig_sketch_dim)
        if self.weights.distractor > 0:
            terms["distractor"] = out.align_loss
        if out.kl_loss is not None:
            terms["distill"] = out.kl_loss
        return terms

    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    # ------------------------------------------------------------------ steps
    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns rank-mean loss terms."""
        apply_lr(self.optimizer, lr_multiplier(self.step, self.cfg.train.max_steps, self.cfg.schedule))
        sums: dict[str, float] = {}
        done = 0
        nan_step = os.environ.get(NAN_STEP_ENV)
        while done < self.plan.grad_accum:
            input_ids, labels = self._to_device(next(batches))
            terms = self.compute_terms(input_ids, labels)
            loss = combine_losses(terms, self.weights)
            if nan_step is not None and int(nan_step) == self.step and done == 0 and self.skipped == 0:
                loss = loss * float("nan")
            if not self._all_finite(loss.detach()):
                self._handle_non_finite()
                continue
            self.engine.backward(loss)
            self.engine.step()
            done += 1
            for name, value in terms.items():
                sums[f"loss/{name}"] = sums.get(f"loss/{name}", 0.0) + value.item() / self.plan.grad_accum
            sums["loss/total"] = sums.get("loss/total", 0.0) + loss.item() / self.plan.grad_accum
        self.step += 1
        self.tokens_seen += self.plan.tokens_per_step
        return self._mean_over_ranks(sums)

    def _handle_non_finite(self) -> None:
        """Apply train.nan_policy to a micro-batch whose loss is NaN/inf on some rank."""
        where = f"optimizer step {self.step + 1}"
        if self.cfg.train.nan_policy == "stop":
            raise TrainingError(
                f"non-finite loss at {where}; stopping (train.nan_policy=stop). The last complete checkpoint "
                f"in {self.ckpt_root} is intact; lower the learning rate or set train.nan_policy=skip."
            )
        self.skipped += 1
        if self.rank == 0:
            print(f"[atma] non-finite loss at {where}: micro-batch skipped ({self.skipped} so far)", flush=True)
        if self.skipped > self.cfg.train.max_skipped_steps:
            raise TrainingError(f"more than train.max_skipped_steps={self.cfg.train.max_skipped_steps} "
                                "non-finite micro-batches; stopping")

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean LM loss over logging.val_batches micro-batches per rank of the validation split."""
        if self.val_loader is None:
            return None
        self.engine.module.eval()
        total, count = 0.0, 0
        # The same validation batches every time: restart the loader at its first batch.
        self.val_loader.reset()
        batches = iter(self.val_loader)
        for _ in range(self.cfg.logging.val_batches):
            input_ids, labels = self._to_device(next(batches))
            total += self.engine(input_ids, labels, loss_chunk_tokens=self.cfg.loss.loss_chunk_tokens).loss.item()
            count += 1
        self.engine.module.train()
        return self._mean_over_ranks({"val": total / max(count, 1)})["val"]

    def save(self) -> None:
        """Write a checkpoint of the current step on every rank."""
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "config": self.cfg.to_dict(),
                  "model_config": self.model_config.to_dict()}
        rank_state = {"loader": self.train_loader.state_dict(), "rng": ckpt.rng_state(), "skipped": self.skipped}
        tag = ckpt.save(self.engine, self.ckpt_root, self.step, client, rank_state,
                        keep_last=self.cfg.checkpoint.keep_last)
        self.monitor.print(f"[atma] saved checkpoint {tag}")

    def _memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train until train.max_steps; checkpoint, validate and log on their cadences."""
        cfg = self.cfg
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._request_stop)
        batches = iter(self.train_loader)
        last_saved = self.step
        self.engine.module.train()
        last = {}
        while self.step < cfg.train.max_steps:
            start = time.perf_counter()
            terms = self.train_step(batches)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - start
            tokens_per_s = self.plan.tokens_per_step / elapsed
            grad_norm = self.engine.get_global_grad_norm()
            scalars = dict(terms)
            scalars.update({
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "perf/step_time_s": elapsed,
                "perf/tokens_per_s": tokens_per_s,
                "perf/tokens_seen": self.tokens_seen,
                "perf/memory_gib": self._memory_gib(),
                "perf/skipped_micro_batches": self.skipped,
            })
            if self.peak_flops:
                scalars["perf/mfu"] = self.flops_per_token * tokens_per_s / (self.peak_flops * self.world)
            if self.step % cfg.logging.every == 0 or self.step == cfg.train.max_steps or self.step == 1:
                self.monitor.log(self.step, scalars)
            if cfg.logging.val_every and (self.step % cfg.logging.val_every == 0 or self.step == cfg.train.max_steps):
                val = self.validate()
                if val is not None:
                    self.monitor.log(self.step, {"loss/val": val}, console=False)
                    self.monitor.print(f"[atma] step {self.step}: val loss {val:.4f}")
            self.monitor.advance()
            last = scalars
            stop = self._stop_agreed()
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.max_steps or stop:
                self.save()
                last_saved = self.step
            if stop:
                self.monitor.print(f"[atma] stop requested: checkpoint saved at step {self.step}; exiting")
                break
        if last_saved != self.step:
            self.save()
        self.monitor.close()
        return last

    def close(self) -> None:
        """Tear down the process group."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
