"""SIGTERM as an exception, and the few steps that a signal must not split.

systemd, Docker, Kubernetes and Slurm stop a process with SIGTERM. Python's default is
to die on the spot, skipping every `finally`: a staging folder stays behind, a worker
pool outlives us. `signals_as_exceptions()` (the CLI holds it for a whole command)
makes SIGTERM raise `Terminated` in the main thread instead, as Ctrl-C raises
`KeyboardInterrupt`, so context managers unwind: staged folders are removed, pools are
terminated, and the CLI exits 143 with one line. `train` replaces both handlers while
its loop runs (a first signal finishes the step and checkpoints; train.py).

The few steps that must not be split, such as the two renames that swap a folder into
place, run inside `uninterrupted()`: a Ctrl-C or SIGTERM arriving there is raised as
soon as the step is done. This module owns no policy beyond that; it does not print.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Terminated(BaseException):  # noqa: N818 - named like KeyboardInterrupt, its twin
    """SIGTERM reached the main thread. A BaseException, like KeyboardInterrupt, so that
    `except Exception` does not swallow it; `str()` may add what was saved on the way out
    (`checkpoint saved at runs/r/step-0000012`)."""


_owner_pid: int | None = None  # the process that installed the handlers
_depth = 0  # how deep the main thread is in `uninterrupted()` sections
_pending: BaseException | None = None


def raise_when_safe(exc: BaseException) -> None:
    """Raise `exc` now, or when the current `uninterrupted()` section ends."""
    global _pending
    if _depth > 0:
        _pending = _pending or exc
        return
    raise exc


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Let the body finish before a Ctrl-C or SIGTERM that arrives during it is raised.

    Only for short steps that leave things inconsistent when split (two renames).
    Python runs signal handlers in the main thread only, so elsewhere this does nothing.
    """
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            exc, _pending = _pending, None
            raise exc


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _owner_pid:
        # A worker forked from us inherited this handler: behave as it would without
        # it (Pool.terminate() must end it, not make it unwind our code in its copy).
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise_when_safe(KeyboardInterrupt() if signum == signal.SIGINT else Terminated())


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the body, SIGTERM raises `Terminated` and Ctrl-C `KeyboardInterrupt`, both
    held back by `uninterrupted()`. The previous handlers are restored on the way out.
    Outside the main thread (where Python cannot set handlers) this does nothing."""
    global _owner_pid
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Only over Python's defaults: a signal the parent set to be ignored (a background
    # job's SIGINT) stays ignored.
    previous = {sig: handler for sig, default in ((signal.SIGINT, signal.default_int_handler),
                                                  (signal.SIGTERM, signal.SIG_DFL))
                if (handler := signal.getsignal(sig)) is default}
    _owner_pid = os.getpid()
    for sig in previous:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
