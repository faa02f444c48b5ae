"""Launchers: the exact deepspeed command of every mode (dry runs), .deepspeed_env, the SLURM
script under a fake SLURM, bad input, and two emulated nodes matching a single-node run."""

import importlib
import json
import os
import py_compile
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from launch.cli import main
from launch.commands import (
    ENV_NAMES, ENV_PREFIXES, Host, LaunchError, deepspeed_version_ok, env_file_entries, local_device_args,
    parse_hostfile,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = "pretrain/configs/tiny-cpu.yaml"
TRAIN = ["--data", "/shared/shards", "--max-steps", "4", "--set", "optim.lr=3e-4"]
TRAIN_STR = "--data /shared/shards --max-steps 4 --set optim.lr=3e-4"
LAUNCH_ENV = ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "DS_ENV_FILE")


@pytest.fixture
def clean_env(monkeypatch):
    """Run from the repository root with none of the variables the launcher reads."""
    monkeypatch.chdir(ROOT)
    for key in list(os.environ):
        if key in LAUNCH_ENV or key.startswith(ENV_PREFIXES) or key in ENV_NAMES:
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.fixture
def hostfile(tmp_path):
    path = tmp_path / "hostfile"
    path.write_text("# two machines\nnode0 slots=4\n\nnode1 slots=4\n")
    return str(path)


def dry_run(capsys, *argv):
    """Run `python -m launch ARGV` in-process; return (exit code, stdout lines, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def chosen_port(line: str) -> tuple[str, int]:
    """Split the free rendezvous port the single-node launcher chose out of a dry-run line."""
    match = re.search(r" --master_port (\d+)", line)
    assert match, line
    return line.replace(match.group(0), " --master_port PORT"), int(match.group(1))


def cli(*argv, env=None, cwd=ROOT, timeout=60):
    """Run `python -m launch ARGV` as a process."""
    full = dict(os.environ if env is None else env)
    full["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, full.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "launch", *argv], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def fake_bin(tmp_path, **scripts):
    """A directory of executable bash scripts to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + body)
        path.chmod(0o755)
    return str(bin_dir)


# A deepspeed that prints where and how it was called, then exits with $FAKE_DS_EXIT.
FAKE_DEEPSPEED = 'echo "deepspeed-called node=${SLURM_NODEID:-none} args=$*"\nexit "${FAKE_DS_EXIT:-0}"\n'


# ---------------------------------------------------------------------- single node
def test_single_node_dry_run(clean_env, capsys):
    code, lines, _ = dry_run(capsys, "single", "--gpus", "2", "--dry-run", RUN, *TRAIN)
    assert code == 0 and len(lines) == 1
    line, port = chosen_port(lines[0])
    assert line == f"localhost: deepspeed --num_gpus 2 --master_port PORT pretrain/train.py --config {RUN} {TRAIN_STR}"
    # A port nobody listens on (DeepSpeed's fixed default, 29500, fails for the second run on a machine).
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_single_node_port_extra_args_and_quoting(clean_env, capsys):
    code, lines, _ = dry_run(capsys, "single", "--gpus", "8", "--master-port", "29600",
                             "--deepspeed-arg=--bind_cores_to_rank", "--dry-run", RUN, "--set", "name=my run")
    assert code == 0
    assert lines == [f"localhost: deepspeed --num_gpus 8 --master_port 29600 --bind_cores_to_rank "
                     f"pretrain/train.py --config {RUN} --set 'name=my run'"]


def test_single_node_num_gpus_env(clean_env, capsys):
    clean_env.setenv("NUM_GPUS", "4")
    _, lines, _ = dry_run(capsys, "single", "--dry-run", RUN)
    assert chosen_port(lines[0])[0] == f"localhost: deepspeed --num_gpus 4 --master_port PORT pretrain/train.py --config {RUN}"


