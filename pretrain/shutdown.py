"""Ending a process that started a process group, once its work is written.

Gloo runs collectives on worker threads of its own. When Python finalizes with a process group
still referenced (DeepSpeed's engine keeps its groups), one of those threads can drop the last
reference to a finished collective's tensors after the interpreter has begun to shut down; taking
the GIL there ends the thread with a forced unwind and the whole process aborts ("terminate
called without an active exception", exit code -6) after training has finished and saved. The
deepspeed launcher then reports the run as failed and stops the other ranks. Every entry point
that starts a process group therefore ends through `exit_without_teardown` once its files are
closed: nothing is left for the interpreter's teardown to do but free memory. (Tools that act at
the interpreter's exit, such as `python -m cProfile`, get no chance to write; call `main()` from
Python for them.)
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_without_teardown(code: int) -> NoReturn:
    """Flush stdout and stderr, then end the process with `code`, skipping interpreter finalization."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or file: nothing more can reach it anyway
            pass
    os._exit(code)
