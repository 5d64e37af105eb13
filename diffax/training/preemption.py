"""Stop cleanly on SIGTERM or SIGINT: finish the step, save, then exit.

Cloud TPU and GPU jobs are preempted with SIGTERM and a grace period. While
`StopOnSignal` is active, the first SIGTERM or SIGINT (Ctrl-C) only sets a
flag; the trainer checks it between steps, saves a checkpoint with the data
position, waits for it to be committed and raises `Stopped`. A second signal
exits at once (the checkpoints already committed stay intact).

On several hosts the signal may reach only some processes, or reach them at
different steps: `requested()` is an all-gather of the flag, so every process
stops after the same step.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from diffax import parallel

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager: turn the first SIGTERM / SIGINT into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        # The next signal gets the default action from the kernel: it ends the process at once, even
        # while the main thread is busy in native code (a compile, a device wait) and could not run
        # a Python handler.
        for s in SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        print(f"diffax: {signal.Signals(signum).name}: finishing the current step and saving a checkpoint "
              "(send it again to exit at once).", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Whether any process got a signal (the same answer on every process)."""
        return parallel.any_process(self.signum is not None)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another process"

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + (self.signum or signal.SIGTERM)
