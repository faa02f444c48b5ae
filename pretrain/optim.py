"""Optimizers (AdamW, Muon with auxiliary AdamW) with the project's parameter groups, and LR schedules."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from .config import OptimSection, ScheduleSection
from .opbuild import toolkit_missing


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


@dataclass(frozen=True)
class AdamChoice:
    """The Adam implementation a run steps with: its class, constructor arguments and how it gets there."""

    name: str
    """deepspeed_fused_adam, deepspeed_cpu_adam, torch_fused_adamw or torch_adamw."""
    cls: type
    kwargs: dict
    builds: str | None = None
    """The DeepSpeed op builder compiled on first use (None: nothing to compile)."""
    note: str = ""
    """Why the usual choice was not taken here (printed once at start), else empty."""


def choose_adam(device_type: str, cpu_offload: bool) -> AdamChoice:
    """DeepSpeed's CPU Adam under offload; on CUDA DeepSpeed's fused Adam, or torch's fused AdamW where that
    cannot be compiled (no toolkit); torch's AdamW on the CPU."""
    _prepare_op_build_env()
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return AdamChoice("deepspeed_cpu_adam", DeepSpeedCPUAdam, {"adamw_mode": True}, builds="CPUAdamBuilder")
    if device_type == "cuda":
        missing = toolkit_missing("fused_adam")
        if not missing:
            from deepspeed.ops.adam import FusedAdam

            return AdamChoice("deepspeed_fused_adam", FusedAdam, {"adam_w_mode": True}, builds="FusedAdamBuilder")
        return AdamChoice("torch_fused_adamw", torch.optim.AdamW, {"fused": True},
                          note=f"DeepSpeed's fused Adam is not installed prebuilt and there is {missing}: the "
                               "optimizer steps with torch's fused AdamW instead (the same update); for "
                               "DeepSpeed's, install the CUDA toolkit or set CUDA_HOME")
    return AdamChoice("torch_adamw", torch.optim.AdamW, {})


def build_optimizer(model: torch.nn.Module, cfg: OptimSection, adam: AdamChoice):
    """Build the optimizer for deepspeed.initialize with the Adam implementation `adam` (`choose_adam`)."""
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
        optimizer = MuonWithAuxAdam(groups, adam_optimizer=adam.cls, adam_optimizer_kwargs=adam.kwargs)
    else:
        optimizer = adam.cls(groups, betas=tuple(cfg.betas), eps=cfg.eps, **adam.kwargs)
    optimizer.register_load_state_dict_pre_hook(match_step_counters)
    return optimizer


def _stepping_adam(optimizer):
    """The Adam that steps `optimizer` (DeepSpeed's wrapper unwrapped; under Muon its auxiliary Adam, or Muon
    itself where it updates inline)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return getattr(inner, "aux_optimizer", None) or inner


def keeps_tensor_steps(optimizer) -> bool:
    """Whether `optimizer`'s Adam counts steps in tensors, as torch's does; DeepSpeed's Adams and Muon's inline
    update count in ints."""
    return isinstance(_stepping_adam(optimizer), (torch.optim.Adam, torch.optim.AdamW))


def match_step_counters(optimizer, state_dict: dict) -> dict:
    """Load-state-dict pre-hook: each saved `step` as the type `optimizer` keeps, so a checkpoint moves
    between machines that step with torch's AdamW and with DeepSpeed's fused Adam (`choose_adam`)."""
    as_tensor = keeps_tensor_steps(optimizer)
    for state in state_dict.get("state", {}).values():
        if isinstance(state, dict) and "step" in state:
            state["step"] = _counter_as(state["step"], as_tensor, "cpu")  # torch's load moves it where it belongs
    return state_dict


def match_loaded_step_counters(optimizer) -> int:
    """`match_step_counters` for state restored without the optimizer's own load (DeepSpeed's universal and
    elastic restores write it in place); `optimizer` may be DeepSpeed's wrapper. Returns how many changed."""
    inner = getattr(optimizer, "optimizer", optimizer)
    as_tensor = keeps_tensor_steps(inner)
    # torch keeps a fused or capturable Adam's counters on the parameter's device, the others on the CPU.
    on_device = {id(p) for g in inner.param_groups if g.get("fused") or g.get("capturable") for p in g["params"]}
    changed = 0
    for param, state in inner.state.items():
        if "step" in state and isinstance(state["step"], torch.Tensor) != as_tensor:
            state["step"] = _counter_as(state["step"], as_tensor, param.device if id(param) in on_device else "cpu")
            changed += 1
    return changed


def _counter_as(step, as_tensor: bool, device):
    """An Adam step counter as a float32 tensor on `device` (torch's Adams) or an int (DeepSpeed's)."""
    if as_tensor:
        return step if isinstance(step, torch.Tensor) else torch.tensor(float(step), dtype=torch.float32, device=device)
    return int(step.item()) if isinstance(step, torch.Tensor) else step


def adam_in_use(optimizer) -> str:
    """The Adam stepping `optimizer` (a DeepSpeed wrapper, Muon or an Adam), e.g. "FusedAdam" or "AdamW (fused)"."""
    adam = _stepping_adam(optimizer)
    fused = any(group.get("fused") for group in adam.param_groups)
    return type(adam).__name__ + (" (fused)" if fused else "")


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
