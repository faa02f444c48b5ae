"""Training throughput over logging windows: tokens/s, step time and data wait, warm-up and traced steps left out,
and checkpoint saves and validation; the warm-up's own duration, reported once."""

from __future__ import annotations

import contextlib
import time

import torch

__all__ = ["ThroughputMeter"]


class ThroughputMeter:
    """Counts optimizer steps and tokens; `read()` returns the figures of the steps since the last read.

    The first `warmup_steps` steps (compilation, autotuning, allocator growth) are left out: the
    clock starts when they are done. The device is synchronised only where a window starts or is
    read (the logging cadence), at the start and after the first warm-up step, so the step itself
    keeps the host ahead of the device. Steps between `pause()` and `resume()` (traced by the
    profiler) are left out with their time, and so is work done inside `set_aside()` (checkpoint
    saves, validation), which is not training. How long the warm-up took, and its first step alone
    (where compilation happens), is reported once by `take_warmup()`: the cost of starting (or
    resuming) a run that tokens/s leaves out.
    """

    def __init__(self, *, warmup_steps: int, device: torch.device):
        self.warmup_steps = warmup_steps
        self.device = device
        self.num_steps = 0
        self._window_start = None
        self._window_steps = 0
        self._window_tokens = 0
        self._window_data_wait = 0.0
        self._paused_at = None
        self._started = None
        self._first_step_s = None
        self._warmup = None  # {"perf/warmup_s", "perf/first_step_s"} once the warm-up ends, until taken

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        """Mark the start of training (the first window starts here when there is no warm-up)."""
        self._started = self._now()
        if self.warmup_steps == 0:
            self._window_start = self._started

    @property
    def warming_up(self) -> bool:
        """True while the steps recorded so far are all warm-up steps."""
        return self.num_steps <= self.warmup_steps

    def record(self, tokens: int, data_wait_s: float) -> None:
        """Count one optimizer step of `tokens` tokens that waited `data_wait_s` seconds for data."""
        self.num_steps += 1
        if self.num_steps <= self.warmup_steps:
            self._record_warmup_step()
        elif self._paused_at is None:
            self._window_steps += 1
            self._window_tokens += tokens
            self._window_data_wait += data_wait_s

    def _record_warmup_step(self) -> None:
        """Read the clock after the first warm-up step and the last; the last one starts the first window."""
        if self.num_steps not in (1, self.warmup_steps):
            return  # no clock read (on CUDA a synchronisation) inside the warm-up
        if self._started is None:
            raise RuntimeError("ThroughputMeter.record() before start()")
        now = self._now()
        if self.num_steps == 1:
            self._first_step_s = now - self._started
        if self.num_steps == self.warmup_steps:
            self._window_start = now
            self._warmup = {"perf/warmup_s": now - self._started, "perf/first_step_s": self._first_step_s}

    def take_warmup(self) -> dict[str, float] | None:
        """The warm-up's wall seconds and its first step's, once, after its last step (None before, after, or
        with no warm-up)."""
        found, self._warmup = self._warmup, None
        return found

    @contextlib.contextmanager
    def set_aside(self):
        """Leave the time spent inside the block out of the window (or the warm-up) it falls in; yields a dict
        whose "seconds" holds that time once the block ends."""
        timing = {}
        begin = self._now()  # the steps queued so far belong to the window
        yield timing
        end = self._now()
        timing["seconds"] = end - begin
        if self._paused_at is not None:
            return  # the pause leaves this time out already
        if self._window_start is not None:
            self._window_start += end - begin
        elif self._started is not None:
            self._started += end - begin

    def pause(self) -> None:
        """Leave the steps recorded from here until `resume()` out of the figures, and their time with them."""
        if self._paused_at is None:
            self._paused_at = self._now()

    def resume(self) -> None:
        """Count steps again; the window's clock skips the paused time."""
        if self._paused_at is None:
            return
        now = self._now()
        if self._window_start is not None:
            paused = now - self._paused_at
            # a window that started while paused (the warm-up ended then) starts now
            self._window_start = now if self._window_start > self._paused_at else self._window_start + paused
        self._paused_at = None

    def read(self) -> dict[str, float]:
        """Tokens/s, seconds per step and the data-wait fraction since the last read; {} during warm-up."""
        if self._window_steps == 0:
            return {}
        now = self._now() if self._paused_at is None else self._paused_at  # paused: the window ended there
        elapsed = max(now - self._window_start, 1e-9)
        out = {"perf/tokens_per_s": self._window_tokens / elapsed,
               "perf/step_time_s": elapsed / self._window_steps,
               "perf/data_wait_fraction": self._window_data_wait / elapsed}
        self._window_start = now
        self._window_steps = self._window_tokens = 0
        self._window_data_wait = 0.0
        return out
