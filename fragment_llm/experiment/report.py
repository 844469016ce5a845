"""`fragment report`: the curves of runs side by side, and what they mean in minutes.

A path is a run folder (it holds `metrics.jsonl`) or an experiment's output folder
(`<run>/seed-<n>/metrics.jsonl`, one curve per seed). The summary ranks runs by their
final validation bits per byte (the mean over seeds) and, for each, says how far it is
from the best and, in training minutes read off the curves (linearly interpolated
between evaluations): when it reaches the best run's result ("never within budget"
when it does not), and when the best run reached its result. The picture (matplotlib,
the `plot` extra, imported only when a PNG is asked for) plots validation bpb and
training loss against training time and against steps.
"""

from __future__ import annotations

import io
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fragment_llm.errors import ConfigError
from fragment_llm.experiment.metrics import Curves, Point, has_metrics, read_curves
from fragment_llm.safety.files import atomic_write_bytes
from fragment_llm.safety.text import escape_for_display

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MAX_RUNS = 64
MAX_CURVES = 256
HINT_PLOT = "install the plot extra: pip install 'fragment-llm[plot]' (or pip install matplotlib)"


@dataclass(frozen=True)
class ReportedRun:
    """A run's curves: one per seed (a run folder alone is one seed)."""

    name: str
    curves: tuple[Curves, ...]

    @property
    def finals(self) -> list[Point]:
        return [point for c in self.curves if (point := c.final_bpb) is not None]

    @property
    def final_bpb(self) -> float | None:
        finals = self.finals
        return statistics.fmean(p.value for p in finals) if finals else None


@dataclass(frozen=True)
class RunSummary:
    name: str
    seeds: int
    final_bpb: float | None  # mean over seeds of the last evaluation
    spread: float | None  # sample standard deviation over seeds
    steps: float | None
    minutes: float | None  # training time at the last evaluation
    gap: float | None  # final_bpb - the best run's
    reaches_best_min: float | None  # minutes this run needs for the best's result
    best_reaches_this_min: float | None  # minutes the best run needed for this one's


# --------------------------------------------------------------------- finding runs


def find_runs(paths: list[Path]) -> list[ReportedRun]:
    """Each path's runs: a run folder is one run; an experiment folder holds one per
    `<run>/` with its `seed-<n>/` folders. Symlinked folders are not followed."""
    runs: list[ReportedRun] = []
    for path in paths:
        if os.path.islink(path) or not path.is_dir():
            raise ConfigError(f"not a run or experiment folder: {path}",
                              hint="pass a `fragment train --out` folder or a `fragment "
                                   "experiment --out` folder")
        found = ([ReportedRun(str(path), (read_curves(path),))] if has_metrics(path)
                 else _experiment_runs(path))
        if not found:
            raise ConfigError(f"no metrics.jsonl in {path} or its <run>/seed-<n>/ folders",
                              hint="a run folder gets metrics.jsonl from its first step")
        runs += found
    if len(runs) > MAX_RUNS or sum(len(r.curves) for r in runs) > MAX_CURVES:
        raise ConfigError(f"{len(runs)} runs to report, more than {MAX_RUNS} (or more than "
                          f"{MAX_CURVES} curves)", hint="report fewer folders at a time")
    return runs


def _experiment_runs(folder: Path) -> list[ReportedRun]:
    runs = []
    for run in _real_folders(folder):
        seeds = [seed for seed in _real_folders(run)
                 if seed.name.startswith("seed-") and has_metrics(seed)]
        if seeds:
            runs.append(ReportedRun(run.name, tuple(read_curves(s) for s in seeds[:MAX_CURVES])))
        if len(runs) > MAX_RUNS:
            break
    return runs


def _real_folders(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        return sorted((Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)),
                      key=lambda p: p.name)[:10_000]


# ----------------------------------------------------------------------- the summary


