"""Count the times the host waits for the GPU, step by step, with the Python line that made it wait.

A wait stops the host from queuing more work, so the device idles once the queue drains. Two sources
are watched while a `HostSyncCounter` is active:

- torch's CUDA sync debug mode (`torch.cuda.set_sync_debug_mode("warn")`), which warns at every ATen
  operation that waits for the device: `.item()`, `.tolist()`, `.cpu()`, `nonzero`, a copy to pageable
  host memory, `Stream.synchronize()`. The warning names the Python line that called the operation
  (for a wait inside the autograd engine, the line that started the backward).
- `torch.cuda.synchronize()` and `torch.cuda.Event.synchronize()`, which that mode does not report.

Not seen: waits inside collectives (a NCCL barrier) and those a C++ extension makes by itself.
Off CUDA there is no device to wait for, and `count_host_syncs` runs nothing.
"""

from __future__ import annotations

import collections
import os
import sys
import warnings
from typing import Callable

import torch

__all__ = ["SYNC_WARNING", "HostSyncCounter", "count_host_syncs", "host_sync_text", "site_of"]

SYNC_WARNING = "called a synchronizing CUDA operation"
"""How torch's warning in sync debug mode ("warn") begins."""

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def site_of(filename: str, lineno: int) -> str:
    """'path:line' of a source line, relative to this repository or to its site-packages folder."""
    path = os.path.abspath(filename)
    if path.startswith(_ROOT):
        path = path[len(_ROOT):]
    elif "site-packages" + os.sep in path:
        path = path.split("site-packages" + os.sep, 1)[1]
    return f"{path}:{lineno}"


class HostSyncCounter:
    """While active (a context manager), counts each host wait for the device by site, per step (`new_step`)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.steps: list[collections.Counter] = []
        self._log: list[warnings.WarningMessage] = []
        self._others: list[warnings.WarningMessage] = []  # shown as usual when the counter stops
        self._catcher = None
        self._restore: list[tuple[object, str, object]] = []
        self._debug_mode = None

    def new_step(self) -> None:
        """Start counting a new step; waits before the first call go to no step."""
        self._drain()
        self.steps.append(collections.Counter())

    @property
    def per_step(self) -> list[int]:
        """The number of waits in each step so far."""
        self._drain()
        return [sum(step.values()) for step in self.steps]

    def sites(self) -> list[tuple[str, int]]:
        """(site, waits over all steps), most first."""
        self._drain()
        total = collections.Counter()
        for step in self.steps:
            total.update(step)
        return total.most_common()

    def _record(self, site: str) -> None:
        if self.steps:
            self.steps[-1][site] += 1

    def _drain(self) -> None:
        """Move the sync warnings caught so far into the current step, and keep every other warning to show."""
        caught = len(self._log)  # other threads (the autograd engine's) may append meanwhile
        for w in self._log[:caught]:
            # torch appends where in its C++ the wait is: " (Triggered internally at <file>:<line>.)"
            if str(w.message).startswith(SYNC_WARNING):
                self._record(site_of(w.filename, w.lineno))
            else:
                self._others.append(w)
        del self._log[:caught]

    def _wrap(self, owner, name: str) -> None:
        original = getattr(owner, name)
        counter = self

        def waits(*args, **kwargs):
            caller = sys._getframe(1)
            counter._record(site_of(caller.f_code.co_filename, caller.f_lineno))
            return original(*args, **kwargs)

        self._restore.append((owner, name, original))
        setattr(owner, name, waits)

    def __enter__(self) -> "HostSyncCounter":
        self._catcher = warnings.catch_warnings(record=True)
        self._log = self._catcher.__enter__()
        warnings.filterwarnings("always", message=SYNC_WARNING)
        self._wrap(torch.cuda, "synchronize")
        self._wrap(torch.cuda.Event, "synchronize")
        if self.device.type == "cuda" and torch.cuda.is_available():
            self._debug_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self._debug_mode is not None:
            torch.cuda.set_sync_debug_mode(self._debug_mode)
            self._debug_mode = None
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()
        self._drain()
        self._catcher.__exit__(*exc)
        self._catcher = None
        for w in self._others:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
        self._others.clear()


def count_host_syncs(run_step: Callable[[], object], steps: int, device: torch.device) -> dict | None:
    """Run `run_step` `steps` times under a `HostSyncCounter`, the device synchronised before and after.

    Returns {"host_syncs_per_step": the most in any step, "host_syncs_all": per step, "host_sync_sites":
    [{"site", "per_step"}], most first}; None off CUDA or for no steps.
    """
    device = torch.device(device)
    if device.type != "cuda" or steps <= 0:
        return None
    torch.cuda.synchronize(device)
    with HostSyncCounter(device) as counter:
        for _ in range(steps):
            counter.new_step()
            run_step()
    torch.cuda.synchronize(device)
    per_step = counter.per_step
    return {"host_syncs_per_step": max(per_step), "host_syncs_all": per_step,
            "host_sync_sites": [{"site": site, "per_step": n / steps} for site, n in counter.sites()]}


def host_sync_text(found: dict, limit: int = 4) -> str:
    """One line for a report: the waits per step and where the most came from."""
    sites = ", ".join(f"{s['site']} x{s['per_step']:g}" for s in found["host_sync_sites"][:limit])
    more = len(found["host_sync_sites"]) - limit
    return f"{found['host_syncs_per_step']} per step" + (f" ({sites}{f', {more} more' if more > 0 else ''})"
                                                          if sites else "")
