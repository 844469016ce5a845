"""The callbacks library code reports through, so stages never print.

Two kinds of report:
- `ProgressFn`: a stage calls `progress(phase, done, total)`. `phase` names the step
  ("reading", "counting", "merging"), `done` is cumulative, `total` is None when unknown.
  The CLI turns these calls into rich progress bars; tests pass `None` or a recorder.
- `EventFn`: training sends one `TrainEvent` per thing worth showing, each kind its own
  frozen class with typed fields. The CLI's `TrainDisplay` renders them; `metrics.jsonl`
  is written by the training loop from the same `StepEvent`s and `EvalEvent`s (their
  fields are its keys).

Nothing here imports torch, rich or click: every layer may import this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ProgressFn = Callable[[str, int, int | None], None]


def no_progress(phase: str, done: int, total: int | None) -> None:
    """The default: report nothing."""


# ----------------------------------------------------------------------- training events


@dataclass(frozen=True)
class ProgressEvent:
    """Tokenizing the corpus into token shards before training: one `ProgressFn` call."""

    phase: str
    done: int
    total: int | None


@dataclass(frozen=True)
class NoteEvent:
    """A sentence for the user: a damaged checkpoint skipped, fewer workers than asked,
    the checkpoint a run resumed from."""

    message: str


@dataclass(frozen=True)
class PlanEvent:
    """What the run will do, sent once before its first step (or a dry run's probe).

    The field order is the order of `fragment train --json`'s `plan` object.
    """

    parameters: int
    non_embedding_parameters: int
    flops_per_token: int
    memory_bytes: int  # the estimated peak
    tokens_per_step: int
    device: str
    precision: str
    world_size: int
    train_tokens: int
    val_tokens: int
    max_steps: int
    max_time_s: float | None
    step: int  # where the run starts: 0, or the checkpoint's step on resume
    elapsed_s: float  # training time already spent (resume)


@dataclass(frozen=True)
class ProbeEvent:
    """`--dry-run`'s timing: seconds per optimizer step, after one warm-up step."""

    seconds_per_step: float


@dataclass(frozen=True)
class StepEvent:
    """One optimizer step done. Its fields are a `metrics.jsonl` line's keys."""

    step: int
    train_loss: float
    lr: float
    grad_norm: float
    skipped: bool  # the loss or gradients were not finite, so the update was skipped
    tokens_per_s: float
    elapsed_s: float  # training time so far, as `--max-time` counts it
    progress: float  # how much of the budget is spent, in [0, 1]


@dataclass(frozen=True)
class EvalEvent:
    """An evaluation on the held-out split (periodic, or the one a run ends on)."""

    step: int
    val_loss: float  # nats per token
    val_bpb: float  # bits per UTF-8 byte


@dataclass(frozen=True)
class CheckpointEvent:
    """A checkpoint written: the step folder under the run folder."""

    step: int
    path: Path


TrainEvent = (ProgressEvent | NoteEvent | PlanEvent | ProbeEvent | StepEvent | EvalEvent
              | CheckpointEvent)
EventFn = Callable[[TrainEvent], None]
