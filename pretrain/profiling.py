"""`torch.profiler` traces of a window of training steps (the run config's `profile` section).

The benchmark (`python -m pretrain.bench`) times the step on random tokens; this traces the run
itself, with its data, its ranks and its interconnect. On each chosen rank, optimizer steps
`start_step` .. `start_step + steps - 1` (numbered as in the logs) are recorded, the step before
them as the profiler's warm-up when this process runs it, and written to `RUN_DIR/profile/`:

- `steps{A}-{B}-rank{R}.pt.trace.json.gz`: the timeline (https://ui.perfetto.dev or chrome://tracing);
- `steps{A}-{B}-rank{R}-ops.txt`: the ops with the most self time (device time on a GPU) and, on a GPU,
  the device time by kind of kernel (matmuls, Polar attention, the memory, compiled elementwise, ...);
- with `memory_snapshot` (CUDA), `steps{A}-{B}-rank{R}-memory.pickle`: the caching allocator's
  history over the window (https://pytorch.org/memory_viz).

A step skipped for a non-finite loss keeps its number and takes one of the window's places. A run
that stops or fails inside the window writes the steps recorded so far. The window's steps are
left out of tokens/s and MFU on every rank (the profiler slows them down).
"""

from __future__ import annotations

import os

import torch
from torch.autograd import DeviceType

from .config import ConfigError, ProfileSection

__all__ = ["PROFILE_DIR", "StepProfiler", "check_profile", "device_ms_by_kind", "device_ms_per_step", "top_ops"]

PROFILE_DIR = "profile"
STEP_RANGES = ("ProfilerStep#", "optimizer_step#")  # torch's own step marks, and ours
MEMORY_HISTORY_ENTRIES = 200_000  # allocator events kept for a memory snapshot (the newest ones)

# Kinds of device kernels by name, first match wins: (kind, name prefixes, name substrings), names lower-cased.
# The project's Triton kernels are named after their op; flash-linear-attention's gated-delta kernels after
# their chunk algorithm. Inductor names its generated kernels triton_{poi,per,red}_* (elementwise,
# persistent and looped reductions) and triton_tem_* (templates: matmuls); attention kernels come before
# matmuls, since memory-efficient attention's names contain "cutlass".
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("Polar attention (Triton)", ("polar_",), ()),
    ("gated-delta memory (Triton, FLA)", ("chunk_", "recompute_w_u", "prepare_wy_repr", "solve_tril", "merge_16x16",
                                         "fused_recurrent", "l2norm", "gdn_"), ("gated_delta",)),
    ("causal conv (Triton)", ("causal_conv1d",), ()),
    ("LM head loss rows (Triton)", ("softcap_ce",), ()),
    ("SDPA attention (flash, cuDNN, efficient)", (), ("flash", "fmha", "sdpa")),
    ("matmuls (cuBLAS, CUTLASS, inductor templates)", ("nvjet", "triton_tem_"),
     ("gemm", "gemv", "cutlass", "xmma", "cublas", "splitk")),
    ("compiled elementwise and reductions (inductor)", ("triton_",), ()),
    ("multi-tensor (optimizer, gradient norm and copies)", (), ("multi_tensor", "adam")),
    ("communication (NCCL)", (), ("nccl",)),
    ("copies and fills", ("memcpy", "memset"), ("copy", "fill")),
)
OTHER_KERNELS = "other PyTorch kernels"


def top_ops(prof, *, steps: int, limit: int, on_device: bool) -> list[dict]:
    """The `limit` ops of a finished profile with the most self time per step (device time when `on_device`);
    the ranges that mark whole steps are left out."""
    rows = [(e.key, (e.self_device_time_total if on_device else e.self_cpu_time_total), e.count)
            for e in prof.key_averages() if not e.key.startswith(STEP_RANGES)]
    rows.sort(key=lambda r: r[1], reverse=True)
    return [{"op": name, "self_ms_per_step": us / 1000 / steps, "calls_per_step": count / steps}
            for name, us, count in rows[:limit]]


