"""A stand-in for an NVIDIA GPU under triton: kernels compile for its architecture, nothing runs.

`stand_in_gpu(target, records)` replaces triton's active driver, so that every launch of a Triton
kernel on CPU tensors is compiled by the installed triton for `target` down to a cubin (triton's
bundled ptxas) and checked against the target's shared memory as triton checks it before a launch,
then launched nowhere: outputs stay garbage, only the launches matter. Autotuning compiles every
candidate (each one "runs" once and all tie). `triton_paths()` sends the three cores to their
Triton paths on CPU tensors, the memory to flash-linear-attention's chunk kernels (or its PyTorch
path).
`pretrain.compile_check` drives a training step through both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import types
from dataclasses import dataclass

import torch

__all__ = ["TARGETS", "Target", "CompileRecord", "stand_in_gpu", "triton_paths", "summarize"]


@dataclass(frozen=True)
class Target:
    """An NVIDIA GPU as the compiler and the launch-time checks see it."""

    arch: int
    name: str
    max_shared: int  # opt-in shared memory per block, bytes
    sms: int


TARGETS = {
    90: Target(90, "NVIDIA H100/H200", 232448, 132),
    80: Target(80, "NVIDIA A100", 166912, 108),
    89: Target(89, "NVIDIA L40S/L4", 101376, 142),
    100: Target(100, "NVIDIA B200", 232448, 148),
}


@dataclass
class CompileRecord:
    """One compiled (or failed) launch configuration of one kernel."""

    kernel: str
    module: str
    config: str
    shared: int = 0
    fits: bool = False
    registers: int | None = None
    stack_bytes: int | None = None  # per thread; register spills land in the stack frame
    error: str | None = None
    seconds: float = 0.0


def _config_text(constexprs: dict, options) -> str:
    """BM=64,BN=32 w4 s2: the block-size constexprs and the launch options that tell candidates apart."""
    blocks = ",".join(f"{k}={v}" for k, v in sorted(constexprs.items()) if k.startswith("B") and isinstance(v, int))
    warps = options.get("num_warps") if isinstance(options, dict) else getattr(options, "num_warps", None)
    stages = options.get("num_stages") if isinstance(options, dict) else getattr(options, "num_stages", None)
    return f"{blocks} w{warps} s{stages}"


class _Launcher:
    """Stands in for triton's CUDA launcher: the launch itself does nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        return None


class _Utils:
    """The device queries and the module loading that triton's launch path makes."""

    def __init__(self, target: Target):
        self.target = target

    def get_device_properties(self, device):
        # Shared memory and the SM count are the target's; the rest is nominal (nothing reads it to compile).
        return {"max_shared_mem": self.target.max_shared, "multiprocessor_count": self.target.sms,
                "max_num_regs": 65536, "warpSize": 32, "sm_clock_rate": 1_800_000, "mem_clock_rate": 2_600_000,
                "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 0, 0, 1024  # module, function, registers, spills, max threads per block


class _StandInDriver:
    """The part of triton's active-driver interface that compiling and launching use."""

    def __init__(self, target: Target):
        from triton.backends.compiler import GPUTarget

        self.gpu_target = GPUTarget("cuda", target.arch, 32)
        self.utils = _Utils(target)
        self.launcher_cls = _Launcher

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.gpu_target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def run_once(kernel_call, quantiles=None, **_):
            kernel_call()  # compiles the candidate (and raises when it does not fit); every candidate ties
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return run_once

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache):
        pass


