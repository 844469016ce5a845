"""The one callback type library code uses to report progress, so stages never print.

A stage calls `progress(phase, done, total)`: `phase` names the step ("reading",
"counting", "merging"), `done` is cumulative, `total` is None when unknown. The CLI
turns these calls into rich progress bars; tests pass `None` or a recorder.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int | None], None]


def no_progress(phase: str, done: int, total: int | None) -> None:
    """The default: report nothing."""
