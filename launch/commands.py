"""Build the exact `deepspeed` launcher commands for each way of starting a run.

The command builders are pure functions of their arguments (the environment is passed in as a
dict), so a dry run can print the commands and tests can assert them. Only `count_local_gpus`
(which asks `nvidia-smi`, or torch, how many GPUs this machine has), `free_port` (which asks the
kernel for an unused TCP port) and `write_env_file` touch the system.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, Sequence

DEFAULT_MASTER_PORT = 29500
# DeepSpeed's launcher, like `deepspeed --num_gpus N` on a machine without GPUs, runs N CPU ranks.
DEFAULT_CPU_RANKS = 2
# `--no_ssh` with `--node_rank` arrived in DeepSpeed 0.14.5.
MIN_NO_SSH_VERSION = (0, 14, 5)
ENV_FILE = ".deepspeed_env"

# Variables copied into .deepspeed_env: these prefixes, plus the exact names below.
ENV_PREFIXES = ("WANDB_", "HF_", "TRANSFORMERS_", "NCCL_", "ATMA_")
ENV_NAMES = ("PYTHONPATH", "TORCH_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "TRITON_HOME",
             "XDG_CACHE_HOME")

# DeepSpeed ignores anything after `slots=N` (e.g. OpenMPI's `max_slots=N`), and so do we.
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)(\s.*)?$")


class LaunchError(ValueError):
    """Bad launcher input (missing file, malformed hostfile, rank out of range, ...)."""


@dataclass(frozen=True)
class Host:
    """One line of a DeepSpeed hostfile: a host name and how many ranks (GPUs) it runs."""

    name: str
    slots: int


def repo_root() -> str:
    """Absolute path of the repository that holds this package."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_script(cwd: str | None = None) -> str:
    """Path of pretrain/train.py as the launcher should name it: relative when under cwd."""
    script = os.path.join(repo_root(), "pretrain", "train.py")
    rel = os.path.relpath(script, cwd or os.getcwd())
    return script if rel.startswith(os.pardir) else rel


def check_run_config(path: str) -> None:
    """Raise LaunchError unless the run config YAML exists."""
    if not os.path.isfile(path):
        raise LaunchError(f"{path}: run config not found")


def parse_hostfile(path: str) -> list[Host]:
    """Read a DeepSpeed hostfile (`HOST slots=N` per line, `#` comments) into hosts, in order."""
    if not os.path.isfile(path):
        raise LaunchError(f"{path}: hostfile not found")
    hosts: list[Host] = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            match = _HOST_LINE.match(line)
            if match is None:
                raise LaunchError(f"{path}:{number}: expected 'HOST slots=N', got {line!r}")
            name, slots = match.group(1), int(match.group(2))
            if slots < 1:
                raise LaunchError(f"{path}:{number}: {name} has slots={slots}; it must be at least 1")
            if any(h.name == name for h in hosts):
                raise LaunchError(f"{path}:{number}: host {name} is listed twice")
            hosts.append(Host(name, slots))
    if not hosts:
        raise LaunchError(f"{path}: hostfile lists no hosts")
    return hosts


def free_port() -> int:
    """A TCP port no process listens on now, chosen by the kernel (for the rendezvous of a one-node run).

    The kernel picks among its ephemeral ports at random, so two launches started together get
    different ports; a fixed default (29500) would make the second one fail with EADDRINUSE.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_local_gpus() -> int:
    """Number of GPUs on this machine: `nvidia-smi -L` lines, else torch.cuda.device_count()."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True)
            return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (subprocess.SubprocessError, OSError):
            pass
    import torch

    return torch.cuda.device_count()


