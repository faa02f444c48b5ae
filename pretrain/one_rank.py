"""ZeRO-3 on one data-parallel rank: what the trainer changes where there is nothing to shard.

DeepSpeed's ZeRO-3 does the same bookkeeping on one rank as on many (gathers, releases, a reduce-scatter of
the gradients), and on CUDA several of its gathers wait for the device. `zero3_for_one_rank` changes the
DeepSpeed config before the engine is built, `keep_parameters_gathered` the built engine's optimizer step.
"""

from __future__ import annotations

import sys
import warnings

import torch.distributed as dist

from .compilation import BLOCK_CLASS, STACK_CLASS

__all__ = ["copies_of_partitions", "keep_parameters_gathered", "zero3_for_one_rank"]


def zero3_for_one_rank(ds: dict, world_size: int, *, module_hooks: bool = True) -> str | None:
    """On one data-parallel rank, drop ZeRO-3's sharding work, as there is nothing to shard; return a notice
    when that changes `ds`.

    - Every parameter is kept whole (persistent). A fetch from a one-rank partition only points the
      parameter at that partition, yet on CUDA DeepSpeed 0.19 waits for the device before each one
      (`NoGatherHandle.wait`, `deepspeed/runtime/zero/partition_parameters.py`): a host sync per fetch,
      for `atma-378m` the LM head's in every micro-batch. Memory is unchanged: a whole parameter is then a
      view of its partition.
    - The stack of blocks is the one leaf module where the JSON names each block one
      (`leaf_module.classes`): DeepSpeed's fetch and release hooks then run once per pass for all the
      blocks instead of once per block, and the blocks' gradients are reduced together after their
      backward. With nothing to gather, the leaf's size costs no memory beyond holding the blocks'
      gradients until then. Not without `module_hooks` (DeepCompile removes DeepSpeed's module hooks),
      nor with the optimizer offloaded, whose gradients leave the device block by block.
    - Gradients are reduced in their bucket (`reduce_scatter: false`): the reduce-scatter path first
      concatenates each bucket's gradients, a copy of all of them per micro-batch; on one rank both paths
      give bitwise the same gradients.
    - The parameters stay gathered through each optimizer step (`keep_parameters_gathered`, applied by
      `build_engine`). Not with the optimizer offloaded, nor without `module_hooks`.

    Parameters offloaded to the CPU or NVMe stay so (and are fetched block by block), and with the optimizer
    offloaded the reduction and the leaf modules stay as configured.
    """
    zero = ds.get("zero_optimization", {})
    if world_size != 1 or zero.get("stage", 0) != 3:
        return None
    offloaded = {part: (zero.get(f"offload_{part}") or {}).get("device", "none") not in (None, "none")
                 for part in ("param", "optimizer")}
    if offloaded["param"]:
        return None
    what, changed = [], []
    # DeepSpeed's defaults: 1e5 elements per tensor, no limit on the model (sys.maxsize, its "no limit").
    defaults = {"stage3_param_persistence_threshold": 100_000, "stage3_model_persistence_threshold": sys.maxsize}
    for key, default in defaults.items():
        before = zero.get(key, default)
        if before < sys.maxsize:
            zero[key] = sys.maxsize
            changed.append(f"{key} {before:,} -> no limit")
    if changed:
        what.append("every parameter is kept whole")
    leaf = zero.get("leaf_module")
    classes = leaf.get("classes") if isinstance(leaf, dict) else None  # DeepSpeed checks the rest of it
    if module_hooks and not offloaded["optimizer"] and isinstance(classes, list) and BLOCK_CLASS in classes:
        leaf["classes"] = [STACK_CLASS if name == BLOCK_CLASS else name for name in classes]
        what.append("the blocks are one leaf module")
        changed.append(f"leaf_module.classes {BLOCK_CLASS} -> {STACK_CLASS}")
    if not offloaded["optimizer"] and zero.get("reduce_scatter", True):
        zero["reduce_scatter"] = False
        what.append("gradients are reduced in place")
        changed.append("reduce_scatter true -> false")
    if not changed:
        return None
    if module_hooks and not offloaded["optimizer"]:
        what.append("the parameters stay gathered through each optimizer step")
    listed = ", ".join(what[:-1]) + " and " + what[-1] if len(what) > 1 else what[0]
    return f"ZeRO-3 on one rank has nothing to shard: {listed} ({', '.join(changed)})"


