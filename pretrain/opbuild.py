"""DeepSpeed ops compiled on first use: name them before the build starts, so a first run is not silent.

DeepSpeed compiles some C++/CUDA ops the first time a process needs them (on the CPU: the
shared-memory collectives op, about a minute) and caches the result under
$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); an op is pending when it is neither
installed prebuilt nor in that cache.
"""

from __future__ import annotations

import os

# Builder class -> what the op does, for the announcement.
PURPOSES = {
    "ShareMemCommBuilder": "CPU communication",
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


def announce_builds(builder_classes: list[str]) -> None:
    """Print one line on local rank 0 for each op that is about to be compiled."""
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    for cls in pending_builds(builder_classes):
        print(f"[atma] building DeepSpeed's {PURPOSES.get(cls, cls)} op for this machine (one time, about a "
              f"minute; cached under $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)", flush=True)
