"""Host-side helpers shared by the Triton kernels: interpreter detection, GPU launch classes, the
autotuning switch and forced launch configurations.

Nothing here defines a Triton JIT function, so a module that does can be re-imported under
`TRITON_INTERPRET=1` without this one changing.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = [
    "interpreting",
    "patch_interpreter_index",
    "check_launch_device",
    "device_class",
    "autotune_enabled",
    "forced_launch_configs",
    "kernel_settings",
    "describe_settings",
    "cuda_median_ms",
    "tile_launcher",
    "TRITON_DTYPES",
]

# Input dtypes the Triton kernels take (fp64 stays on the PyTorch paths).
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Launch classes, by compute capability and shared memory per block:
#   "large": Hopper / Blackwell datacenter parts (H100, H200, B200): sm_90 / sm_100, ~227 KB.
#   "mid":   other NVIDIA parts with >= 96 KB (A100, L4, L40S, consumer Blackwell).
#   "small": ROCm, or below 96 KB.
_CLASSES = ("large", "mid", "small")


def cuda_median_ms(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over `iters` calls on the current CUDA stream (CUDA events), after `warmup`
    untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def tile_launcher(kernel, tiles: tuple[str, str], fixed, candidates, *, key: list[str], cache: dict, cache_key,
                  reset_to_zero: list[str] | None = None):
    """A callable run(grid, *args, **kw) that launches `kernel[grid(meta)](...)` with its two tile sizes named
    `tiles` (e.g. ("BM", "BN")) and returns the (tile, tile, num_warps, num_stages) it ran with: `fixed`
    when given, else the fastest of `candidates`, picked by `triton.autotune` on first use per `key` (the
    tuned kernel is kept in `cache` under `cache_key`)."""
    first, second = tiles
    if fixed is not None:
        a, b, warps, stages = fixed

        def run_fixed(grid, *args, **kw):
            kernel[grid({first: a, second: b})](*args, **{first: a, second: b}, num_warps=warps, num_stages=stages,
                                               **kw)
            return tuple(fixed)

        return run_fixed
    tuned = cache.get(cache_key)
    if tuned is None:
        import triton

        configs = [triton.Config({first: a, second: b}, num_warps=w, num_stages=s) for a, b, w, s in candidates]
        tuned = cache[cache_key] = triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero)(kernel)

    def run_tuned(grid, *args, **kw):
        tuned[grid](*args, **kw)
        best = tuned.best_config
        return best.kwargs[first], best.kwargs[second], best.num_warps, best.num_stages

    return run_tuned


def kernel_settings() -> dict[str, str]:
    """The environment variables set in this process that choose a kernel path or its settings: every
    `ATMA_*` (docs/kernels.md lists them) and `TRITON_INTERPRET`, by name."""
    return {name: os.environ[name] for name in sorted(os.environ)
            if name.startswith("ATMA_") or name == "TRITON_INTERPRET"}


def describe_settings(settings: dict[str, str]) -> str:
    """`ATMA_LOSS_ROWS=torch ATMA_POLAR_BWD=split`, or `none` when no setting is made."""
    return " ".join(f"{name}={value}" for name, value in settings.items()) or "none"


def interpreting() -> bool:
    """Return True when Triton kernels defined now run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def patch_interpreter_index() -> None:
    """Let the Triton interpreter use runtime loop bounds with numpy >= 2.4 (idempotent).

    The interpreter holds every scalar as a one-element 1-D array and implements
    `tensor.__index__` as `int(array)`, which numpy 2.4 rejects for 1-D arrays; so
    `range(start, end, step)` with a runtime bound fails. This re-registers `__index__` through
    `.item()` each time the interpreter patches `triton.language.tensor` for a launch.
    """
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # this numpy still converts one-element arrays
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_index_via_item", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._index_via_item = True
    interpreter._patch_lang_tensor = patched


def check_launch_device(t: torch.Tensor, interpret: bool, what: str) -> None:
    """Raise a clear error when `t` cannot be handed to a Triton kernel in this process."""
    if t.device.type == "cuda" and not interpret:
        return
    if t.device.type == "cpu" and interpret:
        return
    if interpret:
        raise ValueError(f"{what}: under TRITON_INTERPRET=1 the kernels take CPU tensors, got {t.device}")
    raise ValueError(
        f"{what}: Triton kernels need CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 before "
        "importing the kernels to run them on the CPU, or use the PyTorch path (ATMA_KERNELS=torch)"
    )


@functools.lru_cache(maxsize=None)
def _device_class_cached(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 0
    if torch.version.hip is not None or (smem and smem < 96 * 1024):
        return "small"
    if props.major in (9, 10) or smem >= 200 * 1024:
        return "large"
    return "mid"


def device_class(device: torch.device, env_var: str) -> str:
    """Return the launch class of a CUDA device ("large", "mid" or "small"); `env_var` overrides it."""
    forced = os.environ.get(env_var, "auto").strip().lower() or "auto"
    if forced != "auto":
        if forced not in _CLASSES:
            raise ValueError(f"{env_var} must be one of auto, {', '.join(_CLASSES)}; got {forced!r}")
        return forced
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_class_cached(index)


def autotune_enabled(env_var: str) -> bool:
    """Return False when `env_var` is set to 0 (launch only each class's first configuration)."""
    return os.environ.get(env_var, "1").strip() != "0"


def forced_launch_configs(env_var: str, kinds: tuple[str, ...]) -> dict[str, tuple[int, int, int, int]]:
    """Parse `env_var` = "kind=BM,BN,WARPS,STAGES;..." into {kind: (BM, BN, warps, stages)}.

    Kernels not named keep their own choice; an unset or empty variable forces nothing. Raises
    ValueError (one line) on an unknown kind or a malformed tuple.
    """
    text = os.environ.get(env_var, "").strip()
    forced: dict[str, tuple[int, int, int, int]] = {}
    if not text:
        return forced
    for item in filter(None, (part.strip() for part in text.split(";"))):
        kind, sep, values = item.partition("=")
        kind = kind.strip()
        if not sep or kind not in kinds:
            raise ValueError(f"{env_var}: expected KIND=BM,BN,WARPS,STAGES with KIND in {', '.join(kinds)}; got {item!r}")
        try:
            config = tuple(int(v) for v in values.split(","))
        except ValueError:
            config = ()
        if len(config) != 4 or min(config) < 1:
            raise ValueError(f"{env_var}: {kind} needs four positive integers BM,BN,WARPS,STAGES; got {values!r}")
        forced[kind] = config
    return forced
