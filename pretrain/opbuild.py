"""DeepSpeed ops compiled on first use: name them before the build starts, so a first run is not silent.

DeepSpeed compiles some C++/CUDA ops the first time a process needs them (fused Adam on the GPU,
CPU Adam under optimizer offload: a minute or more) and caches the result under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); an op is pending when it is neither
installed prebuilt nor in that cache.
"""

from __future__ import annotations

import os
import sys
import time

# torch serialises an op's build with a lock file in its build directory and waits, without end, while
# that file exists; a killed build leaves it behind. A build takes about a minute on the CPU (a few for
# the CUDA ops), so a lock this old belongs to no running build.
STALE_LOCK_SECONDS = 900

# Builder class -> what the op does, for the announcement.
PURPOSES = {
    "FusedAdamBuilder": "fused Adam",
    "CPUAdamBuilder": "CPU Adam (optimizer offload)",
}


def pending_builds(builder_classes: list[str]) -> list[str]:
    """The op names among `builder_classes` that DeepSpeed will compile before it can use them."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    pending = []
    for cls in builder_classes:
        builder = get_accelerator().create_op_builder(cls)
        if builder is None or installed_ops.get(builder.NAME, False):
            continue
        if not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            continue  # DeepSpeed skips an op this machine cannot build
        library = os.path.join(_get_build_directory(builder.NAME, verbose=False), builder.NAME + ".so")
        if not os.path.isfile(library):
            pending.append(cls)
    return pending


def toolkit_missing(op_name: str) -> str:
    """Why DeepSpeed's op `op_name` (e.g. "fused_adam") can neither load prebuilt nor be compiled here; '' when it
    can: built into the DeepSpeed wheel, or a GPU toolkit with its compiler found as torch's extension builder
    finds one."""
    import torch
    from deepspeed.git_version_info import installed_ops
    from torch.utils import cpp_extension

    if installed_ops.get(op_name, False):
        return ""
    if torch.version.hip:
        home, compiler, variable = cpp_extension.ROCM_HOME, "hipcc", "ROCM_HOME"
    else:
        home, compiler, variable = cpp_extension.CUDA_HOME, "nvcc", "CUDA_HOME"
    if home is None:
        return f"no GPU toolkit to compile it ({variable} is not set and no {compiler} is on PATH)"
    if not os.path.isfile(os.path.join(home, "bin", compiler)):
        return f"no {compiler} in {home}/bin to compile it ({variable} points at a toolkit without its compiler)"
    return ""


def announce_builds(builder_classes: list[str]) -> None:
    """Print one line on local rank 0 for each op that is about to be compiled."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    for cls in pending_builds(builder_classes):
        print(f"[atma] building DeepSpeed's {PURPOSES.get(cls, cls)} op for this machine (one time, about a "
              f"minute; cached under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)", flush=True)


def stale_build_locks(builder_classes: list[str], max_age_s: float = STALE_LOCK_SECONDS) -> list[tuple[str, float]]:
    """(path, age in seconds) of the build locks of `builder_classes` older than `max_age_s`."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    stale = []
    for cls in builder_classes:
        builder = get_accelerator().create_op_builder(cls)
        if builder is None:
            continue
        lock = os.path.join(_get_build_directory(builder.NAME, verbose=False), "lock")
        try:
            age = time.time() - os.stat(lock).st_mtime
        except FileNotFoundError:
            continue
        if age > max_age_s:
            stale.append((lock, age))
    return stale


def check_build_locks(builder_classes: list[str]) -> None:
    """Refuse to start, in one line, when an interrupted build left a lock that every load would wait on."""
    from .step import TrainingError

    for lock, age in stale_build_locks(builder_classes):
        raise TrainingError(f"{lock} is {age / 60:.0f} minutes old: an interrupted build of a DeepSpeed op left it, "
                            f"and loading the op would wait for it forever; if no build is running, delete it "
                            f"(rm {lock}) and start again")


def extensions_root(env: dict | None = None) -> str:
    """Where torch builds ops: TORCH_EXTENSIONS_DIR of `env` (default: this process's), else its default."""
    env = os.environ if env is None else env
    if env.get("TORCH_EXTENSIONS_DIR"):
        return env["TORCH_EXTENSIONS_DIR"]
    if sys.platform.startswith("linux"):
        # torch's own default (its user cache directory), worked out without importing torch, which
        # would cost the launcher a second before every start.
        cache = env.get("XDG_CACHE_HOME", os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache"))
        return os.path.realpath(os.path.join(cache, "torch_extensions"))
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


def build_locks(env: dict | None = None) -> dict[str, int]:
    """The op build locks under torch's extensions root of `env`, each with its modification time in ns."""
    import glob

    root = extensions_root(env)
    locks = {}
    for lock in glob.glob(os.path.join(glob.escape(root), "*", "lock")) + glob.glob(
            os.path.join(glob.escape(root), "*", "*", "lock")):
        try:
            locks[lock] = os.stat(lock).st_mtime_ns
        except FileNotFoundError:
            continue
    return locks


def remove_build_locks_made_after(before: dict[str, int], env: dict | None = None) -> list[str]:
    """Delete the op build locks that are not in the snapshot `before` (or were remade since); returns their paths.

    A build killed with SIGKILL leaves its lock, and every later load of that op waits on it forever.
    The snapshot, not a clock, tells old locks from new: a file's timestamp comes from the kernel's
    coarse clock (or the file system's own granularity) and can read earlier than a `time.time()`
    taken before the file was made.
    """
    removed = []
    for lock, mtime in build_locks(env).items():
        if before.get(lock) == mtime:
            continue
        try:
            os.remove(lock)
            removed.append(lock)
        except FileNotFoundError:
            continue
    return removed