def test_device_selection():
    assert local_device_args(3, {}) == ["--num_gpus", "3"]
    # DeepSpeed drops CUDA_VISIBLE_DEVICES under --num_gpus, so the visible set becomes --include.
    assert local_device_args(None, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["--include", "localhost:2,3"]
    assert local_device_args(1, {"CUDA_VISIBLE_DEVICES": "2,3"}) == ["--include", "localhost:2"]
    # Every GPU hidden: CPU ranks, DeepSpeed's default of 2.
    assert local_device_args(None, {"CUDA_VISIBLE_DEVICES": ""}) == ["--num_gpus", "2"]
    with pytest.raises(LaunchError, match="names 2 device"):
        local_device_args(4, {"CUDA_VISIBLE_DEVICES": "2,3"})
    with pytest.raises(LaunchError, match="numeric"):
        local_device_args(None, {"CUDA_VISIBLE_DEVICES": "GPU-1234"})
    with pytest.raises(LaunchError, match="at least 1"):
        local_device_args(0, {})


def test_gpu_count_from_nvidia_smi(clean_env, tmp_path):
    listing = 'for i in 0 1 2; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n'
    clean_env.setenv("PATH", fake_bin(tmp_path, **{"nvidia-smi": listing}) + os.pathsep + os.environ["PATH"])
    assert local_device_args(None, {}) == ["--num_gpus", "3"]
    clean_env.setenv("PATH", fake_bin(tmp_path, **{"nvidia-smi": "exit 0\n"}) + os.pathsep + os.environ["PATH"])
    # No GPU listed: CPU ranks.
    assert local_device_args(None, {}) == ["--num_gpus", "2"]


def test_pretrain_sh_wraps_single_mode(clean_env):
    clean_env.setenv("PYTHON", sys.executable)
    proc = subprocess.run(["launch/pretrain.sh", "--gpus", "2", "--dry-run", RUN, *TRAIN], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line, _ = chosen_port(proc.stdout)
    assert line == f"localhost: deepspeed --num_gpus 2 --master_port PORT pretrain/train.py --config {RUN} {TRAIN_STR}\n"
    usage = subprocess.run(["launch/pretrain.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: launch/pretrain.sh")


# ---------------------------------------------------------------------- hostfile over pdsh
def test_pdsh_dry_run_with_env_file(clean_env, capsys, hostfile):
    clean_env.setenv("WANDB_PROJECT", "atma")
    clean_env.setenv("WANDB_API_KEY", "secret-value")
    clean_env.setenv("HF_HOME", "/shared/hf")
    clean_env.setenv("NCCL_IB_HCA", "mlx5_0,mlx5_1")
    clean_env.setenv("TRITON_CACHE_DIR", "/tmp/triton")
    clean_env.setenv("ATMA_KERNELS", "triton")
    clean_env.setenv("PYTHONPATH", "/opt/extra")
    clean_env.setenv("UNRELATED_SETTING", "not exported")
    env_file = os.path.join(ROOT, ".deepspeed_env")
    existed = os.path.exists(env_file)
    code, lines, err = dry_run(capsys, "pdsh", "--hostfile", hostfile, "--dry-run", RUN, *TRAIN)
    assert code == 0, err
    assert lines == [
        f"launch host: deepspeed --hostfile {hostfile} --master_addr node0 --master_port 29500 --launcher pdsh "
        f"pretrain/train.py --config {RUN} {TRAIN_STR}",
        "node0 (node_rank 0, ranks 0-3): started by the launch host over pdsh/ssh",
        "node1 (node_rank 1, ranks 4-7): started by the launch host over pdsh/ssh",
        ".deepspeed_env: ATMA_KERNELS=triton",
        ".deepspeed_env: HF_HOME=/shared/hf",
        ".deepspeed_env: NCCL_IB_HCA=mlx5_0,mlx5_1",
        ".deepspeed_env: PYTHONPATH=/opt/extra",
        ".deepspeed_env: TRITON_CACHE_DIR=/tmp/triton",
        ".deepspeed_env: WANDB_API_KEY=***",
        ".deepspeed_env: WANDB_PROJECT=atma",
    ]
    # A dry run writes nothing.
    assert os.path.exists(env_file) == existed


def test_pdsh_master_override_and_no_env_file(clean_env, capsys, hostfile):
    clean_env.setenv("MASTER_PORT", "29700")
    code, lines, _ = dry_run(capsys, "pdsh", "--hostfile", hostfile, "--master-addr", "10.0.0.1",
                             "--no-env-file", "--dry-run", RUN)
    assert code == 0
    assert lines[0] == (f"launch host: deepspeed --hostfile {hostfile} --master_addr 10.0.0.1 --master_port 29700 "
                        f"--launcher pdsh pretrain/train.py --config {RUN}")
    assert lines[-1] == ".deepspeed_env: left as is (--no-env-file)"


def test_env_file_entries_skip_multiline_values():
    entries, skipped = env_file_entries({"WANDB_TAGS": "a,b", "HF_TOKEN": "x\ny", "XDG_CACHE_HOME": "/c",
                                         "TORCH_HOME": "/t", "TORCH_LOGS": "dynamo", "HOME": "/root"})
    assert entries == [("TORCH_HOME", "/t"), ("WANDB_TAGS", "a,b"), ("XDG_CACHE_HOME", "/c")]
    assert skipped == ["HF_TOKEN"]


def test_pdsh_run_writes_env_file_and_propagates_exit_code(tmp_path, hostfile):
    """Without --dry-run: .deepspeed_env is written (owner-only) and deepspeed's exit code comes back."""
    env = {k: v for k, v in os.environ.items()
           if not (k in LAUNCH_ENV or k.startswith(ENV_PREFIXES) or k in ENV_NAMES)}
    env.update(PATH=fake_bin(tmp_path, deepspeed=FAKE_DEEPSPEED, pdsh="exit 0\n") + os.pathsep + env["PATH"],
               WANDB_API_KEY="secret-value", HF_HOME="/shared/hf", FAKE_DS_EXIT="7")
    work = tmp_path / "work"
    work.mkdir()
    run_config = os.path.join(ROOT, RUN)
    proc = cli("pdsh", "--hostfile", hostfile, run_config, "--max-steps", "4", env=env, cwd=work)
    assert proc.returncode == 7, proc.stderr
    script = os.path.join(ROOT, "pretrain", "train.py")
    assert proc.stdout == (f"deepspeed-called node=none args=--hostfile {hostfile} --master_addr node0 "
                           f"--master_port 29500 --launcher pdsh {script} --config {run_config} --max-steps 4\n")
    # PYTHONPATH is set by cli() for the subprocess, so it is exported too.
    assert (work / ".deepspeed_env").read_text() == (
        f"HF_HOME=/shared/hf\nPYTHONPATH={ROOT}\nWANDB_API_KEY=secret-value\n")
    assert stat.S_IMODE((work / ".deepspeed_env").stat().st_mode) == 0o600


@pytest.mark.parametrize("script,first", [
    ("multinode.sh", "launch host: deepspeed --hostfile {h} --master_addr node0 --master_port 29500 --launcher pdsh "),
    ("node.sh", "node0 (node_rank 0, ranks 0-3): deepspeed --hostfile {h} --no_ssh --node_rank 0 --master_addr node0 "),
])
def test_multi_node_wrappers(clean_env, hostfile, script, first):
    clean_env.setenv("PYTHON", sys.executable)
    proc = subprocess.run([f"launch/{script}", "--hostfile", hostfile, "--dry-run", RUN], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(first.format(h=hostfile))
    usage = subprocess.run([f"launch/{script}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith(f"usage: launch/{script}")


# ---------------------------------------------------------------------- no ssh, one launcher per node
@pytest.mark.parametrize("rank", [0, 1])
def test_no_ssh_dry_run_per_node(clean_env, capsys, hostfile, rank):
    code, lines, _ = dry_run(capsys, "no-ssh", "--hostfile", hostfile, "--node-rank", str(rank),
                             "--master-addr", "10.0.0.1", "--master-port", "29601", "--dry-run", RUN, *TRAIN)
    assert code == 0
    ranks = ["ranks 0-3", "ranks 4-7"][rank]
    assert lines == [f"node{rank} (node_rank {rank}, {ranks}): deepspeed --hostfile {hostfile} --no_ssh "
                     f"--node_rank {rank} --master_addr 10.0.0.1 --master_port 29601 pretrain/train.py "
                     f"--config {RUN} {TRAIN_STR}"]


def test_no_ssh_dry_run_every_node_and_env_defaults(clean_env, capsys, hostfile):
    clean_env.setenv("MASTER_ADDR", "10.0.0.9")
    _, lines, _ = dry_run(capsys, "no-ssh", "--hostfile", hostfile, "--dry-run", RUN)
    assert lines == [
        f"node0 (node_rank 0, ranks 0-3): deepspeed --hostfile {hostfile} --no_ssh --node_rank 0 "
        f"--master_addr 10.0.0.9 --master_port 29500 pretrain/train.py --config {RUN}",
        f"node1 (node_rank 1, ranks 4-7): deepspeed --hostfile {hostfile} --no_ssh --node_rank 1 "
        f"--master_addr 10.0.0.9 --master_port 29500 pretrain/train.py --config {RUN}",
    ]
    clean_env.setenv("NODE_RANK", "1")
    _, lines, _ = dry_run(capsys, "no-ssh", "--hostfile", hostfile, "--dry-run", RUN)
    assert len(lines) == 1 and lines[0].startswith("node1 (node_rank 1, ranks 4-7): ")


def test_deepspeed_version_check():
    assert deepspeed_version_ok("0.19.8") and deepspeed_version_ok("0.14.5+abc123")
    assert not deepspeed_version_ok("0.14.4") and not deepspeed_version_ok("0.9.9")


# ---------------------------------------------------------------------- SLURM
FAKE_SCONTROL = """\
[[ "$*" == "show hostnames gpu[07-08]" ]] || { echo "fake scontrol: unexpected arguments: $*" >&2; exit 1; }
printf 'gpu07\\ngpu08\\n'
"""
# Runs the task once per node, in order, the way srun would on each node of the allocation.
FAKE_SRUN = """\
printf '%s\\n' "$@" >"$FAKE_SRUN_ARGS"
while [[ $1 == --* ]]; do shift; done
SLURM_NODEID=0 SLURMD_NODENAME=gpu07 "$@"
SLURM_NODEID=1 SLURMD_NODENAME=gpu08 "$@"
"""


def slurm_env(tmp_path, **extra):
    """The environment of a batch script on a two-node allocation, with fake scontrol/srun/deepspeed."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("SLURM_") or k in LAUNCH_ENV or k in ("GPUS_PER_NODE", "ATMA_DRY_RUN"))}
    # nvidia-smi lists no GPU, as on a machine without one.
    bin_dir = fake_bin(tmp_path, scontrol=FAKE_SCONTROL, srun=FAKE_SRUN, deepspeed=FAKE_DEEPSPEED, **{"nvidia-smi": ""})
    env.update(PATH=bin_dir + os.pathsep + env["PATH"], SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="4242",
               SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=ROOT, SLURM_GPUS_ON_NODE="4", PYTHON=sys.executable,
               ATMA_HOSTFILE=str(tmp_path / "hostfile"), FAKE_SRUN_ARGS=str(tmp_path / "srun-args"))
    env.update(extra)
    return env


def sbatch(tmp_path, *args, **extra):
    # sbatch runs the script from a spool copy in another directory; so does this test.
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), *args], cwd=tmp_path,
                          env=slurm_env(tmp_path, **extra), capture_output=True, text=True, timeout=120)


def slurm_line(tmp_path, rank):
    ranks = ["ranks 0-3", "ranks 4-7"][rank]
    return (f"gpu0{7 + rank} (node_rank {rank}, {ranks}): deepspeed --hostfile {tmp_path / 'hostfile'} --no_ssh "
            f"--node_rank {rank} --master_addr gpu07 --master_port 29500 pretrain/train.py --config {RUN} {TRAIN_STR}")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_slurm_dry_run(tmp_path, how):
    args = ["--dry-run", RUN, *TRAIN] if how == "flag" else [RUN, *TRAIN]
    proc = sbatch(tmp_path, *args, **({"ATMA_DRY_RUN": "1"} if how == "env" else {}))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [slurm_line(tmp_path, 0), slurm_line(tmp_path, 1)]
    assert (tmp_path / "hostfile").read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    srun_args = (tmp_path / "srun-args").read_text().splitlines()
    assert srun_args[:5] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
    launch_args = ["--hostfile", str(tmp_path / "hostfile"), "--master-addr", "gpu07", "--master-port", "29500",
                   "--dry-run", RUN, *TRAIN]
    assert srun_args[-len(launch_args):] == launch_args


def test_slurm_runs_the_no_ssh_command_on_every_node(tmp_path):
    proc = sbatch(tmp_path, RUN, *TRAIN, GPUS_PER_NODE="2", MASTER_PORT="29777")
    assert proc.returncode == 0, proc.stderr
    expected = [f"deepspeed-called node={rank} args=--hostfile {tmp_path / 'hostfile'} --no_ssh --node_rank {rank} "
                f"--master_addr gpu07 --master_port 29777 pretrain/train.py --config {RUN} {TRAIN_STR}"
                for rank in (0, 1)]
    assert proc.stdout.splitlines() == expected
    assert (tmp_path / "hostfile").read_text() == "gpu07 slots=2\ngpu08 slots=2\n"


def test_slurm_typed_gpus_per_node_and_default_hostfile_cleanup(tmp_path):
    env = dict(SLURM_GPUS_ON_NODE="", SLURM_GPUS_PER_NODE="h100:8", ATMA_HOSTFILE="")
    proc = sbatch(tmp_path, "--dry-run", RUN, **env)
    assert proc.returncode == 0, proc.stderr
    default = os.path.join(ROOT, ".hostfile-4242")
    assert proc.stdout.splitlines()[1] == (
        f"gpu08 (node_rank 1, ranks 8-15): deepspeed --hostfile {default} --no_ssh --node_rank 1 "
        f"--master_addr gpu07 --master_port 29500 pretrain/train.py --config {RUN}")
    assert not os.path.exists(default)


@pytest.mark.parametrize("args,extra,message", [
    (["missing.yaml"], {}, "error: missing.yaml: run config not found"),
    ([RUN], {"SLURM_JOB_NODELIST": ""}, "error: SLURM_JOB_NODELIST is not set: submit this script with sbatch"),
    ([RUN], {"SLURM_GPUS_ON_NODE": ""}, "error: cannot tell the GPUs per node (got '0'): set GPUS_PER_NODE"),
])
def test_slurm_bad_input(tmp_path, args, extra, message):
    proc = sbatch(tmp_path, *args, **extra)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [message]


# ---------------------------------------------------------------------- bad input
BAD_HOSTFILES = {
    "no-slots": ("node0\n", ":1: expected 'HOST slots=N', got 'node0'"),
    "bad-slots": ("node0 slots=eight\n", ":1: expected 'HOST slots=N', got 'node0 slots=eight'"),
    "zero-slots": ("node0 slots=0\n", ":1: node0 has slots=0; it must be at least 1"),
    "twice": ("node0 slots=1\nnode0 slots=1\n", ":2: host node0 is listed twice"),
    "empty": ("# nothing\n\n", ": hostfile lists no hosts"),
}


@pytest.mark.parametrize("name", sorted(BAD_HOSTFILES))
def test_malformed_hostfile(tmp_path, name):
    text, message = BAD_HOSTFILES[name]
    path = tmp_path / "hostfile"
    path.write_text(text)
    proc = cli("no-ssh", "--hostfile", str(path), "--node-rank", "0", "--dry-run", RUN)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {path}{message}"]


@pytest.mark.parametrize("argv,message", [
    (["single", "--gpus", "2", "--dry-run", "missing.yaml"], "error: missing.yaml: run config not found"),
    (["pdsh", "--hostfile", "missing-hostfile", "--dry-run", RUN], "error: missing-hostfile: hostfile not found"),
    (["no-ssh", "--hostfile", "missing-hostfile", "--node-rank", "0", RUN],
     "error: missing-hostfile: hostfile not found"),
    (["single", "--gpus", "0", "--dry-run", RUN], "error: --gpus must be at least 1, got 0"),
    (["single", RUN, "--gpus", "2"], "error: launcher option --gpus must come before RUN.yaml"),
    (["single", "--dry-run", RUN, "--config", RUN], "error: give the run config as RUN.yaml, not as --config"),
    (["single", "--master-port", "99999", "--dry-run", RUN],
     "python -m launch single: error: argument --master-port: '99999' is not a TCP port (1-65535) (see --help)"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message):
    proc = cli(*argv)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [message]


@pytest.mark.parametrize("rank", ["2", "-1"])
def test_node_rank_out_of_range(hostfile, rank):
    proc = cli("no-ssh", "--hostfile", hostfile, "--node-rank", rank, "--dry-run", RUN)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: --node-rank {rank} is out of range: {hostfile} lists 2 host(s), so it must be 0..1"]


def test_no_ssh_run_needs_a_node_rank(clean_env, hostfile):
    proc = cli("no-ssh", "--hostfile", hostfile, RUN)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: no-ssh needs --node-rank N (or $NODE_RANK): this machine's line in the hostfile, from 0"]


def test_a_master_port_from_the_environment_is_checked(hostfile):
    proc = cli("pdsh", "--hostfile", hostfile, "--dry-run", RUN, env=dict(os.environ, MASTER_PORT="70000"))
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: $MASTER_PORT=70000 is not a TCP port (1-65535)"]


def test_usage_errors_are_one_line_and_exit_2():
    proc = cli("pdsh", RUN)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "python -m launch pdsh: error: the following arguments are required: --hostfile (see --help)"]


def test_hostfile_example_parses():
    assert parse_hostfile(os.path.join(ROOT, "launch", "hostfile.example")) == [
        Host("gpu-node-0", 8), Host("gpu-node-1", 8)]


# ---------------------------------------------------------------------- scripts/gpu_check.sh
GPU_CHECK = os.path.join(ROOT, "scripts", "gpu_check.sh")


def test_gpu_check_help_prints_its_usage_and_runs_nothing(tmp_path):
    proc = subprocess.run(["bash", GPU_CHECK, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("One GPU check of the whole stack")
    assert proc.stdout.rstrip().endswith("Usage: bash scripts/gpu_check.sh OUT_DIR [--quick]")
    assert "#" not in proc.stdout and os.listdir(tmp_path) == []
    proc = subprocess.run(["bash", GPU_CHECK, "--quick"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "error: unknown option --quick" in proc.stderr


def test_gpu_check_without_cuda_stops_before_any_step(tmp_path):
    # Every command a step would start records that it ran.
    ran = tmp_path / "ran"
    record = f'echo "$0 $*" >> {ran}\n'
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable,
               PATH=fake_bin(tmp_path, **{"nvidia-smi": record, "timeout": record}) + os.pathsep + os.environ["PATH"])
    out = tmp_path / "out"
    proc = subprocess.run(["bash", GPU_CHECK, str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: no usable CUDA device: torch.cuda.is_available() is False for "
                                   f"{sys.executable}; this check needs a GPU")
    assert proc.stdout == "" and not out.exists() and not ran.exists()


# Stands in for the GPU machine's python in a dry run of the check: it says CUDA is there, runs the
# check's import and version lines for real, and only records every other call (one JSON line per call
# in $DRY_LOG: its argv and the ATMA_* variables it saw) for `check_dry_calls`, which checks them in the
# test's process (no torch import per call).
DRY_PYTHON = """#!{python}
import json, os, subprocess, sys
argv = sys.argv[1:]
env = {{k: v for k, v in os.environ.items() if k.startswith("ATMA_")}}
with open(os.environ["DRY_LOG"], "a") as log:
    log.write(json.dumps({{"argv": argv, "env": env}}) + "\\n")
if argv[0] == "-c" and "cuda.is_available" in argv[1]:
    print("True")
elif argv[0] == "-c" and "fla_refusal" in argv[1]:  # what the guard says of FLA's backward
    print(os.environ.get("DRY_FLA_BACKWARD", "refused"))
elif argv[0] == "-c":  # the version line and the check that every step's modules import
    sys.exit(subprocess.run([sys.executable, *argv]).returncode)
elif argv[:2] == ["-m", "pytest"] and os.environ.get("DRY_PYTEST_SUMMARY"):  # gpu tests that fail
    print(os.environ["DRY_PYTEST_SUMMARY"])
    sys.exit(1)
"""


def dry_python(tmp_path):
    """Write the dry run's python (DRY_PYTHON) into `tmp_path` and return its path."""
    python = tmp_path / "python"
    python.write_text(DRY_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    return python


def dry_calls(log) -> list[list[str]]:
    """The argv of every call the dry run's python recorded, in order."""
    return [json.loads(line)["argv"] for line in log.read_text().splitlines()]


def dry_envs(log) -> list[dict[str, str]]:
    """The ATMA_* environment of every call the dry run's python recorded, in order."""
    return [json.loads(line)["env"] for line in log.read_text().splitlines()]


def dry_gpu_check(tmp_path, **variables):
    """Run the GPU check with the dry run's python and a stand-in nvidia-smi, `variables` added to the
    environment; return the process, the output folder and the log of the python's calls."""
    log = tmp_path / "calls"
    env = dict(os.environ, PYTHON=str(dry_python(tmp_path)), DRY_LOG=str(log), **variables,
               PATH=fake_bin(tmp_path, **{"nvidia-smi": "echo 'NVIDIA H200, 143771 MiB'\n"}) + os.pathsep
               + os.environ["PATH"])
    out = tmp_path / "out"
    proc = subprocess.run(["bash", GPU_CHECK, str(out)], capture_output=True, text=True, env=env, timeout=300)
    return proc, out, log


def check_dry_calls(calls: list[list[str]]) -> None:
    """Check each recorded step command as the step would read it: pytest collects its tests, each benchmark
    parses its arguments (pretrain.bench also plans its cases and DeepSpeed variants), each script compiles."""
    from pretrain import bench

    for argv in calls:
        if argv[0] == "-c":
            continue
        try:
            if argv[:2] == ["-m", "pytest"]:
                proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *argv[2:]], cwd=ROOT,
                                      capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            elif argv[:2] == ["-m", "pretrain.bench"]:
                bench.plan_cases(bench.parse_args(argv[2:]))
            elif argv[0] == "-m":
                importlib.import_module(argv[1]).parse_args(argv[2:])
            else:
                py_compile.compile(argv[0], doraise=True)
        except SystemExit as stop:
            pytest.fail(f"{' '.join(argv)}: its argument parser exited with {stop.code}")


def test_every_step_of_the_gpu_check_has_a_valid_command_line(tmp_path):
    python = dry_python(tmp_path)
    log = tmp_path / "calls"
    env = dict(os.environ, PYTHON=str(python), DRY_LOG=str(log),
               PATH=fake_bin(tmp_path, **{"nvidia-smi": "echo 'NVIDIA H200, 143771 MiB'\n"}) + os.pathsep
               + os.environ["PATH"])
    out = tmp_path / "out"
    (out / "teacher-378m").mkdir(parents=True)  # the export script is only compiled here; its directory stands in
    proc = subprocess.run(["bash", GPU_CHECK, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = re.findall(r"^step (\w+): exit 0 after", (out / "gpu.txt").read_text(), flags=re.M)
    assert steps == ["gpu_tests", "bench_training", "bench_training_fla_timing_only", "bench_loss", "bench_kernels",
                     "bench_training_loop_carry", "bench_training_mb16", "bench_recipe", "bench_training_deepcompile",
                     "bench_zero3_settings", "bench_zero2_settings", "bench_kernels_fla_timing_only", "eval_64k",
                     "bench_decode", "bench_distill", "bench_loss_distill"]
    assert not (out / "teacher-378m").exists()  # the teacher's weights are not left among the results
    (out / "teacher-378m").mkdir()  # the distillation steps' teacher, for checking their command lines
    check_dry_calls(dry_calls(log))
    calls = [" ".join(argv) for argv in dry_calls(log)]
    assert sum(c.startswith("-m pretrain.bench") for c in calls) == 9
    assert any(c.startswith("-m pretrain.bench --micro-batch 16 ") and
               "--cases polar:3:none:blocks,nope:3:none:blocks,polar:3:budget0:blocks " in c for c in calls)
    # Only the loop-carry step keeps the memory's PyTorch loop (the "small" launch class of its carry).
    profiles = [(" ".join(argv), env.get("ATMA_DELTA_TRITON_PROFILE")) for argv, env in zip(dry_calls(log),
                                                                                             dry_envs(log))]
    assert [c for c, profile in profiles if profile is not None] == [
        c for c in calls if c.endswith("bench_training_loop_carry.json")]
    assert all(profile in (None, "small") for _, profile in profiles)
    assert any("tests/test_triton_gated_delta.py tests/test_fla_bridge.py" in c and "tests/test_triton_softcap_ce.py" in c
               for c in calls if c.startswith("-m pytest"))
    # FLA's refused backward (it can leave the GPU unusable) runs only in the two steps of its own, alone.
    timing_only = [c for c in calls if "--fla-timing-only" in c]
    assert timing_only == [c for c in calls if c.endswith(("bench_kernels_fla_timing_only.json",
                                                          "bench_training_fla_timing_only.json"))]
    assert len(timing_only) == 2 and "--skip-attention --skip-conv" in timing_only[1]
    assert "--cases polar:3:none:blocks " in timing_only[0]
    assert any(c.endswith("export_teacher.py " + str(out / "teacher-378m")) for c in calls)
    assert ["--distill" in c for c in calls if c.startswith("-m model.bench_loss")] == [False, True]
    assert any(f"--trace-dir {out / 'traces'} --json {out / 'bench_training.json'}" in c for c in calls)
    # Polar's variants at 2K only, so that the first call's time left reaches 8K and 32K
    assert [c for c in calls if c.endswith("bench_kernels.json") and "--variants-up-to 2048 " in c]
    # the headline case beside the ZeRO-3 JSON as written, in the first call: the one-rank changes' baseline
    training = [c for c in calls if c.endswith("bench_training.json")]
    assert len(training) == 1 and "nope:3:none:blocks,polar:3:none:blocks:v1,polar:3:all:blocks," in training[0]
    assert ("--ds-variant zero_optimization.stage3_param_persistence_threshold=10000000,"
            "zero_optimization.reduce_scatter=true,timers.throughput.enabled=true,zero_optimization.leaf_module=") \
        in training[0]
    assert any("--ds-variant zero_optimization.stage3_param_persistence_threshold=100000 " in c for c in calls)
    # the JSON as written first: what the trainer changes on one rank, timed against it
    zero3_settings = [c for c in calls if c.endswith("bench_zero3_settings.json")]
    assert len(zero3_settings) == 1 and ",polar:3:none:blocks:v7 " in zero3_settings[0]
    block_leaves = 'zero_optimization.leaf_module={"classes":["model.modeling.Block"]}'
    assert ("--ds-variant zero_optimization.stage3_param_persistence_threshold=10000000,zero_optimization."
            f"reduce_scatter=true,timers.throughput.enabled=true,{block_leaves} --ds-variant {block_leaves} "
            "--ds-variant zero_optimization.stage3_module_granularity_threshold=1 ") in zero3_settings[0]
    from pretrain import bench

    v1, v2, *_, v6, v7 = bench.parse_args(dry_calls(log)[calls.index(zero3_settings[0])][2:]).ds_variant
    assert v1["zero_optimization.leaf_module"] == v2["zero_optimization.leaf_module"] == {
        "classes": ["model.modeling.Block"]}
    assert v1["timers.throughput.enabled"] is True  # DeepSpeed's throughput timer, as it runs by default
    assert v6 == {"zero_optimization.reduce_scatter": True}  # DeepSpeed's gradient path alone
    assert v7 == {"timers.throughput.enabled": True}  # its throughput timer alone
    # ZeRO-2 as the trainer runs it on one GPU against its JSON as written
    zero2_settings = [c for c in calls if c.endswith("bench_zero2_settings.json")]
    assert len(zero2_settings) == 1 and "--cases polar:2:none:blocks,polar:2:none:blocks:v1 " in zero2_settings[0]
    [as_written] = bench.parse_args(dry_calls(log)[calls.index(zero2_settings[0])][2:]).ds_variant
    assert as_written == {"zero_optimization.contiguous_gradients": True, "zero_optimization.overlap_comm": True}


@pytest.mark.parametrize("summary,fallbacks", [
    ("FAILED tests/test_triton_softcap_ce.py::test_gpu_loss - AssertionError\n"
     "FAILED tests/test_lm_loss.py::test_bf16_on_the_gpu[focus] - AssertionError", {"ATMA_LOSS_ROWS": "torch"}),
    ("FAILED tests/test_triton_gated_delta.py::test_gpu_carry - AssertionError\n"
     "ERROR tests/test_triton_softcap_ce.py::test_gpu_loss - RuntimeError",
     {"ATMA_LOSS_ROWS": "torch", "ATMA_DELTA_TRITON_PROFILE": "small"}),
    ("FAILED tests/test_triton_softcap_ce.py::test_gpu_loss - AssertionError\n"
     "FAILED tests/test_triton_polar.py::test_gpu_bwd - AssertionError", None),
    ("ERROR collecting tests/test_model_gpu.py", None),
    ("FAILED tests/test_pretrain_upload.py::test_gpu_upload - AssertionError", {}),
    ("FAILED tests/test_pretrain_upload.py::test_gpu_upload - AssertionError\n"
     "FAILED tests/test_lm_loss.py::test_bf16_on_the_gpu[focus] - AssertionError", {"ATMA_LOSS_ROWS": "torch"}),
    ("FAILED tests/test_pretrain_upload.py::test_gpu_upload - AssertionError\n"
     "FAILED tests/test_triton_polar.py::test_gpu_bwd - AssertionError", None),
    ("FAILED tests/test_kernels_bench.py::test_polar_time_by_kernel_on_a_gpu - KeyError", {}),
    ("FAILED tests/test_pretrain_profiling.py::test_gpu_device_time_of_a_profile_is_its_kernels - KeyError", {}),
    ("FAILED tests/test_pretrain_throughput.py::test_zero3_on_one_gpu_keeps_parameters_gathered_through_the_step"
     " - AssertionError", {}),
], ids=["loss-rows", "loss-rows-and-carry", "polar-too", "collection-error", "upload", "upload-and-loss-rows",
        "upload-and-polar", "kernel-breakdown", "kernel-kinds", "one-gpu-step"])
def test_failing_gpu_tests_of_a_kernel_with_a_pytorch_path_leave_the_rest_measurable(tmp_path, summary, fallbacks):
    """Failures confined to the loss's rows or the memory's carry: the benchmarks run with that kernel off
    and gpu.txt says so; a failed upload test, the kernel benchmark's own, the profiler's, or one comparing the
    trainer's one-GPU step with DeepSpeed's, leaves the figures right (they show its cost, do not depend on it,
    or time the step as it is); any other failure (or none named) skips every measurement. Exit status 1 either
    way."""
    proc, out, log = dry_gpu_check(tmp_path, DRY_PYTEST_SUMMARY=summary,
                                   GPU_CHECK_STEPS="gpu_tests bench_training bench_loss")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "gpu.txt").read_text()
    measured = [(argv, call_env) for argv, call_env in zip(dry_calls(log), dry_envs(log))
                if argv[:2] in (["-m", "pretrain.bench"], ["-m", "model.bench_loss"])]
    if fallbacks is None:
        assert measured == [] and "no figures are written" in report
        return
    assert len(measured) == 2 and all(call_env.items() >= fallbacks.items() for _, call_env in measured)
    if not fallbacks:
        assert all(call_env == {} for _, call_env in measured)
        failed = summary.split("::")[0].split()[1]
        assert (f"gpu tests failed in {failed}: no kernel's results are in question, so the "
                "figures below are written; they measure the code as it is") in report
        return
    settings = " ".join(sorted(f"{k}={v}" for k, v in fallbacks.items()))
    assert f"the benchmarks below run with {settings} (that kernel on its PyTorch path)" in report


def test_the_gpu_tests_run_side_by_side_where_pytest_xdist_is_installed(tmp_path):
    python = dry_python(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "xdist.py").write_text("")  # stands in for pytest-xdist: only its import is checked
    path = fake_bin(tmp_path, **{"nvidia-smi": "echo 'NVIDIA H200, 143771 MiB'\n"}) + os.pathsep + os.environ["PATH"]

    def pytest_argv(name, **extra):
        log = tmp_path / f"calls-{name}"
        env = dict(os.environ, PYTHON=str(python), DRY_LOG=str(log), GPU_CHECK_STEPS="gpu_tests", PATH=path, **extra)
        proc = subprocess.run(["bash", GPU_CHECK, str(tmp_path / name)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        (argv,) = [a for a in dry_calls(log) if a[:2] == ["-m", "pytest"]]
        return argv[:argv.index("tests/test_triton_polar.py")]  # the options before the test files

    with_xdist = str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")
    assert pytest_argv("xdist", PYTHONPATH=with_xdist)[-2:] == ["-n", "8"]
    assert "-n" not in pytest_argv("plain")
    assert "-n" not in pytest_argv("chosen", PYTHONPATH=with_xdist, GPU_TESTS_ARGS="")
    assert pytest_argv("own", GPU_TESTS_ARGS="-x --maxfail 1")[-3:] == ["-x", "--maxfail", "1"]


def test_a_gpu_check_budget_cuts_each_step_to_what_is_left_and_skips_what_no_longer_fits(tmp_path):
    python = dry_python(tmp_path)
    limits = tmp_path / "limits"
    # `timeout` records the limit it was given (after its options), then runs the command as usual.
    fake_timeout = f'while [[ "$1" == -* ]]; do shift; done\necho "$1" >> {limits}\nshift\nexec "$@"\n'
    path = fake_bin(tmp_path, **{"nvidia-smi": "echo 'NVIDIA H200, 143771 MiB'\n", "timeout": fake_timeout})

    def check(budget, steps):
        env = dict(os.environ, PYTHON=str(python), DRY_LOG=str(tmp_path / "calls"), GPU_CHECK_BUDGET=budget,
                   GPU_CHECK_STEPS=steps, PATH=path + os.pathsep + os.environ["PATH"])
        out = tmp_path / f"out-{budget}"
        proc = subprocess.run(["bash", GPU_CHECK, str(out)], capture_output=True, text=True, env=env, timeout=300)
        return proc, out

    proc, out = check("100", "bench_loss bench_training")  # each limit (240 s, 45 s) cut to the <= 100 s left
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first, second = map(int, limits.read_text().split())
    assert 80 <= first <= 100 and second == 45
    proc, out = check("10", "bench_loss bench_training")  # under 20 s left: nothing starts
    assert proc.returncode == 1
    assert re.findall(r"^step (\w+): not run \(GPU_CHECK_BUDGET=10 s spent", (out / "gpu.txt").read_text(),
                      flags=re.M) == ["bench_training", "bench_loss"]
    assert len(limits.read_text().split()) == 2  # no further step was started
    proc, out = check("ten", "bench_loss")
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip() == "error: GPU_CHECK_BUDGET must be a whole number of seconds, got 'ten'"


@pytest.mark.parametrize("verdict,runs", [("refused", True), ("unknown", True), ("allowed", False), ("absent", False)])
def test_the_fla_timing_only_steps_run_only_where_the_guard_refuses_flas_backward(tmp_path, verdict, runs):
    """Where the guard allows FLA, the training and kernel steps already run its kernels; without FLA there is
    nothing to time: then the two timing-only steps are not run and gpu.txt says why. "unknown" (the query
    failed) runs them, as before."""
    proc, out, log = dry_gpu_check(tmp_path, DRY_FLA_BACKWARD=verdict, GPU_CHECK_STEPS=(
        "bench_training_fla_timing_only bench_kernels_fla_timing_only bench_loss"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "gpu.txt").read_text()
    ran = re.findall(r"^step (\w+): exit 0 after", text, flags=re.M)
    timing = ["bench_training_fla_timing_only", "bench_kernels_fla_timing_only"]
    if runs:
        assert ran == [timing[0], "bench_loss", timing[1]]
    else:
        assert ran == ["bench_loss"]
        assert re.findall(r"^step (\w+): not needed \(flash-linear-attention's backward is " + verdict, text,
                          flags=re.M) == timing
        assert not any("--fla-timing-only" in " ".join(argv) for argv in dry_calls(log))


def test_the_gpu_check_names_a_missing_package_before_writing_anything(tmp_path):
    python = dry_python(tmp_path)
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class Missing(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'omegaconf':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Missing())\n")
    env = dict(os.environ, PYTHON=str(python), DRY_LOG=str(tmp_path / "calls"), PYTHONPATH=str(blocker),
               PATH=fake_bin(tmp_path, **{"nvidia-smi": "echo 'NVIDIA H200, 143771 MiB'\n"}) + os.pathsep
               + os.environ["PATH"])
    out = tmp_path / "out"
    proc = subprocess.run(["bash", GPU_CHECK, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: the steps cannot import what they need with {python} (ModuleNotFoundError: No module named "
        "'omegaconf'); install requirements.txt into that environment")
    assert not out.exists()


# ---------------------------------------------------------------------- two nodes on one machine
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def launch_shards(tmp_path_factory):
    """Tiny shards (seq_len 64, a 512-token BPE) of a generated text corpus."""
    from data_pipeline.prepare import prepare

    base = tmp_path_factory.mktemp("launch-data")
    corpus = base / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    words = "the a of memory token polar gate delta layer train step loss data node rank shard sum".split()
    for i in range(40):
        (corpus / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    out = base / "shards"
    prepare(output=str(out), inputs=[str(corpus)], seq_len=64, vocab_size=512, val_fraction=0.1, progress=False)
    return str(out)


def start(argv, log_path):
    """Start `python -m launch ARGV` from the repository root in its own process group."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1",
               WANDB_MODE="offline")
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "launch", *argv], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs, logs, timeout=300):
    """Wait for every process; on a timeout stop their process groups. Fail with the logs' tails."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            codes.append("timeout")
    if any(code != 0 for code in codes):
        tails = "\n".join(f"--- {log}:\n{open(log).read()[-3000:]}" for log in logs)
        raise AssertionError(f"launch failed with {codes}\n{tails}")


def step_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {row["step"]: row["loss/total"] for row in rows if "loss/total" in row}


@pytest.mark.slow
def test_two_nodes_on_one_machine_match_single_node(launch_shards, tmp_path):
    """Two no-ssh launchers (node ranks 0 and 1, one CPU rank each) = one launcher with two ranks."""
    train = ["--data", launch_shards, "--max-steps", "4", "--resume", "none",
             "--set", "batch.tokens=512", "--set", "batch.micro_batch_size=4", "--set", "checkpoint.every=100",
             "--set", "logging.val_every=0", "--set", "logging.every=1", "--set", "logging.tensorboard=false",
             "--set", "logging.progress=false", "--set", "train.precision=fp32",
             "--set", "deepspeed_config=ds_configs/zero3_bf16.json"]
    single_dir, multi_dir = tmp_path / "single", tmp_path / "two-nodes"
    log = str(tmp_path / "single.log")
    finish([start(["single", "--gpus", "2", "--master-port", str(free_port()), RUN, "--run-dir", str(single_dir),
                   *train], log)], [log])

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    logs = [str(tmp_path / f"node{rank}.log") for rank in (0, 1)]
    procs = [start(["no-ssh", "--hostfile", str(hostfile), "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                    "--master-port", port, RUN, "--run-dir", str(multi_dir), *train], logs[rank]) for rank in (0, 1)]
    finish(procs, logs)

    reference, got = step_losses(single_dir), step_losses(multi_dir)
    assert sorted(reference) == [1, 2, 3, 4] and sorted(got) == [1, 2, 3, 4]
    for step, value in reference.items():
        # Same world size, same ZeRO-3 partitioning, fp32 on the CPU: only launch plumbing differs.
        assert got[step] == pytest.approx(value, rel=1e-6), (step, got, reference)
    with open(logs[1]) as f:
        started = f"[launch] node1 (node_rank 1, rank 1): deepspeed --hostfile {hostfile} --no_ssh --node_rank 1 "
        assert started in f.read()


@pytest.mark.slow
def test_two_runs_at_once_each_report_a_user_error_once(launch_shards, tmp_path):
    """Both launches rendezvous (each on a free port: a fixed 29500 makes the second fail with
    EADDRINUSE) and both ranks of each meet the same config error: it is printed once, by rank 0."""
    bad = ["--data", launch_shards, "--set", "batch.tokens=500", "--set", "logging.progress=false"]
    logs = [str(tmp_path / f"run{i}.log") for i in (0, 1)]
    procs = [start(["single", "--gpus", "2", RUN, "--run-dir", str(tmp_path / f"run{i}"), *bad], logs[i])
             for i in (0, 1)]
    for proc in procs:
        assert proc.wait(timeout=300) == 2
    for log in logs:
        with open(log) as f:
            text = f.read()
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert errors == ["error: batch.tokens=500 is not a multiple of micro_batch_size (4) x seq_len (64) x "
                          "data-parallel ranks (2) = 512"], text[-3000:]
        assert "Traceback" not in text and "EADDRINUSE" not in text and "address already in use" not in text
