"""Run DeepSpeed's launcher as a child so that Ctrl-C becomes a checkpoint, not four tracebacks.

A terminal sends Ctrl-C to its whole foreground process group. DeepSpeed's runner would then die
with a KeyboardInterrupt traceback, and its per-node launcher would SIGTERM every rank and
SIGKILL them 30 s later. So the launcher tree runs in a session of its own, which a terminal's
Ctrl-C does not reach, and this process hands the first Ctrl-C to the training ranks alone: each
finishes its step, saves a checkpoint and exits with code 130, which the launchers pass back. A
second Ctrl-C (or a first one before any rank has started) kills the whole tree at once, and then
removes the op build locks that were not there at the start (a rank killed while it built a DeepSpeed
op leaves one, and every later load of that op would wait on it forever). SIGTERM is handed on the
same way (the ranks save and exit with code 0); SIGHUP (the terminal closed) goes to the whole tree,
as it would without the separate session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Mapping, Sequence

import psutil

from pretrain.opbuild import build_locks, remove_build_locks_made_after
from pretrain.signals import INTERRUPTED_EXIT_CODE


def training_ranks(runner_pid: int) -> list:
    """The training processes under DeepSpeed's runner: the children of its per-node launcher."""
    try:
        return [rank for launcher in psutil.Process(runner_pid).children() for rank in launcher.children()]
    except psutil.Error:
        return []


def run(command: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None) -> int:
    """Run `command` (a deepspeed launcher command) in its own session; return its exit code.

    The exit code is 130 when Ctrl-C stopped the run (whether the ranks saved or were killed),
    else the launcher's own (a negative signal number N becomes 128 + N, as in a shell).
    """
    locks_before = build_locks(os.environ if env is None else env)
    proc = subprocess.Popen(list(command), env=None if env is None else dict(env), cwd=cwd, start_new_session=True)
    interrupts = 0
    killed = False

    def kill_tree(message: str) -> None:
        nonlocal killed
        print(message, file=sys.stderr, flush=True)
        killed = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def hand_on(signum, frame) -> None:
        nonlocal interrupts
        if signum == signal.SIGHUP:
            # The terminal closed: what it would have done to a job in its own session.
            os.killpg(proc.pid, signal.SIGHUP)
            return
        ranks = training_ranks(proc.pid)
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                return kill_tree("[launch] Ctrl-C again: stopped every rank at once, without saving; "
                                 "the newest complete checkpoint is kept")
            if not ranks:
                return kill_tree("[launch] Ctrl-C before training started: stopped")
        for rank in ranks:
            try:
                rank.send_signal(signum)
            except psutil.Error:  # a rank that has just exited
                pass

    previous = {sig: signal.signal(sig, hand_on) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if killed:
        # A rank killed while it built a DeepSpeed op leaves the build's lock; the next run would wait on it.
        for lock in remove_build_locks_made_after(locks_before, os.environ if env is None else env):
            print(f"[launch] removed {lock}, left by an op build that was stopped", file=sys.stderr, flush=True)
    if interrupts:
        return INTERRUPTED_EXIT_CODE
    return 128 - code if code < 0 else code
