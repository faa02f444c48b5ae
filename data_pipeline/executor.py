"""An order-preserving, bounded parallel map over worker processes."""

from __future__ import annotations

import multiprocessing
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor

# Chunks submitted ahead per worker: enough to keep workers busy, little enough to bound memory.
_IN_FLIGHT_PER_WORKER = 4


def ordered_map(fn: Callable, items: Iterable, *, workers: int, initializer: Callable,
                initargs: tuple) -> Iterator:
    """Yield ``fn(item)`` for each item, in input order, computed by ``workers`` processes.

    With one worker everything runs in this process. The input is consumed lazily: at most a
    few items per worker are in flight, however long the input.
    """
    if workers == 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_start_worker,
                               initargs=(initializer, initargs))
    pending = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _context():
    # Forking starts workers at once and, unlike spawning, does not re-run the caller's main
    # script, so prepare() works from a script without an ``if __name__ == "__main__"`` guard.
    # Workers use no threads inherited from this process (tokenizers runs serially in them).
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def _start_worker(initializer: Callable, initargs: tuple) -> None:
    # Ctrl-C goes to the whole process group; the main process handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    initializer(*initargs)
