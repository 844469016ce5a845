"""The learning-rate schedule: linear warmup, then a cosine over whatever budget is
left (steps or wall time, whichever runs out first), stretchable on resume; or, with
`schedule = "wsd"`, warmup-stable-decay over the same span. Also Muon's momentum warmup."""

from __future__ import annotations

import math

from fragment_llm.config import TrainConfig


def lr_at(step: int, config: TrainConfig, progress: float,
          warmup_end: float | None = None, cosine_start: float = 0.0) -> float:
    """Linear warmup over `warmup_steps`, then cosine from `lr` to `lr * min_lr_ratio`
    (or, `schedule = "wsd"`, `lr` held, then a straight line to the same floor).

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
    if config.schedule == "wsd":
        # Warmup-stable-decay (Hu et al. 2024, MiniCPM): the peak until the last
        # decay_fraction of the span, then a straight line down to the floor.
        into_decay = max(0.0, ratio - (1.0 - config.decay_fraction)) / config.decay_fraction
        return config.lr - (config.lr - floor) * into_decay
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * ratio))


def muon_momentum_at(step: int, config: TrainConfig) -> float:
    """Muon's momentum: from `muon_momentum_start` up to `muon_momentum` over
    `muon_momentum_warmup_steps` steps (modded-nanogpt: 0.85 -> 0.95 over 300), so the
    first updates, whose gradients say little yet, do not carry on for 20 steps."""
    warmup = config.muon_momentum_warmup_steps
    share = 1.0 if warmup == 0 else min(1.0, step / warmup)
    return config.muon_momentum_start + (config.muon_momentum - config.muon_momentum_start) * share


def cosine_position(config: TrainConfig, progress: float, warmup_end: float | None = None,
                    cosine_start: float = 0.0) -> float:
    """How far along the cosine (or the wsd's stable-then-decay span) the run is at
    `progress`: 0 at the peak, 1 at the floor.

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
