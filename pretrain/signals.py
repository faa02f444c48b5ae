"""Stop requests from signals: Ctrl-C (SIGINT), SIGTERM and SIGUSR1 end training at the next step
boundary with a checkpoint; a second Ctrl-C, or one before training has started, stops at once."""

from __future__ import annotations

import os
import signal

# 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C, so `train && export` stops too.
INTERRUPTED_EXIT_CODE = 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    """Records the first stop signal; printing is left to rank 0.

    Before `watch_training()` only SIGINT is handled, and it exits at once (there is nothing to
    save yet); SIGTERM keeps its default action there. Once training runs, the first signal of
    any kind asks the loop to save and stop after the current step, and a second SIGINT exits at
    once without saving (the newest complete checkpoint stays valid: an unfinished save has no
    completion marker).
    """

    def __init__(self, *, rank: int):
        self.rank = rank
        self.signal_name: str | None = None
        self.interrupts = 0
        self.training = False

    @property
    def requested(self) -> bool:
        """Whether some signal asked training to stop."""
        return self.signal_name is not None

    @property
    def interrupted(self) -> bool:
        """Whether the stop came from Ctrl-C (the exit code is then INTERRUPTED_EXIT_CODE)."""
        return self.interrupts > 0

    def watch_startup(self) -> None:
        """Handle Ctrl-C during start-up (config, data, engine, checkpoint loading): exit at once."""
        signal.signal(signal.SIGINT, self._on_signal)

    def watch_training(self) -> None:
        """From now on every stop signal is a request to checkpoint and stop at the step boundary."""
        self.training = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if not self.training:
                self._exit_now("[atma] Ctrl-C before training started: stopped; nothing to save yet")
            if self.interrupts > 1:
                self._exit_now("[atma] Ctrl-C again: stopped at once without saving; "
                               "the newest complete checkpoint is kept")
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            if signum == signal.SIGINT:
                self._say("[atma] Ctrl-C: saving a checkpoint when this step ends, then stopping "
                          "(Ctrl-C again stops at once, without saving)")

    def _say(self, line: str) -> None:
        # os.write, not print: a handler that prints while the main thread is inside print on the
        # same stream raises "reentrant call".
        if self.rank == 0:
            prefix = "\n" if os.isatty(2) else ""
            os.write(2, f"{prefix}{line}\n".encode())

    def _exit_now(self, line: str) -> None:
        self._say(line)
        os._exit(INTERRUPTED_EXIT_CODE)
