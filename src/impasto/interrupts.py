"""Ctrl-C and SIGTERM at safe points.

An interrupt that arrives while an optimizer step or a save is under way is held until that ends, then
raised: a run never keeps a half-updated optimizer state (its resume would not be the same run), and a
second Ctrl-C cannot cost the image and state the first one asked to save. The `impasto` command turns
SIGTERM into the same interrupt while it runs (`terminate_as_interrupt`), so `kill` and schedulers keep the
result too. Signals whose handling raises nothing here (ignored, the default SIGTERM, a caller's own handler)
are left alone.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises `Terminated` (a KeyboardInterrupt) in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_RAISING = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
_holding = False


@contextmanager
def held() -> Iterator[None]:
    """Hold Ctrl-C (and SIGTERM under `terminate_as_interrupt`) until the block ends, then raise the last
    one. Nested blocks hold for the outermost; outside the main thread, where Python delivers no signals,
    this does nothing."""
    global _holding
    if _holding or threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[signal.Signals] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signal.Signals(signum)))
                for s, raising in _RAISING.items() if signal.getsignal(s) is raising}
    _holding = True
    try:
        yield
    finally:
        _holding = False
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        _RAISING[caught[-1]](caught[-1], None)  # what the signal would have done: raise
