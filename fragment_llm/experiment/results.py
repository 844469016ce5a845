"""A plan's results: one row per run (its seeds summarised), from what each seed's run
folder recorded, written as `results.csv` and `results.json` (atomically).

Everything but wall time, peak RSS and MFU comes from the run folders themselves (the
newest valid checkpoint), so a plan resumed or rerun reports the same figures as one
that never stopped. Wall time, peak RSS and the matmul peak behind MFU are the
runner's measurements, kept per seed in `experiment.json` beside the checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import TypeAdapter, ValidationError

from fragment_llm.errors import CheckpointError
from fragment_llm.experiment.metrics import final_record
from fragment_llm.experiment.plan import Plan, Training
from fragment_llm.safety.files import (
    atomic_write_text,
    dump_json,
    open_regular,
    parse_json_guarded,
)

ATTEMPTS_FILE = "experiment.json"  # in each seed's run folder: the runner's measurements
CONFIG_FILE = "train.toml"  # in each seed's run folder: its `fragment train --config`
RESULTS_CSV = "results.csv"
RESULTS_JSON = "results.json"
MAX_ATTEMPTS = 1000

Status = Literal["done", "partial", "failed", "pending"]


@dataclass(frozen=True)
class Attempt:
    """One `fragment train` process of a seed: how it ended and what it cost."""

    exit_code: int
    wall_s: float
    peak_rss_bytes: int | None  # the process's VmHWM (Linux), sampled while it ran
    peak_gflops: float | None  # the machine's fp32 matmul peak, measured that session


@dataclass(frozen=True)
class SeedResult:
    run: str
    seed: int
    status: Status
    val_bpb: float | None
    steps: int | None
    train_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    peak_rss_mib: float | None
    wall_s: float | None  # summed over the attempts, start-up and evaluations included


@dataclass(frozen=True)
class RunResult:
    name: str
    overrides: str  # `train.lr=0.002`, or `base`
    seeds_done: int
    seeds: tuple[SeedResult, ...]
    val_bpb_mean: float | None
    val_bpb_std: float | None  # sample standard deviation over seeds (needs two)
    val_bpb_min: float | None
    val_bpb_max: float | None
    steps: float | None
    tokens_per_s: float | None
    mfu: float | None
    peak_rss_mib: float | None  # the largest over seeds
    wall_s: float | None  # mean over seeds


_ATTEMPTS = TypeAdapter(list[Attempt])
COLUMNS = ("run", "overrides", "seeds_done", "val_bpb_mean", "val_bpb_std", "val_bpb_min",
           "val_bpb_max", "steps", "tokens_per_s", "mfu", "peak_rss_mib", "wall_s")


# --------------------------------------------------------------------- the attempts


def read_attempts(folder: Path) -> list[Attempt]:
    """The runner's record of a seed folder; none when absent or unreadable (the
    figures it holds are measurements, not what decides skipping or resuming)."""
    path = folder / ATTEMPTS_FILE
    try:
        fd = open_regular(path, CheckpointError)
    except CheckpointError:
        return []
    with open(fd, "rb") as fh:
        raw = fh.read(1 << 20)
    try:
        doc = parse_json_guarded(raw, str(path), CheckpointError, max_depth=4)
        items = doc.get("attempts") if isinstance(doc, dict) else None
        # JSON mode: strict types (no "2" for 2, no true for 1), objects for dataclasses
        return _ATTEMPTS.validate_json(json.dumps(items), strict=True)[-MAX_ATTEMPTS:]
    except (CheckpointError, ValidationError):
        return []


def record_attempt(folder: Path, attempt: Attempt) -> None:
    attempts = [*read_attempts(folder), attempt][-MAX_ATTEMPTS:]
    atomic_write_text(folder / ATTEMPTS_FILE,
                      dump_json({"attempts": [asdict(a) for a in attempts]}))


# ------------------------------------------------------------------------ results


def seed_result(training: Training, out: Path) -> SeedResult:
    folder = training.folder(out)
    record = final_record(folder) if folder.is_dir() else None
    attempts = read_attempts(folder) if folder.is_dir() else []
    status: Status = ("done" if record is not None and record.finished else
                      "partial" if record is not None else
                      "failed" if attempts else "pending")
    if status == "partial" and attempts and attempts[-1].exit_code not in (0, 130, 143):
        status = "failed"
    peak = next((a.peak_gflops for a in reversed(attempts) if a.peak_gflops), None)
    rss = [a.peak_rss_bytes for a in attempts if a.peak_rss_bytes is not None]
    speed = record.tokens_per_s if record is not None else None
    return SeedResult(
        run=training.run.name, seed=training.seed, status=status,
        val_bpb=record.val_bpb if record is not None else None,
        steps=record.step if record is not None else None,
        train_s=record.elapsed_s if record is not None else None,
        tokens_per_s=speed,
        mfu=(speed * record.flops_per_token / (peak * 1e9)
             if record is not None and speed is not None and peak else None),
        peak_rss_mib=max(rss) / 2**20 if rss else None,
        wall_s=sum(a.wall_s for a in attempts) if attempts else None)


def run_result(name: str, overrides: str, seeds: list[SeedResult]) -> RunResult:
    """A run's seeds summarised; only finished seeds count towards the figures."""
    done = [s for s in seeds if s.status == "done"]

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None

    bpbs = [s.val_bpb for s in done if s.val_bpb is not None]
    rss = [s.peak_rss_mib for s in done if s.peak_rss_mib is not None]
    return RunResult(
        name=name, overrides=overrides, seeds_done=len(done), seeds=tuple(seeds),
        val_bpb_mean=statistics.fmean(bpbs) if bpbs else None,
        val_bpb_std=statistics.stdev(bpbs) if len(bpbs) > 1 else None,
        val_bpb_min=min(bpbs, default=None), val_bpb_max=max(bpbs, default=None),
        steps=mean([s.steps for s in done]), tokens_per_s=mean([s.tokens_per_s for s in done]),
        mfu=mean([s.mfu for s in done]), peak_rss_mib=max(rss, default=None),
        wall_s=mean([s.wall_s for s in done]))


def plan_results(plan: Plan, out: Path) -> list[RunResult]:
    return [run_result(run.name, run.label,
                       [seed_result(t, out) for t in plan.trainings() if t.run is run])
            for run in plan.runs]


def write_results(plan: Plan, out: Path, results: list[RunResult]) -> None:
    """`results.csv` (a row per run) and `results.json` (the rows with their seeds)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for result in results:
        row = {"run": result.name, **asdict(result)}
        writer.writerow(["" if row[key] is None else _cell(row[key]) for key in COLUMNS])
    atomic_write_text(out / RESULTS_CSV, buffer.getvalue())
    atomic_write_text(out / RESULTS_JSON, dump_json({
        "plan": str(plan.path), "description": plan.description, "budget": plan.budget,
        "seeds": list(plan.seeds), "runs": [asdict(result) for result in results]}))


def _cell(value: object) -> str:
    """A CSV cell; a text cell that a spreadsheet would run as a formula is quoted off."""
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return "'" + text if isinstance(value, str) and text[:1] in "=+-@\t\r" else text