def device_ms_per_step(prof, *, steps: int) -> float:
    """Milliseconds per step the device spent in kernels and copies of a finished profile, over `steps`.

    Only the device's own events count: a CPU op's self device time is that of the kernels it launched,
    which appear again as events of their own. Kernels of overlapping streams count each."""
    return sum(e.self_device_time_total for e in prof.key_averages() if e.device_type != DeviceType.CPU) / 1000 / steps


def kernel_kind(name: str) -> str:
    """The kind of a device kernel by its name (KERNEL_KINDS), or OTHER_KERNELS."""
    name = name.lower()
    for kind, prefixes, parts in KERNEL_KINDS:
        if name.startswith(prefixes) or any(part in name for part in parts):
            return kind
    return OTHER_KERNELS


def device_ms_by_kind(prof, *, steps: int) -> list[dict]:
    """The device time per step of a finished profile split by kind of kernel (`kernel_kind`), most first:
    each kind's milliseconds and kernels per step and its share of all the device time."""
    totals: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if e.device_type != DeviceType.CPU:
            total = totals.setdefault(kernel_kind(e.key), [0.0, 0])
            total[0] += e.self_device_time_total
            total[1] += e.count
    everything = sum(us for us, _ in totals.values())
    rows = [{"kind": kind, "ms_per_step": us / 1000 / steps, "kernels_per_step": count / steps,
             "share": us / everything if everything else 0.0} for kind, (us, count) in totals.items()]
    return sorted(rows, key=lambda r: r["ms_per_step"], reverse=True)


def check_profile(cfg: ProfileSection, world: int, device: torch.device) -> None:
    """Raise ConfigError when `profile` names a rank this run does not have, or asks for a memory snapshot
    without CUDA."""
    missing = [r for r in cfg.ranks if r >= world]
    if cfg.steps and missing:
        raise ConfigError(f"profile.ranks names rank {missing[0]}, but the run has {world} rank(s) (0-{world - 1})")
    if cfg.steps and cfg.memory_snapshot and device.type != "cuda":
        raise ConfigError(f"profile.memory_snapshot records CUDA's caching allocator; this run is on {device.type}: "
                          "set it to false")