def _recording_compile(compile_original, records: list, shared_limit: int, on_compile=None):
    """Wrap `triton.compiler.compile`: each call appends a CompileRecord (or its error) to `records`
    and passes it to `on_compile`."""
    from .cubin import resource_usage

    def compile_and_record(src, target=None, options=None, **kwargs):
        fn = src.fn
        # ASTSource keys its constants by argument path, e.g. (3,); name them for the report.
        constexprs = {fn.arg_names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
        record = CompileRecord(fn.__name__, fn.__module__, _config_text(constexprs, options or {}))
        start = time.perf_counter()
        try:
            compiled = compile_original(src, target=target, options=options, **kwargs)
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            record.error = f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
            raise
        finally:
            record.seconds = round(time.perf_counter() - start, 2)
            records.append(record)
            if on_compile is not None:
                on_compile(record)
        record.shared = int(compiled.metadata.shared)
        record.fits = record.shared <= shared_limit
        try:
            usage = resource_usage(compiled)
            record.registers, record.stack_bytes = usage.get("reg"), usage.get("stack")
        except (OSError, subprocess.SubprocessError):  # no cuobjdump beside this triton: figures unknown
            pass
        return compiled

    return compile_and_record


@contextlib.contextmanager
def stand_in_gpu(target: Target, records: list, *, first_candidate: bool = False, on_compile=None):
    """Make triton compile for `target` and launch nothing; append a CompileRecord per compile.

    Patches, until exit: triton's active driver, `triton.compiler.compile` (to record), the
    torch.cuda queries that the kernels' host code and flash-linear-attention make about the
    device, and the kernels' check that tensors are on CUDA. With `first_candidate`, autotuning
    keeps only each kernel's first candidate; `on_compile(record)` follows each compile. Meant for
    a process of its own: modules that read the device at import (flash-linear-attention) keep
    what they read.
    """
    import triton
    import triton.compiler
    from triton.runtime.autotuner import Autotuner

    from ..causal_conv import triton_impl as conv_impl
    from ..gated_delta import triton_impl as delta_impl
    from ..polar import triton_impl as polar_impl
    from ..softcap_ce import triton_impl as ce_impl
    from . import triton_host

    impls = (polar_impl, conv_impl, delta_impl, ce_impl)

    props = types.SimpleNamespace(name=target.name, major=target.arch // 10, minor=target.arch % 10,
                                  multi_processor_count=target.sms, shared_memory_per_block=49152,
                                  shared_memory_per_block_optin=target.max_shared, total_memory=80 << 30)
    cuda_patches = {
        "get_device_name": lambda *a, **k: target.name,
        "get_device_capability": lambda *a, **k: (target.arch // 10, target.arch % 10),
        "get_device_properties": lambda *a, **k: props,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "device": lambda *a, **k: contextlib.nullcontext(),
    }
    saved_cuda = {name: getattr(torch.cuda, name) for name in cuda_patches}
    saved_compile, saved_prune = triton.compiler.compile, Autotuner.prune_configs
    saved_disk_cache = Autotuner.check_disk_cache
    saved_checks = [impl.check_launch_device for impl in impls]
    saved_driver = triton.runtime.driver._active  # None until a driver is asked for: nothing to rebuild

    def first_only(self, *args, **kwargs):
        return saved_prune(self, *args, **kwargs)[:1]

    def tune_without_disk_cache(self, tuning_key, configs, bench_fn, *args, **kwargs):
        # Tie timings must never reach triton's autotuning cache: a real GPU of the same
        # architecture would read them back as measured. Every candidate is compiled each time.
        bench_fn()
        return False

    triton.runtime.driver.set_active(_StandInDriver(target))
    triton.compiler.compile = _recording_compile(saved_compile, records, target.max_shared, on_compile)
    for name, value in cuda_patches.items():
        setattr(torch.cuda, name, value)

    def accept(*args, **kwargs):
        return None

    for impl in impls:
        impl.check_launch_device = accept
    triton_host._device_class_cached.cache_clear()
    Autotuner.check_disk_cache = tune_without_disk_cache
    if first_candidate:
        Autotuner.prune_configs = first_only
    try:
        yield
    finally:
        Autotuner.prune_configs, Autotuner.check_disk_cache = saved_prune, saved_disk_cache
        for impl, check in zip(impls, saved_checks):
            impl.check_launch_device = check
        for name, value in saved_cuda.items():
            setattr(torch.cuda, name, value)
        triton.compiler.compile = saved_compile
        triton.runtime.driver._active = saved_driver
        triton_host._device_class_cached.cache_clear()


@contextlib.contextmanager
def triton_paths(*, memory_fla: bool = True):
    """Send the model's cores to their Triton paths on CPU tensors, the memory to FLA's kernels
    (`memory_fla=False`: to the chunked path with its Triton state carry)."""
    import kernels

    from ..gated_delta.fla_bridge import fla_gated_delta_rule

    def memory_via_fla(q, k, v, g, beta, *, initial_state=None, output_final_state=False, **_):
        return fla_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state,
                                    output_final_state=output_final_state)

    saved_env = {name: os.environ.get(name) for name in ("ATMA_KERNELS", "ATMA_POLAR_BWD")}
    saved_rule = kernels.gated_delta_rule
    os.environ["ATMA_KERNELS"] = "triton"
    if memory_fla:
        kernels.gated_delta_rule = memory_via_fla
    try:
        yield
    finally:
        kernels.gated_delta_rule = saved_rule
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def summarize(records: list[CompileRecord]) -> list[dict]:
    """One row per kernel: candidates compiled, how many fit, failures, registers and stack bytes."""
    rows: dict[str, dict] = {}
    for rec in records:
        row = rows.setdefault(rec.kernel, {"kernel": rec.kernel, "module": rec.module, "compiled": 0, "fit": 0,
                                           "too_big": [], "failed": [], "registers": [], "stack": []})
        if rec.error is not None:
            row["failed"].append(f"{rec.config}: {rec.error}")
            continue
        row["compiled"] += 1
        if rec.fits:
            row["fit"] += 1
        else:
            row["too_big"].append(f"{rec.config}: {rec.shared} bytes")
        if rec.registers is not None:
            row["registers"].append(rec.registers)
        if rec.stack_bytes is not None:
            row["stack"].append(rec.stack_bytes)
    return list(rows.values())
