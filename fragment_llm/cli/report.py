"""`fragment report`: runs compared by their curves, in a table and optionally a PNG."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.table import Table

    from fragment_llm.experiment.report import RunSummary

from fragment_llm.cli.common import FragmentCommand, json_option, show


@click.command(cls=FragmentCommand)
@click.argument("paths", metavar="RUN_OR_PLAN...", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("--out", "png", type=click.Path(path_type=Path, dir_okay=False),
              help="Also draw the curves into this PNG (needs matplotlib: "
                   "pip install 'fragment-llm[plot]').")
@json_option('"runs": name, final_bpb, gap, reaches_best_min, ...')
def report(paths: tuple[Path, ...], png: Path | None, as_json: bool) -> int:
    """Compare runs: final validation bits per byte and minutes to reach the best.

    \b
    Each path is a run folder (`fragment train --out`, with metrics.jsonl), an
    experiment folder (`fragment experiment --out`: one run per subfolder, its
    seeds averaged), or a plan file (its default folder, experiments/<plan name>).
    The table ranks runs by final validation bits per byte and says, in training
    minutes read off the curves, when each run reaches the best run's result
    ("never within budget" if it does not) and when the best run reached each
    one's. --out draws validation bpb and training loss against training minutes
    and against steps, every run in one picture.

    \b
    Examples:
      fragment report checkpoints                    # your own training, summarised
      fragment report checkpoints --out curves.png   # and its curves (the plot extra)
      fragment report checkpoints --json             # the summary as JSON

    Several at once: `fragment report experiments/plan-mlp checkpoints --out all.png`.
    """
    from fragment_llm.experiment.report import find_runs, summarize, write_png

    runs = find_runs([_folder_of(path) for path in paths])
    if png is not None:
        write_png(runs, png)
    rows = summarize(runs)
    if as_json:
        click.echo(json.dumps({"runs": [asdict(row) for row in rows],
                               "png": None if png is None else str(png)}))
    else:
        show(summary_table(rows), *([f"curves: {png}"] if png is not None else []))
    return 0


def _folder_of(path: Path) -> Path:
    """A plan file stands for its default output folder (after it validates)."""
    if path.suffix != ".toml" or not path.is_file():
        return path
    from fragment_llm.cli.experiment import DEFAULT_EXPERIMENTS
    from fragment_llm.experiment.plan import Plan

    Plan.load(path)
    return DEFAULT_EXPERIMENTS / path.stem


def summary_table(rows: list[RunSummary]) -> Table:
    from fragment_llm.cli.display import listing_table

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    best = rows[0].name if rows and rows[0].final_bpb is not None else None
    lines = []
    for row in rows:
        is_best = row.name == best
        reaches = ("(best)" if is_best else "-" if row.final_bpb is None
                   else "never within budget" if row.reaches_best_min is None
                   else f"{row.reaches_best_min:.2f}")
        bpb = number(row.final_bpb, ".4f") + (f" ± {row.spread:.4f}"
                                               if row.spread is not None else "")
        lines.append((row.name, row.seeds, bpb, number(row.gap, "+.4f"),
                      number(row.steps, ",.0f"), number(row.minutes, ".2f"), reaches,
                      "(best)" if is_best else number(row.best_reaches_this_min, ".2f")))
    headers = ("run", "seeds", "val bpb ± std", "gap", "steps", "minutes",
               "to best's bpb", "best to this")
    caption = (f"best: {best}. Minutes of training, interpolated between evaluations: "
               "when each run reaches the best's bits per byte, and when the best "
               "reached each one's." if best else "no run has a validation figure yet")
    return listing_table("Runs by final validation bits per byte", headers, lines,
                         caption=caption)
