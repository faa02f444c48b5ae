"""One optimizer step of the DeepSpeed engine, with one host sync.

`TrainStep.run` forwards and backwards `grad_accum` micro-batches and steps the engine after each
(DeepSpeed applies the update at the accumulation boundary). The loss terms and a non-finite
count accumulate on the device; after the last micro-batch's forward, one all-reduce of
[non-finite count, stop requests, loss terms] is queued, and its copy to the host is read once
the last backward is queued too: the step's only host sync in this code, which waits for the
forward while the device already has the backward to run (a read before the backward would leave
the device idle until the host had queued the backward's first kernels). What happens to the step:

- every loss finite on every rank: backward and step as usual;
- a non-finite loss somewhere and nan_policy=stop: `TrainingError` after the last backward and
  before the optimizer step, so the parameters stay those of the last good step and no
  checkpoint of this step exists;
- a non-finite loss somewhere and nan_policy=skip: the whole optimizer step is skipped. The last
  micro-batch's loss is made NaN on every rank, on the device (from the all-reduced count), so
  every gradient norm is non-finite, and DeepSpeed's ZeRO optimizers (stages 1-3) discard such a
  step: gradients dropped, parameters and optimizer state untouched. The next step starts on the
  next micro-batches.

The trainer and `python -m pretrain.bench` both drive this class, so the benchmark times the
training step itself.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .config import ConfigError, LossSection
from .losses import LossWeights, combine_losses, copy_targets, signature_loss

__all__ = ["NonFiniteStep", "PhaseTimer", "StepOutcome", "TrainStep", "TrainingError", "check_skip_supported",
           "upload"]

PHASES = ("data", "forward", "backward", "sync", "optimizer")


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss under nan_policy=stop, too many skips, ...)."""


class NonFiniteStep(TrainingError):
    """A step's loss or gradient norm was non-finite under nan_policy=stop; the step was not applied."""


class PhaseTimer:
    """Host time per phase of a step; a no-op unless enabled (the benchmark's breakdown).

    With `synchronize=True` every phase boundary waits for the device, so the times are what
    the device spent; training never enables it.
    """

    def __init__(self, device: torch.device, *, enabled: bool = False, synchronize: bool = False):
        self.enabled = enabled
        self.sync = synchronize and device.type == "cuda"
        self.device = device
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time the enclosed block under `name`."""
        if not self.enabled:
            yield
            return
        if self.sync:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        """Zero every phase."""
        self.seconds = dict.fromkeys(PHASES, 0.0)


@dataclass
class StepOutcome:
    """What one call of `TrainStep.run` did."""

    applied: bool
    """The optimizer update was applied (False: the step was skipped)."""

    non_finite: bool
    """Some rank saw a non-finite loss (or DeepSpeed found a non-finite gradient norm)."""

    stop: bool
    """Some rank asked to stop (SIGTERM/SIGUSR1); every rank gets the same answer."""

    terms: dict[str, float] = field(default_factory=dict)
    """Rank-mean loss terms of the step ("loss/lm", ..., "loss/total"); NaN when skipped."""

    data_wait_s: float = 0.0
    """Host seconds spent waiting for micro-batches."""


def check_skip_supported(ds_config: dict) -> None:
    """Raise ConfigError when the DeepSpeed config cannot skip a step with non-finite gradients."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    bf16_check = ds_config.get("bf16", {}).get("check_grad_overflow", True)
    if stage == 0:
        raise ConfigError("train.nan_policy=skip needs ZeRO stage 1, 2 or 3: their optimizers discard a step "
                          "whose gradient norm is non-finite; stage 0 applies it")
    if ds_config.get("bf16", {}).get("enabled") and stage in (1, 2) and not bf16_check:
        raise ConfigError("train.nan_policy=skip needs bf16.check_grad_overflow true under ZeRO-1/2")


def upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device`, asynchronously on CUDA (through page-locked memory).

    A copy from pageable memory may make the host wait for the work already queued on the stream
    (CUDA's API synchronization behavior: the driver stages it), which would stall the queuing of the
    next micro-batch behind the previous one's backward. The caching host allocator keeps the
    page-locked block until the copy is done.
    """
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class TrainStep:
    """Runs optimizer steps of `engine` over micro-batches from an iterator of {"input_ids", "labels"}."""

    def __init__(self, engine, *, grad_accum: int, loss: LossSection, nan_policy: str, device: torch.device,
                 teacher=None, timer: PhaseTimer | None = None, number_ids: list[int] | None = None):
        self.engine = engine
        self.grad_accum = grad_accum
        self.loss_cfg = loss
        self.weights = LossWeights(loss.lm_weight, loss.sig_weight, loss.distractor_weight, loss.distill_weight,
                                   loss.copy_weight)
        self.nan_policy = nan_policy
        self.device = device
        self.teacher = teacher
        self.timer = timer or PhaseTimer(device)
        # loss.copy_targets=numbers: the copy loss counts only targets among these token ids.
        self.number_ids = None
        if loss.copy_weight > 0 and loss.copy_targets == "numbers":
            if not number_ids:
                raise ConfigError("loss.copy_targets=numbers, but the tokenizer has no number tokens")
            self.number_ids = torch.tensor(number_ids, dtype=torch.long, device=device)

    def to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Move one micro-batch's input ids and labels to the training device without waiting for its queued work."""
        return upload(batch["input_ids"], self.device), upload(batch["labels"], self.device)

    def compute_terms(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward one micro-batch and return every enabled loss term (per-token means)."""
        return self.forward_terms(input_ids, labels)[0]

    def head_weights(self) -> tuple[float, float, float] | None:
        """The weights of the LM head's terms (lm, copy, distill) where more than one is on, else None."""
        w = self.weights
        on = (w.lm > 0) + (w.copy > 0) + (w.distill > 0 and self.teacher is not None)
        return (w.lm, w.copy, w.distill) if on > 1 else None

    def forward_terms(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """Forward one micro-batch: (every enabled loss term, per-token means; the LM head's weighted sum).

        Where the head has more than one term (the LM term with copy or distillation), the model returns
        their weighted sum as one differentiable loss, whose gradients its forward computes (`model.lm_loss`);
        the head's terms in the dict are then detached, for logging. Otherwise the second value is None."""
        want_sig = self.weights.sig > 0
        want_copy = self.weights.copy > 0
        kl_targets = self.teacher.target_rows(input_ids) if self.teacher is not None else None
        focus = copy_targets(input_ids, labels, self.loss_cfg.copy_context) if want_copy else None
        if focus is not None and self.number_ids is not None:
            focus = focus & torch.isin(labels, self.number_ids)
        out = self.engine(
            input_ids, labels if self.weights.lm > 0 or want_copy else None, output_hidden_states=want_sig,
            loss_chunk_tokens=self.loss_cfg.loss_chunk_tokens, kl_targets=kl_targets,
            kl_temperature=self.loss_cfg.distill_temperature, focus=focus,
            head_loss_weights=self.head_weights(),
        )
        terms = {}
        if out.loss is not None:
            terms["lm"] = out.loss
        if want_copy:
            terms["copy"] = out.focus_loss
        if want_sig:
            terms["sig"] = signature_loss(out.hidden_states, self.loss_cfg.sig_mode, self.loss_cfg.sig_sketch_dim)
        if self.weights.distractor > 0:
            terms["distractor"] = out.align_loss
        if out.kl_loss is not None:
            terms["distill"] = out.kl_loss
        return terms, out.head_loss

    def run(self, batches, *, stop_requested: bool = False, inject_nan: bool = False) -> StepOutcome:
        """One optimizer step over `grad_accum` micro-batches; `inject_nan` poisons the first loss (fault tests)."""
        timer = self.timer
        sums = None  # [non-finite count, total loss, term...], float64 on the device
        names: list[str] = []
        data_wait = 0.0
        for index in range(self.grad_accum):
            start = time.perf_counter()
            with timer.phase("data"):
                input_ids, labels = self.to_device(next(batches))
            data_wait += time.perf_counter() - start
            with timer.phase("forward"):
                terms, head = self.forward_terms(input_ids, labels)
                loss = combine_losses(terms, self.weights, head)
                if inject_nan and index == 0:
                    loss = loss * float("nan")
                row = torch.stack([(~torch.isfinite(loss.detach())).double(), loss.detach().double(),
                                   *(t.detach().double() for t in terms.values())])
                sums = row if sums is None else sums + row
                names = list(terms)
            last = index == self.grad_accum - 1
            if last:
                flat, read = self._reduce(sums, stop_requested)
                # NaN on every rank when any rank's loss was non-finite: DeepSpeed then discards the step
                loss = loss * torch.where(flat[0] > 0, float("nan"), 1.0).to(loss.dtype)
            with timer.phase("backward"):
                self.engine.backward(loss)
            if last:
                with timer.phase("sync"):
                    non_finite, stop, means = read()
                if non_finite and self.nan_policy == "stop":
                    raise NonFiniteStep("non-finite loss")
            with timer.phase("optimizer"):
                self.engine.step()
        applied = self.engine.was_step_applied()
        if non_finite and applied:
            raise TrainingError("DeepSpeed applied an optimizer step whose loss was non-finite")
        if not applied and self.nan_policy == "stop":
            raise NonFiniteStep("non-finite gradient norm")
        terms = {"loss/total": means[0], **{f"loss/{n}": v for n, v in zip(names, means[1:])}}
        return StepOutcome(applied=applied, non_finite=non_finite or not applied, stop=stop, terms=terms,
                           data_wait_s=data_wait)

    def _reduce(self, sums: torch.Tensor, stop_requested: bool):
        """Queue the all-reduce of [non-finite, stop, losses...] over ranks and its copy to the host.

        Returns the reduced tensor (on the device) and a function that reads the copy: the step's one
        host sync, which waits only for the work queued before the copy.
        """
        stop = sums.new_full((1,), float(stop_requested))
        flat = torch.cat([sums[:1], stop, sums[1:] / self.grad_accum])
        dist.all_reduce(flat)
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host, copied = flat, None
        world = dist.get_world_size()

        def read() -> tuple[bool, bool, list[float]]:
            if copied is not None:
                copied.synchronize()
            values = host.tolist()
            return values[0] > 0, values[1] > 0, [v / world for v in values[2:]]

        return flat, read
