"""Read a compiled Triton kernel's resource use from its cubin with triton's bundled cuobjdump."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

__all__ = ["resource_usage"]


def resource_usage(compiled) -> dict:
    """Registers, stack, local (spill) and static shared bytes of a compiled kernel, read by cuobjdump."""
    import triton.backends.nvidia.compiler as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    usage = {key.lower(): int(value) for key, value in fields.items()}
    usage["dynamic_shared"] = int(compiled.metadata.shared)
    return usage
