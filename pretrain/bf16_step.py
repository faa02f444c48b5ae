"""DeepSpeed's `BF16_Optimizer` step with its gradient norm in one reduction and its clip factor on the device, so
that it reads the device once per step.

ZeRO-1 with bf16 weights and fp32 gradient accumulation runs DeepSpeed's `BF16_Optimizer`
(`pretrain/accumulation.py`). Its step (`deepspeed/runtime/bf16_optimizer.py`, DeepSpeed 0.19) takes the gradient
norm one tensor at a time (`get_global_norm_of_tensors`: a kernel and a turn of a Python loop per tensor, 264 for
`atma-378m`), reads whether that norm is finite, then reads whether the clip factor is below one before it scales
the gradients, again one tensor at a time. `one_read_bf16_step` gives the optimizer a step that:

- takes the same norm with `pretrain.grad_norm.gradient_norms`: each tensor's norm in fp32, their squares summed,
  the square root, and -1 where that is not finite, from one `torch._foreach_norm`;
- reads the norm's check once, and skips the step exactly where DeepSpeed's does, clearing the same gradients;
- scales every gradient by min(1, clip / (norm + 1e-6)), computed on the device as DeepSpeed computes it, in one
  `torch._foreach_mul_`: where DeepSpeed clips, the same factor; where it does not, a multiplication by one,
  which changes no finite value.

The rest of the step is DeepSpeed's, in its order.
"""

from __future__ import annotations

import types
import warnings

import torch

from .grad_norm import gradient_norms

__all__ = ["one_read_bf16_step"]

# What the step below reads or calls on DeepSpeed's BF16_Optimizer.
_INTERNALS = ("get_grads_for_norm", "clear_hp_grads", "clear_lp_grads", "fp32_groups_flat_partition",
              "fp32_groups_gradient_flat_partition", "optimizer", "grad_acc_dtype", "update_lp_params",
              "_lazy_init_hp_params_optimizer_state", "_uses_muon", "_prepare_muon_updates", "clip_grad", "norm_type",
              "mpu", "has_moe_layers", "bf16_groups")
CLIP_EPS = 1e-6  # DeepSpeed's `clip_tensors_by_global_norm` adds it to the norm


def one_read_bf16_step(engine, ds_config: dict) -> bool:
    """Give the engine's `BF16_Optimizer` the step described above; returns whether it was given.

    Only with fp32 gradient accumulation, the L2 norm, and without tensor, pipeline or expert parallelism (whose
    norms leave some gradients out) or DeepCompile; for any other optimizer, nothing changes. Where this
    DeepSpeed's `BF16_Optimizer` lacks what the step uses, it keeps its own step, with a warning.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    optimizer = engine.optimizer
    if not isinstance(optimizer, BF16_Optimizer) or ds_config.get("compile", {}).get("deepcompile", False):
        return False
    missing = [name for name in _INTERNALS if not hasattr(optimizer, name)]
    if missing:
        warnings.warn(f"BF16_Optimizer lacks {', '.join(missing)}: ZeRO-1 takes its gradient norm one tensor at a "
                      "time and reads its clip factor from the device, as DeepSpeed does", stacklevel=2)
        return False
    if optimizer.mpu is not None or optimizer.has_moe_layers or getattr(engine, "pipeline_parallelism", False):
        return False
    if optimizer.grad_acc_dtype != torch.float32 or float(optimizer.norm_type) != 2.0:
        return False
    if any(getattr(p, "ds_pipe_replicated", False) for group in optimizer.bf16_groups for p in group):
        return False
    optimizer.step = types.MethodType(_step, optimizer)
    return True


@torch.no_grad()
def _step(self, closure=None):
    """DeepSpeed's `BF16_Optimizer.step` with the norm in one reduction and the clip factor on the device."""
    from deepspeed.runtime.utils import is_invalid_grad_norm

    if closure is not None:
        raise NotImplementedError(f"{type(self).__name__} does not support closure.")
    self.overflow = False
    # Without tensor or expert parallelism the norm's gradients are the clip's: every one that received a gradient.
    grads = self.get_grads_for_norm(for_clipping=True)
    device = self.fp32_groups_flat_partition[0].device
    (norm,) = gradient_norms([grads], dtype=torch.float32, device=device)
    self._global_grad_norm = norm
    if is_invalid_grad_norm(norm):  # the one read (DeepSpeed's check: -1 stands for a norm that is not finite)
        self.overflow = True
        self._global_grad_norm = float("inf")
        self.clear_hp_grads()
        self.clear_lp_grads()
        return
    if self.clip_grad > 0.0 and grads:
        factor = torch.clamp(self.clip_grad / (norm + CLIP_EPS), max=1.0)
        torch._foreach_mul_(grads, factor)
    for param_partition, grad_partition in zip(self.fp32_groups_flat_partition,
                                               self.fp32_groups_gradient_flat_partition):
        param_partition.grad = grad_partition
    if self._uses_muon:
        self._prepare_muon_updates()
    self.optimizer.step()
    self._lazy_init_hp_params_optimizer_state()  # DeepSpeed links the optimizer's state after its first step
    self.update_lp_params()
    self.clear_hp_grads()
