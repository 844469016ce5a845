"""The learning-rate schedule: linear warmup, then a cosine over whatever budget is
left (steps or wall time, whichever runs out first), stretchable on resume."""

from __future__ import annotations

import math

from fragment_llm.config import TrainConfig


def lr_at(step: int, config: TrainConfig, progress: float,
          warmup_end: float | None = None, cosine_start: float = 0.0) -> float:
    """Linear warmup over `warmup_steps`, then cosine from `lr` to `lr * min_lr_ratio`.

    `progress` in [0, 1] is how far through the planned run we are: steps over
    `max_steps`, or elapsed over `max_time`, whichever is further. `warmup_end` is
    the progress at which warmup finished; the cosine spans the rest. It defaults to
    `warmup_steps / max_steps`, which is wrong for a time-bound run: there 100 warmup
    steps can be half of the run, and the cosine must not already be half done.
    Once `warmup_end` is set the warmup is over, whatever `warmup_steps` says now.
    `cosine_start` is explained at `cosine_position`.
    """
    warmup = min(config.warmup_steps, config.max_steps)
    if step < warmup and warmup_end is None:
        return config.lr * (step + 1) / warmup
    ratio = cosine_position(config, progress, warmup_end, cosine_start)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * ratio))


def cosine_position(config: TrainConfig, progress: float, warmup_end: float | None = None,
                    cosine_start: float = 0.0) -> float:
    """How far along the cosine the run is at `progress`: 0 at the peak, 1 at the floor.

    It goes linearly from `cosine_start` at `warmup_end` to 1 at the end of the budget.
    `cosine_start` is 0 unless the budget was extended on resume: the cosine then goes
    on from where it was, spread over what is left of the longer run.
    """
    warmup = min(config.warmup_steps, config.max_steps)
    warm = warmup / config.max_steps if warmup_end is None else min(warmup_end, 1.0)
    share = min(1.0, max(0.0, (progress - warm) / max(1e-9, 1.0 - warm)))
    return cosine_start + (1.0 - cosine_start) * share


def budget_progress(step: int, elapsed: float, config: TrainConfig) -> float:
    """How much of the budget is spent: steps over `max_steps` or training time over
    `max_time_s`, whichever is further, at most 1."""
    by_time = elapsed / config.max_time_s if config.max_time_s else 0.0
    return min(1.0, max(step / config.max_steps, by_time))
