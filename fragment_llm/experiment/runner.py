"""Running a plan: each run at each seed is an ordinary `fragment train` process into
`<out>/<run>/seed-<n>/`, one after another, then the results table.

Why a process per run, not a call: each run gets a fresh allocator and thread pool
(`fragment train` tunes glibc for the whole process), its peak RSS is its own, and
its validation, checkpoints, provenance and signal handling are exactly those of the
command a user types. The child runs in its own process group, so a Ctrl-C or SIGTERM
reaches it once, from us: it finishes its step, checkpoints and exits 130 or 143, and
the plan stops after recording what it has.

Resumable: a seed whose newest valid checkpoint has spent its budget is skipped; one
with a checkpoint short of it is continued with `--resume` (exact, on CPU in fp32);
one without starts afresh. A seed folder whose `train.toml` differs from what the plan
now asks is refused before anything runs: its results would not be this plan's.
This module does not print: it reports through `on_event`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fragment_llm.checkpoint.layout import list_checkpoints
from fragment_llm.config import MAX_CONFIG_FILE_BYTES
from fragment_llm.errors import ConfigError, OutputError
from fragment_llm.experiment.metrics import FinalRecord, final_record, matmul_peak_gflops
from fragment_llm.experiment.plan import Plan, Training
from fragment_llm.experiment.results import (
    ATTEMPTS_FILE,
    CONFIG_FILE,
    Attempt,
    RunResult,
    plan_results,
    record_attempt,
    write_results,
)
from fragment_llm.safety.files import atomic_write_text, make_dirs, read_capped
from fragment_llm.safety.signals import Terminated

POLL_S = 0.25  # how often the child's peak RSS is sampled while it runs


@dataclass(frozen=True)
class ExperimentRequest:
    plan: Plan
    out: Path
    data: Path
    tokenizer: Path
    quiet: bool = False  # pass -q to each `fragment train` (no live display)


@dataclass(frozen=True)
class TrainingStarted:
    index: int  # 1-based, of `total`
    total: int
    training: Training
    from_step: int | None  # resuming from this checkpoint's step; None: a fresh start


@dataclass(frozen=True)
class TrainingSkipped:
    index: int
    total: int
    training: Training
    record: FinalRecord


@dataclass(frozen=True)
class TrainingEnded:
    index: int
    total: int
    training: Training
    attempt: Attempt


ExperimentEvent = TrainingStarted | TrainingSkipped | TrainingEnded
ExperimentEventFn = Callable[[ExperimentEvent], None]


@dataclass(frozen=True)
class ExperimentSummary:
    out: Path
    results: list[RunResult]
    trained: int  # trainings run (or continued) this time
    skipped: int  # trainings already finished
    failed: int  # trainings whose process failed this time
    stopped_by: int | None  # SIGINT or SIGTERM: the plan stopped there


def run_experiment(request: ExperimentRequest, on_event: ExperimentEventFn) -> ExperimentSummary:
    """Run what is left of the plan, then write and return its results."""
    plan, out = request.plan, request.out
    _check_inputs(request)
    trainings = plan.trainings()
    for training in trainings:  # every refusal before the first run starts
        _check_folder(training, out)
    make_dirs(out, hint="choose another --out")
    peak, trained, skipped, failed, stopped_by = None, 0, 0, 0, None
    for index, training in enumerate(trainings, 1):
        folder = training.folder(out)
        record = final_record(folder) if folder.is_dir() else None
        if record is not None and record.finished:
            skipped += 1
            on_event(TrainingSkipped(index, len(trainings), training, record))
            continue
        peak = peak or matmul_peak_gflops()  # once, before the first run that trains
        make_dirs(folder)
        if record is None:  # a fresh start: a failed attempt's cost is not this run's
            (folder / ATTEMPTS_FILE).unlink(missing_ok=True)
        atomic_write_text(folder / CONFIG_FILE, training.config_toml())
        on_event(TrainingStarted(index, len(trainings), training,
                                 record.step if record is not None else None))
        attempt, stopped_by = _train(request, folder, resume=record is not None, peak=peak)
        record_attempt(folder, attempt)
        trained += 1
        failed += attempt.exit_code not in (0, 130, 143)
        on_event(TrainingEnded(index, len(trainings), training, attempt))
        if stopped_by is not None or attempt.exit_code in (130, 143):
            stopped_by = stopped_by or (signal.SIGINT if attempt.exit_code == 130
                                        else signal.SIGTERM)
            break
    results = plan_results(plan, out)
    write_results(plan, out, results)
    return ExperimentSummary(out, results, trained, skipped, failed, stopped_by)


def _check_inputs(request: ExperimentRequest) -> None:
    """The data and tokenizer every run needs, checked once rather than failing each run."""
    if not request.data.is_dir():
        raise ConfigError(f"processed data folder not found: {request.data}",
                          hint="run `fragment preprocess` first, or pass --data")
    if not request.tokenizer.is_file():
        raise ConfigError(f"tokenizer not found: {request.tokenizer}",
                          hint="run `fragment train-tokenizer` first, or pass --tokenizer")


def _check_folder(training: Training, out: Path) -> None:
    """A seed folder with a checkpoint this plan did not make, or made with other
    settings, is refused: skipping or resuming it would report another experiment's
    figures as this one's. Without a checkpoint (a run that failed before its first)
    there is nothing to keep: it starts afresh with the plan's settings."""
    folder = training.folder(out)
    for path in (out, out / training.run.name, folder):
        if os.path.islink(path) or os.path.lexists(path) and not path.is_dir():
            raise OutputError(f"{path} is not a folder (a symlink or a file)",
                              hint="choose another --out")
    if not list_checkpoints(folder):
        return
    config = folder / CONFIG_FILE
    recorded = None
    if os.path.lexists(config):
        recorded = read_capped(config, MAX_CONFIG_FILE_BYTES, OutputError).decode(
            "utf-8", errors="replace")
    if recorded != training.config_toml():
        raise OutputError(f"{folder} holds a run made with other settings than the plan's "
                          f"run {training.run.name!r} at seed {training.seed} "
                          f"({CONFIG_FILE} {'differs' if recorded else 'is missing'})",
                          hint="use another --out, or delete that folder to train it again")


def _train(request: ExperimentRequest, folder: Path, resume: bool,
           peak: float) -> tuple[Attempt, int | None]:
    """One `fragment train` process, waited for; a signal we receive is passed on."""
    command = [sys.executable, "-m", "fragment_llm", *(["-q"] if request.quiet else []),
               "train", "--config", str(folder / CONFIG_FILE), "--data", str(request.data),
               "--tokenizer", str(request.tokenizer), "--out", str(folder),
               *(["--resume"] if resume else [])]
    started = time.perf_counter()
    # stdout to our stderr: our own stdout may be carrying --json. Its own process
    # group: a terminal's Ctrl-C reaches us only, and we pass it on exactly once.
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=2,  # noqa: S603
                             process_group=0)
    rss, stopped_by = None, None
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            break
        except subprocess.TimeoutExpired:
            rss = max(filter(None, (rss, _peak_rss(child.pid))), default=None)
        except (KeyboardInterrupt, Terminated) as exc:
            stopped_by = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
            child.send_signal(stopped_by)
    return Attempt(code, time.perf_counter() - started, rss, peak), stopped_by


def _peak_rss(pid: int) -> int | None:
    """VmHWM of a live process, in bytes; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            found = re.search(rb"^VmHWM:\s+(\d+) kB", fh.read(1 << 16), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None
