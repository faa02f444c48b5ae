"""ZeRO on one data-parallel rank: what the trainer changes where there is nothing to shard.

DeepSpeed's ZeRO-3 does the same bookkeeping on one rank as on many (gathers, releases, a reduce-scatter of
the gradients), and on CUDA several of its gathers wait for the device. `zero3_for_one_rank` changes the
DeepSpeed config before the engine is built, `keep_parameters_gathered` the built engine's optimizer step and
`reduce_gradients_into_partitions` its gradient hooks. ZeRO-1 and ZeRO-2 copy every gradient through a
reduction buffer, and with `overlap_comm` wait for the device after each backward: `zero12_for_one_rank`
changes their config.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist

from .compilation import BLOCK_CLASS, STACK_CLASS

__all__ = ["copies_of_partitions", "keep_parameters_gathered", "reduce_gradients_into_partitions", "zero12_for_one_rank",
           "zero3_for_one_rank"]


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
    - Gradients are reduced in place (`reduce_scatter: false`): the reduce-scatter path first concatenates
      each bucket's gradients, a copy of all of them per micro-batch; on one rank both paths give bitwise the
      same gradients. With it the built engine moves each gradient straight into its partition
      (`reduce_gradients_into_partitions`, applied by `build_engine`); where DeepSpeed's own gradient hooks
      run (DeepCompile), they reduce in their bucket.
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


def zero12_for_one_rank(ds: dict, world_size: int, *, muon: bool = False) -> str | None:
    """On one data-parallel rank, let ZeRO-1/2 keep each gradient in its own tensor and not wait for the device
    after each backward; return a notice when that changes `ds`.

    - `contiguous_gradients: false`. With it on, DeepSpeed 0.19 copies each gradient into a reduction bucket as
      the backward produces it, reduces the bucket, and copies every gradient again, one tensor at a time,
      into a flat buffer of the rank's partition (`copy_grads_in_partition`,
      `deepspeed/runtime/zero/stage_1_and_2.py`). Off, the gradients stay in their own tensors and each full
      bucket is reduced in one flattened copy. On one rank the partition is the whole model and the
      reduction divides by one, so both move the same values.
    - `overlap_comm: false`. With it on, the reduction runs on a stream of its own, and DeepSpeed's epilogue of
      each backward synchronises the whole device (`independent_gradient_partition_epilogue`) before it
      frees what it reduced: the host queues nothing more until the backward has run.

    On one rank both give bitwise the same training (`tests/test_pretrain_throughput.py`): the reduction of
    one rank's gradients divides by one. The gradients stay contiguous, and only the wait goes, with `muon`
    (DeepSpeed's Muon runs its Newton-Schulz iteration through torch.compile, whose code follows how the
    gradients are laid out, so its update then differs in the last bits) and
    with a gradient predivide factor (the buffers divide by it and multiply back, which rounds). Unchanged on
    more ranks, for other stages and with the optimizer offloaded (whose copies to the host use those
    buffers and that stream).
    """
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if world_size != 1 or stage not in (1, 2):
        return None
    if (zero.get("offload_optimizer") or {}).get("device", "none") not in (None, "none"):
        return None
    # Through the contiguous buffers a predivide factor divides each gradient and multiplies it back (when
    # postscaling, DeepSpeed's default): not bitwise the gradient, so those buffers stay.
    predivide = ds.get("gradient_predivide_factor", 1.0) != 1.0 and not ds.get("prescale_gradients", False)
    keep_contiguous = muon or predivide
    changed = []
    # DeepSpeed's defaults for stages 1 and 2: contiguous gradients on, overlap off.
    for key, default in (("contiguous_gradients", True), ("overlap_comm", False)):
        if zero.get(key, default) and not (keep_contiguous and key == "contiguous_gradients"):
            zero[key] = False
            changed.append(f"{key} true -> false")
    if not changed:
        return None
    said = {"contiguous_gradients": "gradients skip DeepSpeed's contiguous buffers",
            "overlap_comm": "the host does not wait for the device after each backward"}
    what = [said[change.split()[0]] for change in changed]
    return f"ZeRO-{stage} on one rank has nothing to reduce: {' and '.join(what)} ({', '.join(changed)})"


# What `keep_parameters_gathered` relies on in DeepSpeed's ZeRO-3 optimizer (0.19).
_STEP_INTERNALS = ("step", "_partition_all_parameters", "persistent_parameters", "dp_process_group", "offload_param",
                   "offload_optimizer")


def _one_rank_zero3_optimizer(engine, ds_config: dict, internals: tuple[str, ...], otherwise: str):
    """The engine's ZeRO-3 optimizer where it runs on one rank, with nothing offloaded, unquantized weights and
    without DeepCompile, else None; also None, with a warning ending in `otherwise`, where it lacks one of
    `internals`."""
    zero = ds_config.get("zero_optimization", {})
    if engine.zero_optimization_stage() != 3 or ds_config.get("compile", {}).get("deepcompile", False):
        return None
    optimizer = engine.optimizer
    if zero.get("zero_quantized_weights", False) or dist.get_world_size(
            group=getattr(optimizer, "dp_process_group", None)) != 1:
        return None
    missing = [name for name in internals if not hasattr(optimizer, name)]
    if missing:
        warnings.warn(f"{type(optimizer).__name__} lacks {', '.join(missing)}: ZeRO-3 on one rank {otherwise}",
                      stacklevel=3)
        return None
    if optimizer.offload_param or optimizer.offload_optimizer:
        return None
    return optimizer


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
    optimizer = _one_rank_zero3_optimizer(engine, ds_config, _STEP_INTERNALS,
                                          "releases and gathers every parameter around each optimizer step, as "
                                          "DeepSpeed does")
    if optimizer is None or not all(getattr(p, "ds_persist", False) for p in engine.module.parameters()):
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


# Where DeepSpeed's ZeRO-3 optimizer (0.19) keeps each parameter's gradient partition, a view of its flat buffer.
_GRADIENT_PARTITIONS = "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition"
# What `reduce_gradients_into_partitions` relies on in it.
_GRADIENT_INTERNALS = ("reduce_ready_partitions_and_remove_grads", "independent_gradient_partition_epilogue",
                       "_coalesce_grad_reduction", "micro_step_id", _GRADIENT_PARTITIONS, "fp16_groups",
                       "get_param_comm_dtype", "gradient_accumulation_dtype", "_get_param_partition_group",
                       "postscale_gradients", "gradient_predivide_factor", "sequence_parallel_size", "zenflow",
                       "reduce_and_partition_stream", "dp_process_group", "offload_param", "offload_optimizer")


def reduce_gradients_into_partitions(engine, ds_config: dict) -> bool:
    """On one rank, let the engine's ZeRO-3 optimizer move each gradient straight into its partition of the flat
    gradient buffer; returns whether it does.

    DeepSpeed's gradient hook (`reduce_independent_p_g_buckets_and_remove_grads`) copies each gradient into a
    reduction bucket on a stream of its own, divides each full bucket by the number of ranks, all-reduces it,
    and copies every gradient from it into its partition: two copies and a turn of a Python loop per
    gradient tensor in each micro-batch, and after each backward the host waits for that stream, so for the
    whole backward. On one rank the division (by one) and the all-reduce change nothing, so the hook now only
    notes the gradient, and DeepSpeed's epilogue of each backward first copies the noted gradients into their
    partitions (adds them, after a step's first micro-batch) in one multi-tensor operation on the current
    stream: the same gradients, bit for bit. With `overlap_comm` on, nothing of the backward is queued on
    that stream, so the host's wait for it no longer waits for the backward; DeepSpeed's later work there
    (the fp16 overflow check) waits for the copies on the device. Only where gradients are
    reduced in their bucket (`reduce_scatter: false`, as `zero3_for_one_rank` sets); unchanged on more ranks,
    with parameters or the optimizer offloaded, with quantized weights or gradients, under DeepCompile or
    ZenFlow, with sequence parallelism, a gradient predivide factor, a communication dtype other than a
    parameter's or fp32, or where this DeepSpeed's optimizer lacks what is replaced (then with a warning).
    """
    zero = ds_config.get("zero_optimization", {})
    if zero.get("reduce_scatter", True) or zero.get("zero_quantized_gradients", False):
        return False
    optimizer = _one_rank_zero3_optimizer(engine, ds_config, _GRADIENT_INTERNALS,
                                          "copies each gradient into a reduction bucket and then into its "
                                          "partition, as DeepSpeed does")
    if optimizer is None or optimizer.zenflow or optimizer.sequence_parallel_size != 1:
        return False
    if optimizer.postscale_gradients and optimizer.gradient_predivide_factor != 1.0:
        return False  # the bucket is divided by the factor and multiplied back: not bitwise the gradient
    params = [p for group in optimizer.fp16_groups for p in group]
    # A communication dtype wider than the parameter's (fp32) holds its gradient exactly: on one rank the bucket
    # then carries the same values.
    if any(optimizer.get_param_comm_dtype(p) not in (p.dtype, torch.float32)
           or getattr(p, "ds_zero_placement_family", "replicated") != "replicated"
           or dist.get_world_size(group=optimizer._get_param_partition_group(p)) != 1 for p in params):
        return False
    partitions = getattr(optimizer, _GRADIENT_PARTITIONS)
    epilogue = optimizer.independent_gradient_partition_epilogue
    noted: dict[int, object] = {}  # by ds_id: a parameter whose gradient grows over several hooks counts once

    def note_gradient(param):
        """In place of DeepSpeed's reduction of `param`'s gradient: note it for the epilogue."""
        if optimizer._coalesce_grad_reduction or not getattr(param, "ds_grad_is_ready", True):
            return
        noted[param.ds_id] = param

    def epilogue_after_moving_gradients():
        """Move the noted gradients into their partitions, then DeepSpeed's epilogue."""
        if noted:
            _move_gradients(list(noted.values()), partitions, accumulate=optimizer.micro_step_id != 0)
            noted.clear()
        result = epilogue()
        if optimizer.reduce_and_partition_stream is not None:  # later work there reads the partitions
            from deepspeed.accelerator import get_accelerator

            optimizer.reduce_and_partition_stream.wait_stream(get_accelerator().current_stream())
        return result

    optimizer.reduce_ready_partitions_and_remove_grads = note_gradient
    optimizer.independent_gradient_partition_epilogue = epilogue_after_moving_gradients
    return True


def _move_gradients(params, partitions: dict, *, accumulate: bool) -> None:
    """Copy (or with `accumulate` add) each parameter's gradient into `partitions[param.ds_id]`, in one
    multi-tensor operation, and free the gradients."""
    grads = [p.grad for p in params]
    targets = [partitions[p.ds_id].narrow(0, 0, g.numel()).view(g.shape) for p, g in zip(params, grads)]
    if accumulate:
        torch._foreach_add_(targets, grads)
    else:
        torch._foreach_copy_(targets, grads)
    for p in params:
        p.grad = None


def _keep_parameters() -> None:
    """In place of ZeRO-3's release of every parameter before the update: nothing to release on one rank."""


def copies_of_partitions(params) -> int:
    """How many of the gathered ZeRO-3 `params` hold their data apart from their partition (`ds_tensor`)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(1 for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE
               and p.data.untyped_storage().data_ptr() != p.ds_tensor.untyped_storage().data_ptr())
