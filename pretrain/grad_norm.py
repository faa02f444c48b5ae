"""ZeRO-3's gradient norm for clipping, taken in one multi-tensor reduction instead of one per gradient tensor.

DeepSpeed's ZeRO-3 optimizer takes each sub-group's gradient norm one tensor at a time
(`get_grad_norm_direct`, `deepspeed/runtime/zero/stage3.py`): it casts the tensor to fp64, reduces it,
and repeats, so two kernels and a turn of a Python loop per gradient tensor (264 for `atma-378m`) and a copy
of every gradient in fp64. The step runs it after the backward's last wait for the device and before its
own host sync, so on CUDA the device has nothing else queued while the host loops. `fuse_gradient_norm`
replaces it with `gradient_norms`: the same formula, every tensor's norm still accumulated in fp64, from one
`torch._foreach_norm` over all sub-groups.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["fuse_gradient_norm", "gradient_norms"]


def gradient_norms(groups, *, dtype: torch.dtype = torch.float64, all_reduce=None) -> list[torch.Tensor]:
    """Each group's L2 norm of its gradient tensors as DeepSpeed's ZeRO-3 takes it, for all groups at once.

    As `get_grad_norm_direct` does: each tensor's norm accumulated in `dtype`, their squares summed per group,
    the sums added up over the ranks (`all_reduce`, in place, on all groups' sums at once; None on one rank),
    then the square root, and -1 where that is not finite (an inf or NaN gradient).
    """
    groups = [list(group) for group in groups]
    tensors = [g for group in groups for g in group]
    if not tensors:
        raise ValueError("gradient_norms needs at least one gradient tensor")
    squares = torch.stack(torch._foreach_norm(tensors, 2.0, dtype=dtype)).pow(2.0)
    sums, start = [], 0
    for group in groups:
        sums.append(squares[start:start + len(group)].sum())
        start += len(group)
    totals = torch.stack(sums)
    if all_reduce is not None:
        all_reduce(totals)
    totals = totals**0.5
    return list(torch.where(totals.isfinite(), totals, -1.0).unbind())


# What `fuse_gradient_norm` reads in DeepSpeed's ZeRO-3 optimizer (0.19) besides the method it replaces.
_NORM_INTERNALS = ("_get_norm_groups", "averaged_gradients", "fp16_groups", "offload_optimizer", "model_parallel_group",
                   "dp_process_group")


def fuse_gradient_norm(engine, ds_config: dict) -> bool:
    """Let the engine's ZeRO-3 optimizer take its gradient norm with `gradient_norms`; returns whether it does.

    Unchanged with the optimizer offloaded (its norm is taken on the CPU), with tensor or expert parallelism
    (whose norms count parameters per rank), with parameters partitioned over different groups, under
    DeepCompile, or where this DeepSpeed's optimizer lacks what is replaced (then with a warning).
    """
    if engine.zero_optimization_stage() != 3 or ds_config.get("compile", {}).get("deepcompile", False):
        return False
    optimizer = engine.optimizer
    missing = [name for name in _NORM_INTERNALS if not hasattr(optimizer, name)]
    if missing:
        warnings.warn(f"{type(optimizer).__name__} lacks {', '.join(missing)}: ZeRO-3 takes its gradient norm one "
                      "tensor at a time, as DeepSpeed does", stacklevel=2)
        return False
    if optimizer.offload_optimizer or optimizer.model_parallel_group is not None:
        return False
    params = [p for group in optimizer.fp16_groups for p in group]
    if any(getattr(p, "ds_zero_placement_family", "replicated") != "replicated" for p in params):
        return False
    if len({id(getattr(p, "ds_process_group", optimizer.dp_process_group)) for p in params}) != 1:
        return False
    from deepspeed import comm
    from deepspeed.runtime.zero.utils import get_norm_dtype

    group = getattr(params[0], "ds_process_group", optimizer.dp_process_group)

    def all_reduce(totals):
        comm.all_reduce(totals, op=comm.ReduceOp.SUM, group=group)

    reduce = all_reduce if comm.get_world_size(group=group) > 1 else None  # a sum over one rank changes nothing

    def norm_groups():
        """Each sub-group's gradient norm, as DeepSpeed's `_get_norm_groups` returns them."""
        grads = [optimizer.averaged_gradients[i] for i in range(len(optimizer.fp16_groups))]
        norms = gradient_norms(grads, dtype=get_norm_dtype(), all_reduce=reduce)
        lacks_scale = getattr(optimizer, "_muon_update_lacks_loss_scale", None)
        for i, norm in enumerate(norms):
            if lacks_scale is not None and lacks_scale(i):  # as DeepSpeed scales a Muon update's norm back
                norms[i] = torch.where(norm >= 0, norm * optimizer.loss_scale, norm)
        return norms

    optimizer._get_norm_groups = norm_groups
    return True
