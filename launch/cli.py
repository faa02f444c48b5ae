"""`python -m launch MODE ...`: print (--dry-run) or run the deepspeed command for one way of launching."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Mapping, Sequence

from .commands import (
    DEFAULT_MASTER_PORT, ENV_FILE, ENV_NAMES, ENV_PREFIXES, MIN_NO_SSH_VERSION, LaunchError, check_node_rank,
    check_run_config, deepspeed_version_ok, env_file_entries, free_port, local_device_args, no_ssh_command,
    node_label, parse_hostfile, pdsh_command, single_node_command, write_env_file,
)
from .supervise import run as run_supervised

_SECRET_MARKERS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
# Options of this CLI; none of them is an option of pretrain/train.py.
_LAUNCHER_OPTIONS = frozenset({"--gpus", "--master-port", "--hostfile", "--master-addr", "--no-env-file",
                               "--node-rank", "--deepspeed-arg", "--dry-run"})

_OVERVIEW = """\
Start ATMA pretraining (pretrain/train.py) with DeepSpeed's launcher, in one of three modes:

  single   one machine, all its GPUs (or CPU ranks where there is none):
             deepspeed --num_gpus N pretrain/train.py --config RUN.yaml ...
  pdsh     several machines from one launch host, over pdsh/ssh; writes .deepspeed_env:
             deepspeed --hostfile H --master_addr A --master_port P --launcher pdsh pretrain/train.py ...
  no-ssh   several machines, each starting its own part (Kubernetes, SLURM, any scheduler):
             deepspeed --hostfile H --no_ssh --node_rank N --master_addr A --master_port P pretrain/train.py ...

Launcher options go before RUN.yaml; everything after RUN.yaml is passed to pretrain/train.py
(--data DIR, --run-dir DIR, --max-steps N, --resume auto|none|PATH, --set KEY=VALUE).
--dry-run prints the exact command of every node, one line each, prefixed by the node, and runs
nothing. Without it the command runs and its exit code is the launcher's; on one machine Ctrl-C
makes every rank save a checkpoint at the end of its step and the exit code is 130 (a second
Ctrl-C stops at once). Without --master-port, one machine uses a free port.
Bad input (missing run config or hostfile, malformed hostfile, node rank out of range) exits 2.
Run `python -m launch MODE --help` for the options of a mode.
"""

_EXAMPLES = {
    "single": """\
GPUs: --gpus N, else $NUM_GPUS, else every GPU in CUDA_VISIBLE_DEVICES (passed on as
--include localhost:I,J, because DeepSpeed drops CUDA_VISIBLE_DEVICES when given --num_gpus),
else every GPU that nvidia-smi lists; on a machine without GPUs, 2 CPU ranks (gloo).

examples:
  python -m launch single pretrain/configs/atma-378m.yaml --data shards/
  python -m launch single --gpus 2 --dry-run pretrain/configs/tiny-cpu.yaml --data shards/
""",
    "pdsh": f"""\
The hostfile has one `HOST slots=N` line per machine (N = GPUs used there); see
launch/hostfile.example. Every host must reach the others over passwordless ssh and see this
repository at the same path. Before launching, ./{ENV_FILE} is (re)written with the current values of
{", ".join(p + "*" for p in ENV_PREFIXES)} and {", ".join(ENV_NAMES)} (those that are set);
DeepSpeed exports each line on every node. The dry run prints it (secrets masked) and writes nothing.
$DS_ENV_FILE, if set, names the file instead, as it does for DeepSpeed.

examples:
  python -m launch pdsh --hostfile hostfile pretrain/configs/atma-378m.yaml --data /shared/shards
  python -m launch pdsh --hostfile hostfile --dry-run pretrain/configs/atma-378m.yaml --data /shared/shards
""",
    "no-ssh": """\
Run the same command on every host of the hostfile, each with its own --node-rank (its line in
the hostfile, from 0). The dry run without --node-rank prints every node's command.
Needs DeepSpeed >= 0.14.5.

examples:
  python -m launch no-ssh --hostfile hostfile --node-rank 0 pretrain/configs/atma-378m.yaml --data /shared/shards
  NODE_RANK=1 MASTER_ADDR=10.0.0.1 python -m launch no-ssh --hostfile hostfile pretrain/configs/atma-378m.yaml ...
  python -m launch no-ssh --hostfile hostfile --dry-run pretrain/configs/atma-378m.yaml --data /shared/shards
