"""Ctrl-C that is never lost.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be; when that is inside a finalizer
(``__del__`` of some library object during garbage collection) the exception is printed as "ignored" and the run
goes on. The handler here also records the request, so long loops (batch jobs) stop at their next checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

_requested = threading.Event()


def _on_sigint(signum: int, frame: object) -> None:
    _requested.set()
    raise KeyboardInterrupt


@contextlib.contextmanager
def catching_interrupts() -> Iterator[None]:
    """Record Ctrl-C while the block runs (only where Ctrl-C is on: an ignored SIGINT stays ignored)."""
    if threading.current_thread() is not threading.main_thread() or (
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    _requested.clear()
    hook = sys.unraisablehook

    def quiet_swallowed_interrupt(unraisable: sys.UnraisableHookArgs) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):  # the interrupt is recorded, not a trace
            hook(unraisable)

    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = quiet_swallowed_interrupt
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = hook
        _requested.clear()


def stop_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C came and was swallowed somewhere since the block began."""
    if _requested.is_set():
        raise KeyboardInterrupt