class StepProfiler:
    """Records the configured window of optimizer steps on this rank; every method is a no-op elsewhere."""

    def __init__(self, cfg: ProfileSection, *, run_dir: str, rank: int, device: torch.device):
        self.first = cfg.start_step
        self.last = cfg.start_step + cfg.steps - 1
        self.enabled = cfg.steps > 0 and (not cfg.ranks or rank in cfg.ranks)
        self.cfg = cfg
        self.rank = rank
        self.device = device
        self.out_dir = os.path.join(run_dir, PROFILE_DIR)
        self.prof = None
        self.done = False
        self.recorded = 0  # window steps recorded so far
        self.window_start = self.first
        self.warmup = 0  # 1 when the step before the window is recorded as the profiler's warm-up
        self.calls = 0  # optimizer steps since the profiler started
        self.step_range = None  # the open record_function range of the step being traced
        self.cut_short = False  # the run ended during the last traced step
        self.paths: list[str] = []
        self.report: str | None = None

    def in_window(self, step: int) -> bool:
        """True when optimizer step `step` is traced on some rank, or is the profiler's warm-up there."""
        return self.cfg.steps > 0 and self.first - 1 <= step <= self.last

    def take_report(self) -> str | None:
        """Once the trace is written: the line that says where (None before, and after it was taken)."""
        report, self.report = self.report, None
        return report

    def before_step(self, step: int) -> None:
        """Start the profiler when optimizer step `step` (the one about to run) is its warm-up or in its window."""
        if self.prof is not None:
            self._open_step_range(step)
            return
        if not self.enabled or self.done:
            return
        warmup = step == self.first - 1
        if not (warmup or self.first <= step <= self.last):
            return
        self.window_start = max(step, self.first)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.warmup = int(warmup)
        self.calls = 0
        schedule = torch.profiler.schedule(wait=0, warmup=self.warmup, active=self.last - self.window_start + 1,
                                           repeat=1)
        self.prof = torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=self._write,
            record_shapes=self.cfg.record_shapes, with_stack=self.cfg.with_stack,
            profile_memory=self.cfg.profile_memory)
        self.prof.start()
        if self.cfg.memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._open_step_range(step)

    def _open_step_range(self, step: int) -> None:
        """Name the step in the timeline with its number in the logs (the profiler counts from 1 itself)."""
        self.step_range = torch.profiler.record_function(f"optimizer_step#{step}")
        self.step_range.__enter__()

    def after_step(self) -> None:
        """Advance the profiler by one optimizer step; the trace is written after the window's last step."""
        if self.prof is None:
            return
        self.step_range.__exit__(None, None, None)
        self.step_range = None
        self.calls += 1
        if self.calls > self.warmup:
            self.recorded += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's device work belongs in its trace
        self.prof.step()
        if self.done:
            self.prof.stop()
            self.prof = None

    def close(self) -> None:
        """Stop a profiler still running (the run ended inside the window) and write what it recorded."""
        if self.prof is not None:
            if self.step_range is not None:  # the step that failed or was interrupted: traced in part
                self.step_range.__exit__(None, None, None)
                if self.calls >= self.warmup:
                    self.recorded += 1
                    self.cut_short = True
            self.prof.stop()  # writes the trace when the window's recording had begun
            self.prof = None
            self.done = True
            self._stop_memory_history()

    def _stop_memory_history(self) -> None:
        if self.cfg.memory_snapshot and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(enabled=None)

    def _write(self, prof) -> None:
        self.done = True
        if self.recorded == 0:
            return
        last = self.window_start + self.recorded - 1
        span = f"steps {self.window_start}-{last}" if last > self.window_start else f"step {last}"
        stem = os.path.join(self.out_dir, f"steps{self.window_start}-{last}-rank{self.rank}")
        trace, table, memory = stem + ".pt.trace.json.gz", stem + "-ops.txt", stem + "-memory.pickle"
        on_device = self.device.type == "cuda"
        rows = top_ops(prof, steps=self.recorded, limit=30, on_device=on_device)
        what = "device" if on_device else "CPU"
        cut = ", the last one cut short by the end of the run" if self.cut_short else ""
        lines = [f"self {what} time per optimizer step, mean over {self.recorded} traced step(s) on rank {self.rank}"
                 f"{cut}",
                 f"{'ms/step':>10}  {'calls/step':>10}  op"]
        lines += [f"{r['self_ms_per_step']:10.3f}  {r['calls_per_step']:10.1f}  {r['op']}" for r in rows]
        if on_device:
            lines += ["", "device time per optimizer step by kind of kernel",
                      f"{'ms/step':>10}  {'share':>6}  {'kernels/step':>12}  kind"]
            lines += [f"{r['ms_per_step']:10.3f}  {100 * r['share']:5.1f}%  {r['kernels_per_step']:12.1f}  {r['kind']}"
                      for r in device_ms_by_kind(prof, steps=self.recorded)]
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            prof.export_chrome_trace(trace)
            with open(table, "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            if self.cfg.memory_snapshot:
                torch.cuda.memory._dump_snapshot(memory)
        except OSError as err:  # a trace that cannot be written must not end the run
            self.report = f"[atma] rank {self.rank}: warning: the profile of {span} was not written ({err})"
            return
        finally:
            self._stop_memory_history()
        self.paths = [trace, table] + ([memory] if self.cfg.memory_snapshot else [])
        self.report = (f"[atma] rank {self.rank}: profiled {span}: {trace} (open it in "
                       f"https://ui.perfetto.dev); top ops: {table}")
        if self.cfg.memory_snapshot:
            self.report += f"; memory snapshot: {memory} (open it in https://pytorch.org/memory_viz)"
