"""Terminal rendering for the CLI: consoles, progress bars, summary tables, safe text.

Only the CLI imports this module (and with it rich). Every string that came from a
file, a user or a model passes through `safe()` or is printed as a `rich.text.Text`
with markup off, so neither terminal escapes nor rich markup in data can act.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from fragment_llm.events import (
    CheckpointEvent,
    EvalEvent,
    NoteEvent,
    PlanEvent,
    ProbeEvent,
    ProgressEvent,
    ProgressFn,
    StepEvent,
    TrainEvent,
    no_progress,
)
from fragment_llm.safety.text import escape_for_display

# The stderr console carries diagnostics, progress and summaries; stdout stays for results.
err_console = Console(stderr=True, highlight=False, markup=False, emoji=False)


def safe(value: object, max_chars: int = 500) -> str:
    """Any value as a single harmless line for the terminal."""
    return escape_for_display(str(value), max_chars)


def summary_table(title: str, rows: Sequence[tuple[str, object]]) -> Table:
    table = Table(title=Text(safe(title)), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(Text(safe(key)), Text(safe(value)))
    return table


def listing_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]],
                  caption: str | None = None) -> Table:
    table = Table(title=Text(safe(title)), title_justify="left",
                  caption=None if caption is None else Text(safe(caption)),
                  caption_justify="left")
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*(Text(safe(cell)) for cell in row))
    return table


BYTE_PHASES = frozenset({"reading", "counting", "reading conversations"})


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


# ----------------------------------------------------------------------------- training


def _rss_mib() -> float:
    """Current resident memory of this process, from /proc (0 where unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass(frozen=True)
class Budget:
    """Where a run stands against the bound that will end it: `--max-steps` or
    `--max-time`, whichever comes first at the measured speed."""

    bound: str  # "steps" or "time"
    steps: int  # the steps the run will end at: max_steps, or the estimate by time
    fraction: float  # how much of that bound is spent, in [0, 1]
    eta_s: float | None  # training time left; None until a step's time is known

    def describe(self, step: int) -> str:
        """`step 4/3000`, or `step 4/~180` (an estimate) when time will end the run."""
        if self.bound == "steps":
            return f"step {step:,}/{self.steps:,}"
        return f"step {step:,}/~{self.steps:,}"


def run_budget(max_steps: int, max_time_s: float | None, step: int, elapsed_s: float,
               seconds_per_step: float | None) -> Budget:
    """Which bound ends the run, when, and after how many steps, at `seconds_per_step`.

    Training time only, as `--max-time` counts it: evaluations and checkpoints add to
    the wall-clock time. `run_budget(3000, 180, step=4, elapsed_s=4, seconds_per_step=1)`
    -> time ends it: 176 s left, at step ~180 of 3000.
    """
    if not seconds_per_step or seconds_per_step <= 0:
        by_time = elapsed_s / max_time_s if max_time_s else 0.0
        return Budget("steps", max_steps, min(1.0, max(step / max_steps, by_time)), None)
    by_steps = max(0, max_steps - step) * seconds_per_step
    if max_time_s is not None:
        time_left = max(0.0, max_time_s - elapsed_s)
        if time_left < by_steps:  # the loop takes a step while time is left
            steps = min(max_steps, step + math.ceil(time_left / seconds_per_step))
            return Budget("time", steps, min(1.0, elapsed_s / max_time_s), time_left)
    return Budget("steps", max_steps, min(1.0, step / max_steps), by_steps)


def clock(seconds: float | None) -> str:
    """`0:03:00`; `-:--:--` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    return str(datetime.timedelta(seconds=round(seconds)))


class TrainDisplay:
    """Turns `TrainEvent`s into a live status line, notes, and the data for a summary.

    The bar and its eta follow whichever of `--max-steps` and `--max-time` will end the
    run (`run_budget`), so a time-bound run shows its estimated steps and time left.
    """

    def __init__(self, enabled: bool, max_steps: int) -> None:
        self.enabled = enabled
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                             TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                             TextColumn("eta {task.fields[eta]}"), console=err_console)
        self.task: TaskID | None = None
        self.max_steps = max_steps
        self.max_time_s: float | None = None
        self.plan_event: PlanEvent | None = None
        self.probe = 0.0  # the dry run's seconds per step
        self._said: str | None = None  # the last tokenizing line, printed once

    def __enter__(self) -> TrainDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.bars.stop()

    def __call__(self, event: TrainEvent) -> None:
        match event:
            case PlanEvent():
                self.plan_event = event
                self.max_steps, self.max_time_s = event.max_steps, event.max_time_s
            case ProbeEvent():
                self.probe = event.seconds_per_step
            case NoteEvent():
                self._print(event.message)
            case ProgressEvent():
                said = (f"tokenizing the corpus ({event.total} documents)..."
                        if event.phase == "tokenizing" else
                        f"{event.phase} ({_amount(event.phase, event.total)})...")
                if said != self._said:
                    self._said = said
                    self._print(said)
            case StepEvent():
                self._on_step(event)
            case EvalEvent():
                self._print(f"step {event.step}: val loss {event.val_loss:.4f}, "
                            f"val bits/byte {event.val_bpb:.4f}")
            case CheckpointEvent():
                self._print(f"step {event.step}: checkpoint {event.path}")

    @property
    def plan(self) -> dict[str, object]:
        """The plan as `fragment train --json` and the summary table show it ({} before
        the run sent one)."""
        return dataclasses.asdict(self.plan_event) if self.plan_event else {}

    def planned(self) -> Budget:
        """The planned run (or its rest, on resume) at the probe's seconds per step."""
        plan = self.plan_event
        return run_budget(self.max_steps, self.max_time_s, plan.step if plan else 0,
                          plan.elapsed_s if plan else 0.0, self.probe)

    def _print(self, text: str) -> None:
        if self.enabled:
            err_console.print(Text(safe(text, 2000)))

    def _on_step(self, event: StepEvent) -> None:
        if not self.enabled:
            return
        if self.task is None:
            self.bars.start()
            self.task = self.bars.add_task("train", total=1.0, status="", eta="")
        budget = run_budget(self.max_steps, self.max_time_s, event.step, event.elapsed_s,
                            event.elapsed_s / event.step if event.step else None)
        limit = f" (time limit {clock(self.max_time_s)})" if budget.bound == "time" else ""
        status = (f"{budget.describe(event.step)}{limit}  loss {event.train_loss:.4f}  "
                  f"lr {event.lr:.2e}  {event.tokens_per_s:,.0f} tok/s  "
                  f"rss {_rss_mib():,.0f} MiB")
        self.bars.update(self.task, completed=budget.fraction, status=status,
                         eta=clock(budget.eta_s))
