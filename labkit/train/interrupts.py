"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM (a scheduler's "time's up").

A signal in the middle of an optimizer step would leave the model half-updated; instead,
:class:`StopRequests` turns the first SIGINT/SIGTERM into a request that the Trainer honours at
the next step boundary (it saves a checkpoint there and raises :class:`TrainingInterrupted`).
A second signal does what Ctrl-C normally does, at once: ``KeyboardInterrupt``. Handlers are
installed only in the main thread (Python delivers signals there) and restored on exit.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType

HANDLED = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells do


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a step boundary after SIGINT/SIGTERM.

    ``step``: the optimizer steps done; ``checkpoint``: the file saved there (None without a
    ``checkpoint_dir``); ``signal_name``: "SIGINT" or "SIGTERM". A ``KeyboardInterrupt``, so
    code that stops on Ctrl-C (Jupyter included) stops on it too.
    """

    def __init__(self, step: int, checkpoint: Path | None, signum: int) -> None:
        self.step, self.checkpoint = step, checkpoint
        self.signal_name = signal.Signals(signum).name
        self.exit_code = EXIT_CODES.get(signum, 1)
        saved = f"; saved {checkpoint}" if checkpoint is not None else ""
        super().__init__(f"{self.signal_name}: stopped after step {step}{saved}")


class StopRequests:
    """Context manager: while active, the first SIGINT/SIGTERM sets :attr:`signum` (read it at
    a safe point), the second raises ``KeyboardInterrupt`` immediately.

    ``announce(signum)`` returns a line printed to stderr at the first signal, e.g. "stopping
    after this step; press Ctrl-C again to stop at once". Disabled (does nothing) when
    ``enabled`` is False or outside the main thread.
    """

    def __init__(self, enabled: bool = True, announce=None) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: stop now
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce is not None:
            os.write(2, (self.announce(signum) + "\n").encode())  # safe inside a handler

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopRequests:
        if self.enabled:
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()
