"""DeepSpeed's ZeRO-0/1/2 optimizer steps with fewer reads from the device: the overflow taken from the gradient
norm, and ZeRO-1/2's clip factor computed on the device.

Each read (`.item()`, a tensor's truth value) makes the host wait until the device has run everything queued,
and between reads the device runs out of work while the host catches up. In bf16, DeepSpeed (0.19) reads:

- ZeRO-1/2 (`DeepSpeedZeroOptimizer.step`, `deepspeed/runtime/zero/stage_1_and_2.py`): its overflow check of
  every gradient tensor (`check_overflow`: two reductions and a few more kernels per tensor, then a read), then
  whether the gradient norm is finite, then, in every parameter group, the norm again before it computes the
  clip factor (`unscale_and_clip_grads`): seven reads per step with the five parameter groups of AdamW.
- ZeRO-0 (`FP16_Optimizer`, or `FP16_UnfusedOptimizer` with an optimizer other than DeepSpeed's FusedAdam, both
  in `deepspeed/runtime/fp16/`): its overflow check reads each gradient tensor, one tensor at a time
  (`CheckOverflow.has_overflow_serial`), 264 reads per step for `atma-378m`, then the norm group by group.

`fewer_step_reads` changes the engine's optimizer so that:

- its overflow check finds no overflow by itself, and the step takes the overflow from the gradient norm
  alone, which it checks anyway and which is never finite where a gradient holds an inf or a NaN: each
  tensor's norm is summed over all of them (and over the ranks), so one inf or NaN makes the sum, and the
  norm, inf or NaN. DeepSpeed skipped a step where either check failed, so the same steps are skipped as
  before, through the same code.
- ZeRO-1/2's `unscale_and_clip_grads` computes the clip factor from the norm on the device, with a norm that
  is not finite (or DeepSpeed's -1 sentinel for one) standing for infinity, as DeepSpeed's own read makes it:
  the gradients are scaled by the same factor, bit for bit.

So ZeRO-1/2 read once per step in bf16 (the norm's check), as ZeRO-3 does, and ZeRO-0 reads its norm only
(once per parameter group, and once more for the total). DeepSpeed's `BF16_Optimizer`, which ZeRO-1 runs with
fp32 gradient accumulation (`pretrain/accumulation.py`), has no overflow check of its own; its step gets its clip
factor on the device in `pretrain/bf16_step.py`.
"""

from __future__ import annotations

import types
import warnings

import torch

__all__ = ["fewer_step_reads"]

# What `fewer_step_reads` replaces on DeepSpeed's ZeRO-1/2 optimizer, and what else it reads there.
_ZERO12_INTERNALS = ("unscale_and_clip_grads", "check_overflow", "clip_grad", "loss_scale", "compute_grad_norm",
                     "check_grad_overflow", "cpu_offload", "dtype")


def fewer_step_reads(engine, fused_norm: bool) -> bool:
    """Take the engine's overflow from its gradient norm and, under ZeRO-1/2, clip on the device; returns whether
    the optimizer was changed.

    ZeRO-1/2: only where the trainer takes the gradient norm (`fused_norm`, from
    `pretrain.grad_norm.fuse_gradient_norm`), which covers every gradient, and the step checks it (fp16, or bf16's
    `check_grad_overflow`, on by default); not with the optimizer offloaded. ZeRO-0: DeepSpeed's bf16 and fp16
    optimizer wrappers, without tensor, pipeline or expert parallelism (whose norms leave parameters out).
    """
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return _zero0_overflow_from_the_norm(engine)
    if stage not in (1, 2) or not fused_norm:
        return False
    optimizer = engine.optimizer
    missing = [name for name in _ZERO12_INTERNALS if not hasattr(optimizer, name)]
    if missing:
        warnings.warn(f"{type(optimizer).__name__} lacks {', '.join(missing)}: ZeRO-{stage} reads its clip factor and "
                      "overflow check from the device, as DeepSpeed does", stacklevel=2)
        return False
    if optimizer.cpu_offload or not optimizer.compute_grad_norm:
        return False
    optimizer.unscale_and_clip_grads = types.MethodType(_unscale_and_clip_grads, optimizer)
    if optimizer.dtype != torch.bfloat16 or optimizer.check_grad_overflow:  # the step checks the norm
        optimizer.check_overflow = types.MethodType(_no_overflow_before_the_norm, optimizer)
    return True


def _zero0_overflow_from_the_norm(engine) -> bool:
    """ZeRO-0's bf16/fp16 optimizer wrapper: its overflow check left to the norm's (see the module docstring)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, (FP16_Optimizer, FP16_UnfusedOptimizer)):
        return False  # fp32 (the bare optimizer, which checks nothing) or another wrapper
    if getattr(optimizer, "mpu", None) is not None or getattr(optimizer, "has_moe_layers", False):
        return False
    if getattr(engine, "pipeline_parallelism", False):
        return False
    checker = getattr(optimizer, "overflow_checker", None)
    if checker is None or not hasattr(checker, "has_overflow"):
        warnings.warn(f"{type(optimizer).__name__} lacks overflow_checker.has_overflow: ZeRO-0 checks every gradient "
                      "for overflow, one tensor at a time, as DeepSpeed does", stacklevel=3)
        return False
    checker.has_overflow = types.MethodType(_no_overflow_in_the_gradients, checker)
    return True


def _unscale_and_clip_grads(self, grad_groups_flat, total_norm):
    """DeepSpeed's ZeRO-1/2 `unscale_and_clip_grads`, with the clip factor computed on the device (no read)."""
    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        # As DeepSpeed does after `is_invalid_grad_norm`: an invalid norm (inf, NaN or the -1 sentinel) clips
        # with an infinite norm, so every gradient is multiplied by zero.
        valid = total_norm.isfinite() & (total_norm >= 0)
        clip_norm = torch.where(valid, total_norm, torch.full_like(total_norm, float("inf")))
        clip = ((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad
        clip = torch.clamp(clip, min=1.0)
        combined_scale = clip * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


def _no_overflow_before_the_norm(self, partition_gradients=True):
    """In place of ZeRO-1/2's `check_overflow`: no overflow yet; the step's check of the norm finds it."""
    self.overflow = False


def _no_overflow_in_the_gradients(self, params, has_moe_params=None):
    """In place of ZeRO-0's `CheckOverflow.has_overflow`: none; the step's check of the norm finds it."""
    return False
