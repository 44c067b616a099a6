"""Ctrl-C that is not lost.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives; inside a weakref
callback or a destructor it is printed as "Exception ignored" (a traceback) and dropped, and the run
goes on (seen in the Ctrl-C test). `install()` keeps the default behaviour, remembers the request and
keeps such a dropped one quiet; `check()`, called at every scheduler step, raises it again.
"""

from __future__ import annotations

import signal
import sys
import threading

_requested = threading.Event()


def _on_sigint(signum, frame):
    _requested.set()
    raise KeyboardInterrupt


_previous_hook = sys.unraisablehook


def _unraisable(report):
    if report.exc_type is KeyboardInterrupt:  # dropped, not lost: `check()` raises it again
        _requested.set()
        return
    _previous_hook(report)


def install() -> None:
    """In the main thread, before the work starts."""
    global _previous_hook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
        if sys.unraisablehook is not _unraisable:
            _previous_hook = sys.unraisablehook
            sys.unraisablehook = _unraisable


def check() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt
