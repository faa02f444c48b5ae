"""Where a run's numbers come from: the code version (git commit, uncommitted changes) and library versions."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = ("torch", "deepspeed", "triton", "numpy", "safetensors", "tokenizers", "webdataset")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict:
    """`{"commit": SHA or None, "dirty": bool or None}` of the repository this code runs from.

    `dirty` is true when tracked files differ from the commit (untracked files do not count);
    both are None outside a git checkout or without git.
    """
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def library_versions() -> dict:
    """Python and the versions of the libraries that shape training numerics (None when absent)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def benchmark_provenance() -> dict:
    """What a benchmark's figures were measured with: UTC time, code version, library versions (fla-core and
    torch's CUDA build too) and the kernel settings made in the environment."""
    versions = library_versions()
    try:
        versions["fla-core"] = metadata.version("fla-core")
    except metadata.PackageNotFoundError:
        versions["fla-core"] = None
    import torch

    from kernels.common import kernel_settings

    versions["cuda"] = torch.version.cuda  # the CUDA torch was built for (None for a CPU build)
    return {"measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "code_version": code_version(), "versions": versions, "kernel_settings": kernel_settings()}


def describe_code(version: dict) -> str:
    """`abc1234` or `abc1234 (uncommitted changes)`, or `unknown` outside git."""
    if not version or not version.get("commit"):
        return "unknown"
    return version["commit"][:12] + (" (uncommitted changes)" if version.get("dirty") else "")
