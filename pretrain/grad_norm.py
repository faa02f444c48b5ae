"""The ZeRO optimizers' gradient norm for clipping, taken in one multi-tensor reduction instead of one per tensor.

DeepSpeed's ZeRO optimizers take each group's gradient norm one tensor at a time (`get_grad_norm_direct`,
`deepspeed/runtime/zero/stage3.py` and `stage_1_and_2.py`): they cast the tensor to fp64, reduce it, and
repeat, so two kernels and a turn of a Python loop per gradient tensor (264 for `atma-378m` under ZeRO-3)
and a copy of every gradient in fp64. The step runs it after the backward's last wait for the device and
before its own host sync, so on CUDA the device has nothing else queued while the host loops.
`fuse_gradient_norm` replaces it with `gradient_norms`: the same formula, every tensor's norm still
accumulated in fp64, from one `torch._foreach_norm` over all groups.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["NORM_METHODS", "fuse_gradient_norm", "gradient_norms"]


def gradient_norms(groups, *, dtype: torch.dtype = torch.float64, sum_dtype: torch.dtype | None = None,
                   all_reduce=None, device: torch.device | None = None) -> list[torch.Tensor]:
    """Each group's L2 norm of its gradient tensors as DeepSpeed's ZeRO optimizers take it, for all groups at once.

    As their `get_grad_norm_direct` does: each tensor's norm accumulated in `dtype`, their squares summed per
    group (then cast to `sum_dtype`, as ZeRO-1/2 cast it to fp32), the sums added up over the ranks
    (`all_reduce`, in place, on all groups' sums at once; None on one rank), then the square root, and -1
    where that is not finite (an inf or NaN gradient). A rank without any gradient tensor contributes zeros
    on `device`, so that its all-reduce still meets the other ranks'.
    """
    groups = [list(group) for group in groups]
    tensors = [g for group in groups for g in group]
    if tensors:
        squares = torch.stack(torch._foreach_norm(tensors, 2.0, dtype=dtype)).pow(2.0)
        sums, start = [], 0
        for group in groups:
            sums.append(squares[start:start + len(group)].sum())
            start += len(group)
        totals = torch.stack(sums)
    elif device is not None:
        totals = torch.zeros(len(groups), dtype=dtype, device=device)
    else:
        raise ValueError("gradient_norms needs a device where no group has a gradient tensor")
    if sum_dtype is not None:
        totals = totals.to(sum_dtype)
    if all_reduce is not None:
        all_reduce(totals)
    totals = totals**0.5
    return list(torch.where(totals.isfinite(), totals, -1.0).unbind())


# The method each ZeRO optimizer of DeepSpeed (0.19) takes its norm in, and what else `fuse_gradient_norm` reads.
NORM_METHODS = {3: "_get_norm_groups", 2: "scaled_global_norm", 1: "scaled_global_norm"}
_INTERNALS = {3: ("averaged_gradients", "fp16_groups", "offload_optimizer", "model_parallel_group", "dp_process_group"),
              2: ("averaged_gradients", "bit16_groups", "params_in_partition", "cpu_offload", "model_parallel_group",
                  "has_moe_layers", "dp_process_group")}
_INTERNALS[1] = _INTERNALS[2]


def fuse_gradient_norm(engine, ds_config: dict) -> bool:
    """Let the engine's ZeRO optimizer take its gradient norm with `gradient_norms`; returns whether it does.

    Unchanged with the optimizer offloaded (its norm is taken on the CPU), with tensor, pipeline or expert
    parallelism (whose norms count parameters per rank), with parameters partitioned over different groups,
    under DeepCompile, for DeepSpeed's other optimizer wrappers (ZeRO-1 with bf16 parameters and fp32
    gradients runs `BF16_Optimizer`), or where this DeepSpeed's ZeRO optimizer lacks what is replaced (then
    with a warning).
    """
    stage = engine.zero_optimization_stage()
    if stage not in NORM_METHODS or ds_config.get("compile", {}).get("deepcompile", False):
        return False
    optimizer = engine.optimizer
    if not hasattr(optimizer, NORM_METHODS[stage]):  # another wrapper (e.g. BF16_Optimizer under ZeRO-1)
        return False
    missing = [name for name in _INTERNALS[stage] if not hasattr(optimizer, name)]
    if missing:
        warnings.warn(f"{type(optimizer).__name__} lacks {', '.join(missing)}: ZeRO-{stage} takes its gradient norm "
                      "one tensor at a time, as DeepSpeed does", stacklevel=2)
        return False
    fused = _zero3_norm_groups(optimizer) if stage == 3 else _zero12_global_norm(optimizer)
    if fused is None:
        return False
    setattr(optimizer, NORM_METHODS[stage], fused)
    return True


def _summed_over(group):
    """An in-place all-reduce (sum) over `group`, or None where the group is one rank, as the sum changes nothing."""
    from deepspeed import comm

    if comm.get_world_size(group=group) == 1:
        return None
    return lambda totals: comm.all_reduce(totals, op=comm.ReduceOp.SUM, group=group)


def _scaled_back(optimizer, norms: list[torch.Tensor]) -> list[torch.Tensor]:
    """As DeepSpeed scales the norm of a Muon update lacking the loss scale back (`_muon_update_lacks_loss_scale`)."""
    lacks_scale = getattr(optimizer, "_muon_update_lacks_loss_scale", None)
    return [torch.where(norm >= 0, norm * optimizer.loss_scale, norm) if lacks_scale is not None and lacks_scale(i)
            else norm for i, norm in enumerate(norms)]


def _zero3_norm_groups(optimizer):
    """In place of ZeRO-3's `_get_norm_groups` (each sub-group's norm), or None where it does not apply."""
    if optimizer.offload_optimizer or optimizer.model_parallel_group is not None:
        return None
    params = [p for group in optimizer.fp16_groups for p in group]
    if any(getattr(p, "ds_zero_placement_family", "replicated") != "replicated" for p in params):
        return None
    if len({id(getattr(p, "ds_process_group", optimizer.dp_process_group)) for p in params}) != 1:
        return None
    from deepspeed.runtime.zero.utils import get_norm_dtype

    reduce = _summed_over(getattr(params[0], "ds_process_group", optimizer.dp_process_group))

    def norm_groups():
        """Each sub-group's gradient norm, as DeepSpeed's `_get_norm_groups` returns them."""
        grads = [optimizer.averaged_gradients[i] for i in range(len(optimizer.fp16_groups))]
        return _scaled_back(optimizer, gradient_norms(grads, dtype=get_norm_dtype(), all_reduce=reduce))

    return norm_groups


def _zero12_global_norm(optimizer):
    """In place of ZeRO-1/2's `scaled_global_norm` (the norm over all groups), or None where it does not apply."""
    if optimizer.cpu_offload or optimizer.model_parallel_group is not None or optimizer.has_moe_layers:
        return None
    if any(getattr(p, "ds_pipe_replicated", False) for group in optimizer.params_in_partition for p in group):
        return None
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.utils import combine_grad_norm_groups
    from deepspeed.runtime.zero.utils import get_norm_dtype

    reduce = _summed_over(optimizer.dp_process_group)
    device = torch.device(get_accelerator().current_device_name())

    def scaled_global_norm(norm_type=2):
        """The norm over all groups' gradients, as DeepSpeed's `scaled_global_norm` returns it."""
        if norm_type != 2:
            raise ValueError(f"only the L2 gradient norm is supported, not norm_type={norm_type}")
        grads = []
        for i in range(len(optimizer.bit16_groups)):
            # DeepSpeed pairs the group's real gradients (not its padding) with its parameters, in order.
            real = (g for g in optimizer.averaged_gradients[i] if not getattr(g, "_zero_padding", False))
            grads.append([g for g, _ in zip(real, optimizer.params_in_partition[i])])
        norms = gradient_norms(grads, dtype=get_norm_dtype(), sum_dtype=torch.float32, all_reduce=reduce,
                               device=device)
        return combine_grad_norm_groups(_scaled_back(optimizer, norms))

    return scaled_global_norm