def local_device_args(requested: int | None, environ: Mapping[str, str]) -> list[str]:
    """DeepSpeed's device-selection arguments for a single-node run.

    Args:
        requested: ranks asked for with --gpus or NUM_GPUS; None means every visible GPU, or
            DEFAULT_CPU_RANKS CPU ranks on a machine without GPUs.
        environ: the environment (read for CUDA_VISIBLE_DEVICES).
    Returns:
        `["--num_gpus", N]`, or `["--include", "localhost:I,J"]` when CUDA_VISIBLE_DEVICES
        names the devices (DeepSpeed drops CUDA_VISIBLE_DEVICES when given --num_gpus, so the
        visible set is passed on as an explicit device list instead).
    """
    if requested is not None and requested < 1:
        raise LaunchError(f"--gpus must be at least 1, got {requested}")
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        if not all(d.isdigit() for d in ids):
            raise LaunchError(f"CUDA_VISIBLE_DEVICES={visible}: DeepSpeed's launcher needs numeric device indices")
        if requested is not None:
            if requested > len(ids):
                raise LaunchError(f"--gpus {requested} but CUDA_VISIBLE_DEVICES={visible} names {len(ids)} device(s)")
            ids = ids[:requested]
        return ["--include", "localhost:" + ",".join(ids)]
    if requested is not None:
        return ["--num_gpus", str(requested)]
    # CUDA_VISIBLE_DEVICES="" hides every GPU: run CPU ranks.
    found = 0 if visible is not None else count_local_gpus()
    return ["--num_gpus", str(found or DEFAULT_CPU_RANKS)]


def single_node_command(run_config: str, train_args: Sequence[str], *, device_args: Sequence[str],
                        master_port: int | None = None, deepspeed_args: Sequence[str] = (),
                        script: str | None = None) -> list[str]:
    """`deepspeed [devices] pretrain/train.py --config RUN.yaml ...` for one machine."""
    cmd = ["deepspeed", *device_args]
    if master_port is not None:
        cmd += ["--master_port", str(master_port)]
    return cmd + [*deepspeed_args, script or train_script(), "--config", run_config, *train_args]


def pdsh_command(run_config: str, train_args: Sequence[str], *, hostfile: str, master_addr: str,
                 master_port: int, deepspeed_args: Sequence[str] = (), script: str | None = None) -> list[str]:
    """The one command, run on a launch host, that starts every node of the hostfile over pdsh/ssh."""
    return ["deepspeed", "--hostfile", hostfile, "--master_addr", master_addr, "--master_port", str(master_port),
            "--launcher", "pdsh", *deepspeed_args, script or train_script(), "--config", run_config, *train_args]


def no_ssh_command(run_config: str, train_args: Sequence[str], *, hostfile: str, node_rank: int, master_addr: str,
                   master_port: int, deepspeed_args: Sequence[str] = (), script: str | None = None) -> list[str]:
    """The command one node runs itself (no ssh): every node runs it with its own node rank."""
    return ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node_rank),
            "--master_addr", master_addr, "--master_port", str(master_port), *deepspeed_args,
            script or train_script(), "--config", run_config, *train_args]


def check_node_rank(node_rank: int, hosts: Sequence[Host], hostfile: str) -> None:
    """Raise LaunchError unless node_rank indexes a host of the hostfile."""
    if not 0 <= node_rank < len(hosts):
        raise LaunchError(f"--node-rank {node_rank} is out of range: {hostfile} lists {len(hosts)} host(s), "
                          f"so it must be 0..{len(hosts) - 1}")


def node_label(hosts: Sequence[Host], node_rank: int) -> str:
    """`node1 (node_rank 1, ranks 8-15)`: a host and the global ranks it runs."""
    first = sum(h.slots for h in hosts[:node_rank])
    host = hosts[node_rank]
    ranks = f"rank {first}" if host.slots == 1 else f"ranks {first}-{first + host.slots - 1}"
    return f"{host.name} (node_rank {node_rank}, {ranks})"


def env_file_entries(environ: Mapping[str, str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The `(KEY, VALUE)` pairs for .deepspeed_env, sorted, and the names skipped (multi-line values)."""
    entries, skipped = [], []
    for key in sorted(environ):
        if not (key.startswith(ENV_PREFIXES) or key in ENV_NAMES):
            continue
        value = environ[key]
        # DeepSpeed reads the file line by line, so a value cannot span lines.
        if "\n" in value or "\r" in value:
            skipped.append(key)
            continue
        entries.append((key, value))
    return entries, skipped


def write_env_file(path: str, entries: Sequence[tuple[str, str]]) -> None:
    """Write .deepspeed_env (owner-only: it can hold tokens such as WANDB_API_KEY or HF_TOKEN)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    # The mode above applies only to a new file; an existing one keeps its own until told.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(f"{key}={value}\n" for key, value in entries)


def deepspeed_version_ok(version: str, minimum: tuple[int, ...] = MIN_NO_SSH_VERSION) -> bool:
    """Whether a DeepSpeed version string (e.g. `0.19.8+abc`) is at least `minimum`."""
    parts = []
    for piece in version.split("+")[0].split(".")[:len(minimum)]:
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts) >= minimum
