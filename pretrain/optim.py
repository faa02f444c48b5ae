"""Optimizers (AdamW, Muon with auxiliary AdamW) with the project's parameter groups, and LR schedules."""

from __future__ import annotations

import os
import re

import math

import torch

from .config import OptimSection, ScheduleSection


def build_param_groups(model: torch.nn.Module, cfg: OptimSection) -> list[dict]:
    """Parameter groups by the model's parameter roles, each with a `name`, base `lr` and, for Muon, `use_muon`.

    Muon takes the block matrices; embeddings, the LM head, depthwise conv kernels and 1-D
    tensors go to AdamW (DESIGN departure 5).
    """
    buckets: dict[str, list] = {"matrix": [], "conv": [], "embed": [], "head": [], "scalar": []}
    roles = model.parameter_roles()
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets[roles[name]].append(p)
    groups = []
    if cfg.name == "muon":
        adam = dict(betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0, use_muon=False)
        spec = [
            ("matrix", dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay,
                            use_muon=True)),
            ("embed", dict(lr=cfg.embed_lr, **adam)),
            ("head", dict(lr=cfg.head_lr, **adam)),
            ("scalar", dict(lr=cfg.scalar_lr, **adam)),
            ("conv", dict(lr=cfg.scalar_lr, **adam)),
        ]
    else:
        decay = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
        spec = [("matrix", decay), ("head", decay), ("conv", dict(lr=cfg.lr, weight_decay=0.0)),
                ("embed", dict(lr=cfg.lr, weight_decay=0.0)), ("scalar", dict(lr=cfg.lr, weight_decay=0.0))]
    for bucket, settings in spec:
        if buckets[bucket]:
            groups.append(dict(params=buckets[bucket], name=bucket, **settings))
    return groups


def build_optimizer(model: torch.nn.Module, cfg: OptimSection, *, device_type: str, cpu_offload: bool):
    """Build the optimizer for deepspeed.initialize (AdamW flavour chosen for the device)."""
    groups = build_param_groups(model, cfg)
    for g in groups:
        g["base_lr"] = g["lr"]
    if cfg.name == "muon":
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

        for p in model.parameters():
            p.use_muon = False
        for g in groups:
            for p in g["params"]:
                p.use_muon = g["use_muon"]
        adam_cls, adam_kwargs = _adam_class(device_type, cpu_offload)
        return MuonWithAuxAdam(groups, adam_optimizer=adam_cls, adam_optimizer_kwargs=adam_kwargs)
    adam_cls, adam_kwargs = _adam_class(device_type, cpu_offload)
    return adam_cls(groups, betas=tuple(cfg.betas), eps=cfg.eps, **adam_kwargs)


def jit_safe_arch_list(value: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST without arch suffixes ("9.0a" -> "9.0"), which DeepSpeed's op builder rejects."""
    if value is None:
        return None
    return re.sub(r"(\d+\.\d+)[a-z]+\b", r"\1", value)


def _prepare_op_build_env() -> None:
    # DeepSpeed JIT-builds its ops with TORCH_CUDA_ARCH_LIST; "9.0a" (set on many Hopper images)
    # makes its version parser fail with "invalid literal for int()". The plain arch builds the same ops.
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    safe = jit_safe_arch_list(value)
    if safe != value:
        os.environ["TORCH_CUDA_ARCH_LIST"] = safe


def _adam_class(device_type: str, cpu_offload: bool):
    """DeepSpeed's CPU Adam under offload, FusedAdam on CUDA, torch AdamW otherwise."""
    _prepare_op_build_env()
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam, {"adamw_mode": True}
    if device_type == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam, {"adam_w_mode": True}
    return torch.optim.AdamW, {}


def lr_multiplier(step: int, total: int, cfg: ScheduleSection) -> float:
    """LR multiplier at optimizer step `step` (0-based) of `total`; pure function of the step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "paper":
        # SPEC §6.3: 1 for step/total < flat_fraction, then (1 - step/total) / (1 - flat_fraction).
        frac = step / total
        if frac < cfg.flat_fraction:
            return 1.0
        return max(0.0, (1.0 - frac) / max(1.0 - cfg.flat_fraction, 1e-12))
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warmup, stable at 1, then linear decay to the floor over the last part.
    decay_start = int(cfg.decay_start_fraction * total)
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(total - decay_start, 1)
    return 1.0 - (1.0 - floor) * min(progress, 1.0)


def apply_lr(optimizer, multiplier: float) -> None:
    """Set every param group's lr to its base lr times `multiplier`."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", group["lr"]) * multiplier
