"""The dtypes DeepSpeed adds gradients in, over the micro-batches and over the ranks, read from a DeepSpeed config as
DeepSpeed 0.19 reads them.

DeepSpeed accumulates gradients in `data_types.grad_accum_dtype`, by default the weights' dtype. With bf16 weights
that default adds each micro-batch's gradient to the running sum in bf16 (8 significant bits), which loses about
5e-3 of the sum over 16 micro-batches (`tests/test_pretrain_accumulation.py`); the reference's fp32 master weights
accumulate in fp32. The shipped ZeRO-1/2/3 JSONs therefore set fp32. Under ZeRO-1 DeepSpeed then runs its
`BF16_Optimizer` instead of its ZeRO optimizer; DeepSpeed 0.19 has no fp32 accumulation for bf16 weights without ZeRO.
It sums the gradients over the ranks in `communication_data_type`, by default again the weights' dtype, which in bf16
rounds each sum (1.7e-3 of the gradient on 2 ranks, 2.5e-3 on 4); the shipped ZeRO-1/2/3 JSONs set fp32 there too.
"""

from __future__ import annotations

import torch

from .config import ConfigError

__all__ = ["accumulation_dtype", "check_accumulation", "communication_dtype", "runs_bf16_optimizer"]


def _weights_dtype(ds: dict) -> torch.dtype:
    return torch.bfloat16 if ds.get("bf16", {}).get("enabled", False) else torch.float32


def accumulation_dtype(ds: dict, source: str = "DeepSpeed config") -> torch.dtype:
    """The dtype the gradients of `ds`'s micro-batches are added in (ConfigError for a name DeepSpeed does not read)."""
    from deepspeed.runtime.config import DtypeEnum

    data_types = ds.get("data_types", {})
    if not isinstance(data_types, dict):
        raise ConfigError(f"{source}: data_types must be a JSON object, got {data_types!r}")
    name = data_types.get("grad_accum_dtype")
    if name is None:
        return _weights_dtype(ds)
    try:
        return DtypeEnum(name).value
    except ValueError:
        known = ", ".join(repr(member.name) for member in DtypeEnum)
        raise ConfigError(f"{source}: data_types.grad_accum_dtype {name!r} is not a dtype DeepSpeed reads "
                          f"(one of {known})") from None


def communication_dtype(ds: dict, source: str = "DeepSpeed config") -> torch.dtype:
    """The dtype `ds`'s gradients are summed over the ranks in (ConfigError for a name DeepSpeed does not read)."""
    from deepspeed.runtime.config import get_communication_data_type

    try:
        dtype = get_communication_data_type(ds)
    except (AttributeError, ValueError):  # DeepSpeed lower-cases the name, then compares it with its three
        raise ConfigError(f"{source}: communication_data_type {ds['communication_data_type']!r} is not a dtype "
                          "DeepSpeed reduces in (one of 'fp32', 'bf16', 'fp16')") from None
    return _weights_dtype(ds) if dtype is None else dtype


def runs_bf16_optimizer(ds: dict) -> bool:
    """Whether DeepSpeed builds its `BF16_Optimizer` (not its ZeRO optimizer) for `ds`: ZeRO-1, bf16 weights, fp32
    accumulation, the optimizer on the device."""
    zero = ds.get("zero_optimization", {})
    offloaded = (zero.get("offload_optimizer") or {}).get("device", "none") not in (None, "none")
    return (zero.get("stage", 0) == 1 and not offloaded and _weights_dtype(ds) == torch.bfloat16
            and accumulation_dtype(ds) == torch.float32)


def check_accumulation(ds: dict, grad_accum: int, source: str) -> str | None:
    """Raise ConfigError for an accumulation dtype DeepSpeed would refuse from deep inside its engine; return a
    warning when the gradients of several micro-batches are added in bf16."""
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    weights, accumulation = _weights_dtype(ds), accumulation_dtype(ds, source)
    if stage == 0 and accumulation != weights:
        raise ConfigError(f"{source}: data_types.grad_accum_dtype {ds['data_types']['grad_accum_dtype']!r} needs ZeRO "
                          f"stage 1, 2 or 3: without ZeRO, DeepSpeed accumulates gradients in the weights' dtype "
                          f"({str(weights).removeprefix('torch.')}) only")
    if accumulation != torch.bfloat16 or grad_accum == 1:
        return None
    fix = ("ZeRO-1/2/3 with data_types.grad_accum_dtype fp32 (the shipped JSONs) add them in fp32" if stage == 0
           else "set data_types.grad_accum_dtype to fp32 to add them in fp32")
    return (f"{source}: the gradients of {grad_accum} micro-batches are added in bf16, each addition rounding the sum "
            f"to 8 significant bits; {fix}")
