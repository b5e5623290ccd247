"""Stop signals as Ctrl-C: every program of the project (a peer, a host of peers, the launcher, localnet, the
benchmarks) leaves the same way whether it is stopped by Ctrl-C, `docker stop`, `./up.sh down` or a launcher's
shutdown: through its own `except KeyboardInterrupt` clean-up.

    with StopSignals():                 # SIGTERM raises Stopped (a KeyboardInterrupt) in the main thread
        ...
    with StopSignals(signal.SIGTERM, signal.SIGHUP) as stops:
        try:
            ...
        except KeyboardInterrupt as stop:
            stops.shield()              # the clean-up must not be cut short by a second signal
            ...
            return exit_status(stop)    # 128 + the signal's number (130 for a Ctrl-C)

SIGINT is left to Python (it raises KeyboardInterrupt already, unless the process was started with it ignored, as a
background job is: then it stays ignored). Standard library only: the launcher runs on a bare python3.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

CTRL_C_STATUS = 128 + signal.SIGINT


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by a stop signal the program asked for (StopSignals)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def status(self) -> int:
        """The exit status of a program stopped by this signal, as a shell reports one killed by it."""
        return 128 + self.signum


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal that stopped the program: Stopped's own, or SIGINT's for Python's Ctrl-C."""
    return interrupt.status if isinstance(interrupt, Stopped) else CTRL_C_STATUS


class StopSignals:
    """While entered, each of `signums` (default SIGTERM) raises Stopped in the main thread; on exit the handlers
    before are back. Off the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self, *signums: int):
        self.signums = signums or (signal.SIGTERM,)
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                self._saved[signum] = signal.signal(signum, _raise_stopped)
        return self

    def shield(self) -> None:
        """Ignore the stop signals and Ctrl-C from now on (until exit): a clean-up under way must not be cut short,
        and a second Ctrl-C must not leave processes or containers behind."""
        if threading.current_thread() is threading.main_thread():
            for signum in {*self.signums, signal.SIGINT}:
                previous = signal.signal(signum, signal.SIG_IGN)
                self._saved.setdefault(signum, previous)

    def __exit__(self, *exc) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._saved = {}


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)
