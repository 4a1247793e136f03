"""SIGINT / SIGTERM during training: finish the current step, checkpoint, stop.

A training step cut in half cannot be checkpointed, so the handler only raises a flag that the
loop polls at each step boundary. A second signal gets the default behaviour back (Ctrl-C twice
still kills a stuck run at once).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Callable as `should_stop()`; remembers which signal asked for the stop."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or 0)  # the shell's convention for "killed by signal N"


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """Install the flag-raising handlers for the duration of the block (main thread only: Python
    delivers signals there; elsewhere the flag simply never rises)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    # getsignal() is None for a handler installed outside Python; SIG_DFL is the safe stand-in
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in SIGNALS}

    def handler(signum: int, frame: object) -> None:
        flag.signum = signum
        for s, old in previous.items():  # the next signal acts as it did before this block
            signal.signal(s, old)

    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
