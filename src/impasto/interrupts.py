"""Ctrl-C and SIGTERM at safe points.

An interrupt that arrives while an optimizer step or a save is under way is held until that ends, then
raised: a run never keeps a half-updated optimizer state (its resume would not be the same run), and a
second Ctrl-C cannot cost the image and state the first one asked to save. The `impasto` command turns
SIGTERM into the same interrupt while it runs (`terminate_as_interrupt`), so `kill` and schedulers keep the result too.
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


@contextmanager
def held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends, then raise the last one (outside the main thread,
    where Python delivers no signals, this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        raise Terminated if caught[-1] == signal.SIGTERM else KeyboardInterrupt
