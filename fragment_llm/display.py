"""Terminal rendering for the CLI: consoles, progress bars, summary tables, safe text.

Only the CLI imports this module (and with it rich). Every string that came from a
file, a user or a model passes through `safe()` or is printed as a `rich.text.Text`
with markup off, so neither terminal escapes nor rich markup in data can act.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.progress import (BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from fragment_llm.progress import ProgressFn, no_progress
from fragment_llm.sanitize import escape_for_display

# The stderr console carries diagnostics, progress and summaries; stdout stays for results.
err_console = Console(stderr=True, highlight=False, markup=False, emoji=False)


def safe(value: object, max_chars: int = 500) -> str:
    """Any value as a single harmless line for the terminal."""
    return escape_for_display(str(value), max_chars)


def summary_table(title: str, rows: Sequence[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(Text(safe(key)), Text(safe(value)))
    return table


def listing_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> Table:
    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*(Text(safe(cell)) for cell in row))
    return table


BYTE_PHASES = frozenset({"reading", "counting"})


def _amount(phase: str, value: int | None) -> str:
    if value is None:
        return "?"
    if phase in BYTE_PHASES:
        return f"{value / 1e6:,.1f} MB"
    return f"{value:,}"


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[ProgressFn]:
    """Yield a `ProgressFn` that draws one bar per phase on stderr (or nothing).

    Phases in `BYTE_PHASES` count bytes and are shown in MB; others count items.
    """
    if not enabled:
        yield no_progress
        return
    bars = Progress(TextColumn("{task.description:>10}"), BarColumn(),
                    TextColumn("{task.fields[shown]}"), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err_console)
    tasks: dict[str, TaskID] = {}

    def report(phase: str, done: int, total: int | None) -> None:
        shown = f"{_amount(phase, done)} / {_amount(phase, total)}"
        if phase not in tasks:
            if not tasks:  # start drawing only once there is something to draw
                bars.start()
            tasks[phase] = bars.add_task(phase, total=total, shown=shown)
        bars.update(tasks[phase], completed=done, total=total, shown=shown)

    try:
        yield report
    finally:
        if tasks:
            bars.stop()