# What `keep_parameters_gathered` relies on in DeepSpeed's ZeRO-3 optimizer (0.19).
_STEP_INTERNALS = ("step", "_partition_all_parameters", "persistent_parameters", "dp_process_group", "offload_param",
                   "offload_optimizer")


def keep_parameters_gathered(engine, ds_config: dict) -> bool:
    """On one rank, where every parameter is whole, let the engine's ZeRO-3 optimizer step leave them gathered;
    returns whether the step was changed.

    DeepSpeed's ZeRO-3 step releases every parameter before it updates the partitions
    (`_partition_all_parameters`) and gathers the whole ("persistent") ones back after it (`_post_step`): on
    one rank that is Python bookkeeping per parameter and, on CUDA, a wait for the device at the gather
    (`NoGatherCoalescedHandle.wait`), so the host queues nothing of the next step until the update has run.
    There a whole parameter is a view of its partition, which the update writes in place, so the release
    and the gather change nothing: the step skips both. Each step first checks that every gathered parameter
    is such a view; one that is not would miss the update, so then DeepSpeed's own step takes over for good,
    with a warning. Outside the step (checkpoint loads, saves) DeepSpeed releases and gathers as before.
    Unchanged on more ranks, with parameters or the optimizer offloaded, with quantized weights, under
    DeepCompile, where a parameter is not whole, or where this DeepSpeed's optimizer lacks what is replaced
    (then with a warning).
    """
    zero = ds_config.get("zero_optimization", {})
    if engine.zero_optimization_stage() != 3 or ds_config.get("compile", {}).get("deepcompile", False):
        return False
    optimizer = engine.optimizer
    if zero.get("zero_quantized_weights", False) or dist.get_world_size(
            group=getattr(optimizer, "dp_process_group", None)) != 1:
        return False
    missing = [name for name in _STEP_INTERNALS if not hasattr(optimizer, name)]
    if missing:
        warnings.warn(f"{type(optimizer).__name__} lacks {', '.join(missing)}: ZeRO-3 on one rank releases and "
                      "gathers every parameter around each optimizer step, as DeepSpeed does", stacklevel=2)
        return False
    if optimizer.offload_param or optimizer.offload_optimizer:
        return False
    if not all(getattr(p, "ds_persist", False) for p in engine.module.parameters()):
        return False
    step = optimizer.step
    params = list(engine.module.parameters())

    def step_keeping_parameters_gathered(closure=None):
        """DeepSpeed's step without releasing the parameters before the update or gathering them after it."""
        copies = copies_of_partitions(params)
        if copies:
            warnings.warn(f"{copies} gathered parameter(s) are not views of their ZeRO-3 partition, so the optimizer "
                          "step would not reach them: DeepSpeed's own step releases and gathers every parameter "
                          "from now on", RuntimeWarning, stacklevel=2)
            del optimizer.step  # the class's step from now on
            return step(closure)
        persistent = optimizer.persistent_parameters
        optimizer._partition_all_parameters = _keep_parameters
        optimizer.persistent_parameters = []  # what `_post_step` gathers back
        try:
            return step(closure)
        finally:
            del optimizer._partition_all_parameters
            optimizer.persistent_parameters = persistent

    optimizer.step = step_keeping_parameters_gathered
    return True


def _keep_parameters() -> None:
    """In place of ZeRO-3's release of every parameter before the update: nothing to release on one rank."""


def copies_of_partitions(params) -> int:
    """How many of the gathered ZeRO-3 `params` hold their data apart from their partition (`ds_tensor`)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(1 for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE
               and p.data.untyped_storage().data_ptr() != p.ds_tensor.untyped_storage().data_ptr())