""",
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit with code 2."""

    def error(self, message):
        """Print `PROG: error: MESSAGE` on one line and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@dataclass
class LaunchPlan:
    """What a mode resolved to: the lines a dry run prints and the command (if any) to run."""

    lines: list[str]
    label: str = ""
    command: list[str] | None = None
    # Run as a child in its own session (Ctrl-C becomes a checkpoint) instead of replacing this process.
    supervised: bool = False
    env_file: str | None = None
    env_entries: list[tuple[str, str]] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)
    needs_no_ssh: bool = False
    warnings: list[str] = field(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m launch` argument parser with one subcommand per mode."""
    parser = _Parser(prog="python -m launch", description=_OVERVIEW,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    helps = {"single": "one machine: every local GPU, or CPU ranks",
             "pdsh": "several machines from this host over pdsh/ssh (writes .deepspeed_env)",
             "no-ssh": "several machines, each running its own launcher (Kubernetes, SLURM, ...)"}
    for mode, text in helps.items():
        sub = modes.add_parser(mode, help=text, description=text, epilog=_EXAMPLES[mode],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        if mode == "single":
            sub.add_argument("--gpus", type=int, default=None, metavar="N",
                             help="ranks to start (default: $NUM_GPUS, else all visible GPUs, else 2 CPU ranks)")
            sub.add_argument("--master-port", type=tcp_port, default=None, metavar="P",
                             help="rendezvous port (default: a free one, so that runs can share a machine)")
        else:
            sub.add_argument("--hostfile", required=True, metavar="H",
                             help="DeepSpeed hostfile: one `HOST slots=N` line per machine")
            sub.add_argument("--master-addr", default=None, metavar="A",
                             help="address of node_rank 0 (default: $MASTER_ADDR, else the first host of H)")
            sub.add_argument("--master-port", type=tcp_port, default=None, metavar="P",
                             help=f"rendezvous port (default: $MASTER_PORT, else {DEFAULT_MASTER_PORT})")
        if mode == "pdsh":
            sub.add_argument("--no-env-file", action="store_true",
                             help=f"leave ./{ENV_FILE} alone instead of rewriting it from the environment")
        if mode == "no-ssh":
            sub.add_argument("--node-rank", type=int, default=None, metavar="N",
                             help="this machine's line in H, from 0 (default: $NODE_RANK; "
                                  "required unless --dry-run, which then prints every node)")
        sub.add_argument("--deepspeed-arg", action="append", default=[], metavar="ARG",
                         help="extra argument for the deepspeed launcher, repeatable; write it with `=`, "
                              "e.g. --deepspeed-arg=--ssh_port=2222")
        sub.add_argument("--dry-run", action="store_true",
                         help="print the exact command of every node (one line each) and run nothing")
        sub.add_argument("run_config", metavar="RUN.yaml", help="run config (e.g. pretrain/configs/tiny-cpu.yaml)")
        sub.add_argument("train_args", nargs=argparse.REMAINDER, metavar="TRAIN_ARGS",
                         help="passed to pretrain/train.py: --data DIR --run-dir DIR --max-steps N --set KEY=VALUE ...")
    return parser


def tcp_port(text: str) -> int:
    """An argparse type: a TCP port number, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"${name}={value!r} is not an integer") from None


def _check_train_args(train_args: Sequence[str]) -> None:
    """Refuse launcher options written after RUN.yaml, where they would reach train.py instead."""
    for arg in train_args:
        if arg.split("=", 1)[0] in _LAUNCHER_OPTIONS:
            raise LaunchError(f"launcher option {arg} must come before RUN.yaml")
    if any(arg == "--config" or arg.startswith("--config=") for arg in train_args):
        raise LaunchError("give the run config as RUN.yaml, not as --config")


def _shown(key: str, value: str) -> str:
    """A .deepspeed_env line for printing, with tokens and keys masked."""
    return f"{key}=***" if any(m in key.upper() for m in _SECRET_MARKERS) else f"{key}={value}"


def plan_launch(args: argparse.Namespace, environ: Mapping[str, str]) -> LaunchPlan:
    """Resolve parsed arguments and the environment into a LaunchPlan; raise LaunchError on bad input."""
    check_run_config(args.run_config)
    if args.mode == "single":
        requested = args.gpus if args.gpus is not None else _env_int(environ, "NUM_GPUS")
        port = args.master_port if args.master_port is not None else free_port()
        cmd = single_node_command(args.run_config, args.train_args, device_args=local_device_args(requested, environ),
                                  master_port=port, deepspeed_args=args.deepspeed_arg)
        return LaunchPlan([f"localhost: {shlex.join(cmd)}"], label="localhost", command=cmd, needs=["deepspeed"],
                          supervised=True)

    hosts = parse_hostfile(args.hostfile)
    master_addr = args.master_addr or environ.get("MASTER_ADDR") or hosts[0].name
    master_port = args.master_port if args.master_port is not None else _env_int(environ, "MASTER_PORT")
    master_port = DEFAULT_MASTER_PORT if master_port is None else master_port
    if not 1 <= master_port <= 65535:
        raise LaunchError(f"$MASTER_PORT={master_port} is not a TCP port (1-65535)")
    common = dict(hostfile=args.hostfile, master_addr=master_addr, master_port=master_port,
                  deepspeed_args=args.deepspeed_arg)

    if args.mode == "pdsh":
        cmd = pdsh_command(args.run_config, args.train_args, **common)
        lines = [f"launch host: {shlex.join(cmd)}"]
        lines += [f"{node_label(hosts, i)}: started by the launch host over pdsh/ssh" for i in range(len(hosts))]
        plan = LaunchPlan(lines, label="launch host", command=cmd, needs=["deepspeed", "pdsh"])
        if args.no_env_file:
            lines.append(f"{ENV_FILE}: left as is (--no-env-file)")
            return plan
        # DeepSpeed looks for this name in the working directory (and in the home directory).
        name = environ.get("DS_ENV_FILE", ENV_FILE)
        plan.env_file = os.path.join(".", name)
        plan.env_entries, skipped = env_file_entries(environ)
        plan.warnings += [f"{key} is not written to {name}: its value spans lines" for key in skipped]
        lines += [f"{name}: {_shown(k, v)}" for k, v in plan.env_entries] or [f"{name}: (no variables to export)"]
        return plan

    node_rank = args.node_rank if args.node_rank is not None else _env_int(environ, "NODE_RANK")
    if node_rank is not None:
        check_node_rank(node_rank, hosts, args.hostfile)
    elif not args.dry_run:
        raise LaunchError("no-ssh needs --node-rank N (or $NODE_RANK): this machine's line in the hostfile, from 0")
    ranks = range(len(hosts)) if node_rank is None else [node_rank]
    commands = {i: no_ssh_command(args.run_config, args.train_args, node_rank=i, **common) for i in ranks}
    lines = [f"{node_label(hosts, i)}: {shlex.join(cmd)}" for i, cmd in commands.items()]
    if node_rank is None:
        return LaunchPlan(lines)
    return LaunchPlan(lines, label=node_label(hosts, node_rank), command=commands[node_rank],
                      needs=["deepspeed"], needs_no_ssh=True)


def _check_needs(plan: LaunchPlan) -> None:
    """Raise LaunchError when a program or the DeepSpeed version the plan needs is missing."""
    for program in plan.needs:
        if shutil.which(program) is None:
            raise LaunchError(f"`{program}` is not on PATH")
    if plan.needs_no_ssh:
        try:
            version = metadata.version("deepspeed")
        except metadata.PackageNotFoundError:
            raise LaunchError("DeepSpeed is not installed in this Python") from None
        if not deepspeed_version_ok(version):
            wanted = ".".join(map(str, MIN_NO_SSH_VERSION))
            raise LaunchError(f"--no_ssh needs DeepSpeed >= {wanted}, found {version}")


def execute(plan: LaunchPlan) -> int:
    """Write .deepspeed_env if the plan has one, then run the launcher.

    A supervised plan (one machine) runs it as a child and returns its exit code (launch/supervise.py:
    Ctrl-C saves a checkpoint); the other plans replace this process with it.
    """
    _check_needs(plan)
    if plan.env_file is not None:
        write_env_file(plan.env_file, plan.env_entries)
        print(f"[launch] wrote {plan.env_file} ({len(plan.env_entries)} variables)", file=sys.stderr)
    print(f"[launch] {plan.label}: {shlex.join(plan.command)}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if plan.supervised:
        return run_supervised(plan.command)
    os.execvp(plan.command[0], plan.command)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then print the plan (--dry-run) or run it; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_train_args(args.train_args)
        plan = plan_launch(args, os.environ)
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.dry_run:
            print("\n".join(plan.lines), flush=True)
            return 0
        return execute(plan)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