def minutes_to_reach(curves: Curves, target: float) -> float | None:
    """Training minutes at which the validation curve first gets down to `target`,
    interpolated between the evaluations around it; None if it never does.

    `[(0 s, 3.0), (60 s, 2.0)]`, target 2.5 -> 0.5 (minutes)."""
    before = None
    for point in curves.val_bpb:
        if point.elapsed_s is None:
            continue
        if point.value <= target:
            if before is None or before.elapsed_s is None:
                return point.elapsed_s / 60
            share = (before.value - target) / (before.value - point.value)
            return (before.elapsed_s + share * (point.elapsed_s - before.elapsed_s)) / 60
        before = point
    return None


def _mean_minutes(run: ReportedRun, target: float) -> float | None:
    """The mean over seeds, or None when any seed never gets there."""
    times = [minutes_to_reach(c, target) for c in run.curves]
    known = [t for t in times if t is not None]
    return statistics.fmean(known) if known and len(known) == len(times) else None


def summarize(runs: list[ReportedRun]) -> list[RunSummary]:
    """One row per run, the best (lowest final bpb) first."""
    ranked = sorted(runs, key=lambda r: (r.final_bpb is None, r.final_bpb or 0.0))
    best = ranked[0] if ranked else None
    best_bpb = best.final_bpb if best is not None else None
    rows = []
    for run in ranked:
        finals, value = run.finals, run.final_bpb
        known = [p.elapsed_s for p in finals if p.elapsed_s is not None]
        versus = None  # (gap, this run's minutes to best's bpb, best's minutes to this one's)
        if best is not None and best_bpb is not None and run is not best and value is not None:
            versus = (value - best_bpb, _mean_minutes(run, best_bpb), _mean_minutes(best, value))
        rows.append(RunSummary(
            name=run.name, seeds=len(run.curves), final_bpb=value,
            spread=statistics.stdev(p.value for p in finals) if len(finals) > 1 else None,
            steps=statistics.fmean(p.step for p in finals) if finals else None,
            minutes=statistics.fmean(known) / 60 if known else None,
            gap=versus[0] if versus else None,
            reaches_best_min=versus[1] if versus else None,
            best_reaches_this_min=versus[2] if versus else None))
    return rows


# ------------------------------------------------------------------------ the picture


def write_png(runs: list[ReportedRun], target: Path) -> None:
    """Validation bpb and training loss, against training minutes and against steps:
    one colour per run, one line per seed. Written atomically."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"writing {target} needs matplotlib, which is not installed",
                          hint=HINT_PLOT) from None
    figure = Figure(figsize=(12, 8), layout="constrained")
    axes = figure.subplots(2, 2)
    panels = (("val_bpb", "validation bits per byte"), ("train_loss", "training loss (nats)"))
    for row, (field, title) in enumerate(panels):
        for col, by_time in enumerate((True, False)):
            ax = axes[row][col]
            for index, run in enumerate(runs):
                _plot_run(ax, run, field, by_time, f"C{index % 10}")
            ax.set_xlabel("training minutes" if by_time else "step")
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(target, buffer.getvalue())


def _plot_run(ax: Axes, run: ReportedRun, field: str, by_time: bool, colour: str) -> None:
    # A folder name is text from disk: no terminal escapes, and no `$` (mathtext).
    label = escape_for_display(run.name, 60).replace("$", "\\$")
    for seed, curves in enumerate(run.curves):
        points: list[Point] = getattr(curves, field)
        xs = [p.elapsed_s / 60 if by_time and p.elapsed_s is not None else p.step
              for p in points if not by_time or p.elapsed_s is not None]
        ys = [p.value for p in points if not by_time or p.elapsed_s is not None]
        ax.plot(xs, ys, color=colour, linewidth=1.2, alpha=0.9 if seed == 0 else 0.5,
                label=label if seed == 0 else None,
                marker="o" if field == "val_bpb" else None, markersize=3)
