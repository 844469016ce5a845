"""What a run folder says about its run: the curves `metrics.jsonl` logged, and the
figures of its newest valid checkpoint (the step, training time and final validation
bits per byte it recorded, and whether its budget was spent).

The trainer writes both (train/run.py); this module only reads, and reads them as
hostile input: `metrics.jsonl` is opened without following a symlink, read up to a
size and a line cap, and a line that is not a JSON object of numbers is skipped (a
killed run may leave a torn last line). It also measures the machine's fp32 matmul
peak, the denominator of MFU.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fragment_llm.checkpoint.layout import METRICS_FILE
from fragment_llm.errors import CheckpointError
from fragment_llm.safety.files import open_regular

MAX_METRICS_BYTES = 256 << 20
MAX_METRICS_LINES = 2_000_000
MAX_LINE_BYTES = 64 << 10


@dataclass(frozen=True)
class Point:
    step: int
    elapsed_s: float | None  # training time at this step (what --max-time counts)
    value: float


@dataclass(frozen=True)
class Curves:
    """A run's logged train loss and validation bits per byte, by step."""

    folder: Path
    train_loss: tuple[Point, ...]
    val_bpb: tuple[Point, ...]

    @property
    def final_bpb(self) -> Point | None:
        return self.val_bpb[-1] if self.val_bpb else None


def has_metrics(folder: Path) -> bool:
    return os.path.lexists(folder / METRICS_FILE)


def read_curves(folder: Path) -> Curves:
    """Parse OUT/metrics.jsonl. An evaluation line that lacks `elapsed_s` (written before
    the trainer logged it) takes the time of the step line before it. A step evaluated
    twice (a periodic evaluation at the last step, then the final one) keeps the last."""
    train: dict[int, Point] = {}
    val: dict[int, Point] = {}
    elapsed = None
    for record in _records(folder / METRICS_FILE):
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            continue
        elapsed = _number(record.get("elapsed_s")) if "elapsed_s" in record else elapsed
        if (loss := _number(record.get("train_loss"))) is not None:
            train[step] = Point(step, elapsed, loss)
        if (bpb := _number(record.get("val_bpb"))) is not None:
            val[step] = Point(step, elapsed, bpb)
    return Curves(folder, tuple(train[s] for s in sorted(train)),
                  tuple(val[s] for s in sorted(val)))


def _records(path: Path) -> list[dict[str, object]]:
    fd = open_regular(path, CheckpointError)
    records = []
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_METRICS_BYTES:
            raise CheckpointError(f"{path} is {size:,} bytes, more than the "
                                  f"{MAX_METRICS_BYTES:,} a report reads")
        for number, line in enumerate(fh):
            if number >= MAX_METRICS_LINES:
                break
            if len(line) > MAX_LINE_BYTES:
                continue
            try:  # flat objects of numbers: no depth to guard, NaN refused
                record = json.loads(line, parse_constant=_refuse)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _refuse(name: str) -> float:
    raise ValueError(name)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# ------------------------------------------------------------------ the final record


@dataclass(frozen=True)
class FinalRecord:
    """A run folder's newest valid checkpoint, as the results table needs it."""

    step: int
    elapsed_s: float  # training time, evaluation and saving excluded
    val_bpb: float | None  # the evaluation the checkpoint recorded (the final one, if done)
    finished: bool  # the recorded budget is spent: resuming would train no further step
    tokens_per_step: int
    flops_per_token: int

    @property
    def tokens_per_s(self) -> float | None:
        return self.step * self.tokens_per_step / self.elapsed_s if self.elapsed_s > 0 else None


def final_record(folder: Path) -> FinalRecord | None:
    """The newest checkpoint that verifies, or None when there is none yet."""
    from fragment_llm.checkpoint.load import latest_valid_checkpoint
    from fragment_llm.checkpoint.trained import checkpoint_model_config
    from fragment_llm.model.size import flops_per_token

    checkpoint, _ = latest_valid_checkpoint(folder)
    if checkpoint is None:
        return None
    elapsed = _number(checkpoint.trainer_state.elapsed_s) or 0.0
    train = checkpoint.config.train or {}
    max_steps, max_time = train.get("max_steps"), _number(train.get("max_time_s"))
    finished = (isinstance(max_steps, int) and checkpoint.step >= max_steps
                or max_time is not None and elapsed >= max_time)
    model = checkpoint_model_config(checkpoint)
    per_step = (checkpoint.config.train_count("batch_size", 1)
                * checkpoint.config.train_count("grad_accum", 1) * model.block_size)
    return FinalRecord(checkpoint.step, elapsed, checkpoint.config.val_bpb, finished,
                       per_step, flops_per_token(model))


def matmul_peak_gflops(size: int = 1024, repeats: int = 8) -> float:
    """fp32 matmul GFLOP/s on this machine now (best of `repeats`, after a warm-up): the
    peak MFU is measured against, as scripts/bench_train.py measures it."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9
