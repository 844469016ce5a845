"""`fragment experiment`: run a plan of training runs over seeds, one after another,
and show their results (a table, or JSON with --json)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from rich.table import Table

    from fragment_llm.experiment.plan import Plan
    from fragment_llm.experiment.results import RunResult
    from fragment_llm.experiment.runner import ExperimentEvent, ExperimentSummary

from fragment_llm.cli.common import (
    DEFAULT_PROCESSED,
    DEFAULT_TOKENIZER,
    EXIT_INTERRUPTED,
    FLAGS,
    FragmentCommand,
    json_option,
    show,
)
from fragment_llm.safety.signals import Terminated

DEFAULT_EXPERIMENTS = Path("experiments")


@click.command(cls=FragmentCommand)
@click.argument("plan_path", metavar="PLAN.toml",
                type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the runs and results.csv/json [experiments/<plan name>].")
@click.option("--data", type=click.Path(path_type=Path, file_okay=False),
              help=f"Processed folder [the plan's `data`, else {DEFAULT_PROCESSED}].")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help=f"Tokenizer file [the plan's `tokenizer`, else {DEFAULT_TOKENIZER}].")
@click.option("--dry-run", is_flag=True,
              help="Validate the plan and list its runs (done, partial or to do); train nothing.")
@json_option('"out", "runs", "trained", "skipped", "failed", ...')
def experiment(plan_path: Path, out: Path | None, data: Path | None,
               tokenizer_path: Path | None, dry_run: bool, as_json: bool) -> int:
    """Train each run of a plan at each seed, then compare them.

    \b
    A plan (TOML; docs/experiment.md) names a base config (the [model]/[train]
    tables of `fragment train --config`), a budget, seeds, and [[runs]] of
    overrides or a [grid] of values. Each run at each seed is an ordinary
    `fragment train` into OUT/<run>/seed-<n>/, one after another. Rerun the same
    command to continue: finished runs are skipped, an interrupted one resumes
    exactly from its checkpoint. Ctrl-C stops the run in progress at a checkpoint.
    Results: a table, and OUT/results.csv and OUT/results.json (validation bits
    per byte, mean and spread over seeds; steps, tokens/s, MFU, peak RSS, wall time).

    \b
    Examples:
      fragment experiment examples/plan-lr-grid.toml --dry-run    # the runs it makes
      fragment experiment examples/plan-mlp.toml                  # about an hour

    Then `fragment report experiments/plan-mlp --out mlp.png` draws its curves.
    """
    from fragment_llm.experiment.plan import Plan
    from fragment_llm.experiment.runner import ExperimentRequest, run_experiment

    plan = Plan.load(plan_path)
    out = out or DEFAULT_EXPERIMENTS / plan_path.stem
    request = ExperimentRequest(plan, out, data or plan.data or DEFAULT_PROCESSED,
                                tokenizer_path or plan.tokenizer or DEFAULT_TOKENIZER,
                                quiet=FLAGS.quiet)
    if dry_run:
        return _dry_run(plan, out, as_json)
    summary = run_experiment(request, _progress)
    if as_json:
        click.echo(json.dumps({"out": str(out), "plan": str(plan_path), "budget": plan.budget,
                               "trained": summary.trained, "skipped": summary.skipped,
                               "failed": summary.failed,
                               "stopped": summary.stopped_by is not None,
                               "runs": [asdict(r) for r in summary.results]}))
    else:
        show(results_table(plan, summary.results), f"results: {out}/results.csv, "
                                                   f"{out}/results.json")
    return _exit_code(summary, plan_path)


def _exit_code(summary: ExperimentSummary, plan_path: Path) -> int:
    """0 when every run trained; 130/143 when a signal stopped the plan; 1 on failures."""
    if summary.stopped_by is not None:
        import signal

        from fragment_llm.cli.display import safe

        where = f"rerun `fragment experiment {plan_path}` to continue"
        if summary.stopped_by == signal.SIGTERM:
            raise Terminated(f"the run in progress saved a checkpoint; {where}")
        click.echo(safe(f"interrupted: the run in progress saved a checkpoint; {where}"),
                   err=True)
        return EXIT_INTERRUPTED
    if summary.failed:
        from fragment_llm.errors import TrainingError

        raise TrainingError(f"{summary.failed} training run(s) of {plan_path} failed",
                            hint="their errors are above; fix the cause and rerun: finished "
                                 "runs are skipped")
    return 0


def _progress(event: ExperimentEvent) -> None:
    """A line per run as it starts, is skipped or fails; `fragment train` shows the rest."""
    from fragment_llm.cli.display import safe
    from fragment_llm.experiment.runner import TrainingEnded, TrainingSkipped, TrainingStarted

    training = event.training
    where = f"[{event.index}/{event.total}] {training.run.name} seed {training.seed}"
    if isinstance(event, TrainingSkipped):
        bpb = event.record.val_bpb
        show(safe(f"{where}: done at step {event.record.step:,}"
                  + (f", {bpb:.4f} bits/byte" if bpb is not None else "") + "; skipped"))
    elif isinstance(event, TrainingStarted):
        start = (f"resuming from step {event.from_step:,}" if event.from_step is not None
                 else "starting")
        show(safe(f"{where}: {start} ({training.run.label})"))
    elif isinstance(event, TrainingEnded) and event.attempt.exit_code not in (0, 130, 143):
        show(safe(f"{where}: failed (exit {event.attempt.exit_code}); the plan goes on"))


def results_table(plan: Plan, results: list[RunResult]) -> Table:
    from fragment_llm.cli.display import listing_table

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = []
    for r in results:
        bpb = number(r.val_bpb_mean, ".4f") + (f" ± {r.val_bpb_std:.4f}"
                                                if r.val_bpb_std is not None else "")
        rows.append((r.name, f"{r.seeds_done}/{len(r.seeds)}", bpb, number(r.steps, ",.0f"),
                     number(r.tokens_per_s, ",.0f"), number(r.mfu, ".0%"),
                     number(r.peak_rss_mib, ",.0f"), number(r.wall_s, ",.0f")))
    headers = ("run", "seeds", "val bpb ± std", "steps", "tok/s", "MFU", "RSS MiB", "wall s")
    return listing_table(f"Experiment {plan.path} ({plan.budget} per run)", headers, rows)


def _dry_run(plan: Plan, out: Path, as_json: bool) -> int:
    from fragment_llm.cli.display import listing_table
    from fragment_llm.experiment.metrics import final_record

    rows = []
    for training in plan.trainings():
        folder = training.folder(out)
        record = final_record(folder) if folder.is_dir() else None
        status = ("done" if record is not None and record.finished else
                  f"partial (step {record.step:,})" if record is not None else "to do")
        rows.append((training.run.name, training.seed, training.run.label, status))
    if as_json:
        click.echo(json.dumps({"out": str(out), "plan": str(plan.path), "dry_run": True,
                               "budget": plan.budget,
                               "trainings": [dict(zip(("run", "seed", "overrides", "status"),
                                                      row, strict=True)) for row in rows]}))
        return 0
    runs, seeds = len(plan.runs), len(plan.seeds)
    show(listing_table(f"Plan {plan.path}: {runs} run{'s' * (runs != 1)} x {seeds} "
                       f"seed{'s' * (seeds != 1)}, "
                       f"{plan.budget} each, into {out}",
                       ("run", "seed", "overrides", "status"), rows))
    return 0
