"""Process exit: the entry points that start a process group end without the interpreter's teardown,
and nothing they printed is lost on the way out."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXITS_WITHOUT_TEARDOWN = r"""
import atexit, sys
from pretrain.shutdown import exit_without_teardown
atexit.register(lambda: print(" | teardown ran", flush=True))
print("written before the exit", end="")   # block-buffered on a pipe: only a flush sends it
sys.stderr.write("no newline on stderr")   # line-buffered: without a newline it waits for a flush
exit_without_teardown(3)
"""

# Runs an entry point as `python -m` does, with a teardown hook that says whether it ran.
RUN_WITH_TEARDOWN_HOOK = r"""
import atexit, runpy, sys
atexit.register(lambda: print("teardown ran", flush=True))
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run(args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("PYTHONUNBUFFERED", None)  # the buffering a user's process has
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_exit_without_teardown_keeps_what_was_printed_and_skips_the_teardown():
    proc = run(["-c", EXITS_WITHOUT_TEARDOWN])
    assert proc.returncode == 3
    assert proc.stdout == "written before the exit"
    assert proc.stderr == "no newline on stderr"


@pytest.mark.parametrize("entry_point", [
    # a config error: main() returns 2
    ["pretrain.train", "--set", "optim.lr=-1"],
    # a preset too large for the CPU: main() returns 2 before anything is built
    ["pretrain.bench", "--preset", "atma-378m", "--device", "cpu"],
])
def test_the_entry_points_that_start_a_process_group_end_without_the_teardown(entry_point):
    proc = run(["-c", RUN_WITH_TEARDOWN_HOOK, *entry_point])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("error: "), proc.stderr[-2000:]
    assert "teardown ran" not in proc.stdout
