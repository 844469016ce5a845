"""What a resumed run trains with: the settings its checkpoint recorded.

A resumed run continues the run it resumes. Its model and training values come from
the checkpoint's config.json, never from today's presets or defaults. A value the user
gives again must agree with the recorded one, or be a change that leaves the arithmetic
of every step as it was:

- the budget (`max_steps`, `max_time_s`) may grow; train.py spreads the rest of the
  cosine over the longer run (`Trainer.extend_budget`);
- what is watched and kept (evaluation, logging, checkpoint cadence) and how the run
  executes (device, precision, compile, activation checkpointing, workers, memory cap)
  may change freely.

Anything else is refused with one line naming the field, the recorded value and the
given one; a value that only a `--preset` supplies never changes a resumed run. The
changes made are recorded in the next checkpoint's config.json (`resume_changes`).
docs/training.md has the table. This module owns those rules; it does not find or load
checkpoints, and does not train.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import JsonValue, ValidationError

from fragment_llm.checkpoint.layout import CONFIG_FILE
from fragment_llm.checkpoint.records import table_refusal
from fragment_llm.checkpoint.trained import checkpoint_model_config
from fragment_llm.config import Given, GivenSettings, ModelConfig, TrainConfig
from fragment_llm.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from fragment_llm.checkpoint.load import Checkpoint

# When the run ends. They may only grow: a shorter budget would end a run planned longer.
EXTENDABLE = frozenset({"max_steps", "max_time_s"})
# What is watched and kept, and where and how the run executes. A step computes the
# same numbers under any of these; on CPU in fp32 the same bits, as long as the device
# and precision they resolve to are unchanged (`auto` already picks per machine).
FREE = frozenset({"eval_every", "eval_blocks", "final_eval_blocks", "log_every",
                  "checkpoint_every", "keep_checkpoints", "workers", "max_memory",
                  "activation_checkpointing", "compile", "device", "precision"})
KEPT_CHANGES = 100  # config.json keeps the newest changes, so it stays far under its cap


@dataclass(frozen=True)
class SettingChange:
    """One [train] value changed on resume, as config.json's `resume_changes` keeps it."""

    step: int
    field: str
    recorded: JsonValue
    given: JsonValue
    source: str


@dataclass(frozen=True)
class ResumedSettings:
    model: ModelConfig
    train: TrainConfig  # what the run continues with
    recorded: TrainConfig  # what the checkpoint recorded
    changes: tuple[SettingChange, ...]  # made by this resume
    earlier: tuple[dict[str, JsonValue], ...]  # made by earlier resumes, from config.json

    @property
    def budget_extended(self) -> bool:
        return any(change.field in EXTENDABLE for change in self.changes)

    def change_record(self) -> list[dict[str, JsonValue]]:
        return [*self.earlier, *(asdict(change) for change in self.changes)][-KEPT_CHANGES:]


def resumed_settings(checkpoint: Checkpoint, model: ModelConfig, train: TrainConfig,
                     given: GivenSettings | None) -> ResumedSettings:
    """The run's recorded settings, with the given values checked against them.

    `model` and `train` hold the given values (validated); `given` says which keys the
    user chose. None means a library caller chose every [train] value that is not None,
    and the model is the checkpoint's.
    """
    recorded_model = checkpoint_model_config(checkpoint)
    recorded = _recorded_train(checkpoint)
    where = checkpoint.path
    for key, came in (given.model if given else {}).items():
        old, new = getattr(recorded_model, key), getattr(model, key)
        if old != new:
            raise _refusal(f"model.{key}", old, new, came, where)
    chosen = given.train if given else {key: Given("the request")
                                        for key, value in train if value is not None}
    changes = []
    for key, came in chosen.items():
        old, new = getattr(recorded, key), getattr(train, key)
        if old == new:
            continue
        grows = new is not None and (old is None or new > old)  # a budget may only grow
        if came.from_preset or not (key in FREE or key in EXTENDABLE and grows):
            raise _refusal(f"train.{key}", old, new, came, where)
        changes.append(SettingChange(checkpoint.step, key, old, new, came.source))
    now = TrainConfig.model_validate({**recorded.model_dump(),
                                      **{c.field: c.given for c in changes}})
    earlier = tuple(checkpoint.config.resume_changes)[-KEPT_CHANGES:]
    return ResumedSettings(recorded_model, now, recorded, tuple(changes), earlier)


def _refusal(name: str, old: object, new: object, came: Given, where: Path) -> ConfigError:
    key = name.split(".", 1)[1]
    if came.from_preset:
        culprit = "--preset"
    elif came.source.startswith("--"):
        culprit = came.source
    else:
        culprit = f"{key} from {came.source}"
    hint = (f"a resumed run keeps the settings it was started with: leave out {culprit}, or "
            "start a new run with another --out (docs/training.md: what may change on resume)")
    if key in EXTENDABLE and not came.from_preset:
        hint = (f"a resumed run's budget can be extended, not shortened: give at least {old}, "
                "or start a new run with another --out")
    return ConfigError(f"{name} is {old!r} in the run being resumed ({where}), but "
                       f"{came.source} gives {new!r}", hint=hint)


def _recorded_train(checkpoint: Checkpoint) -> TrainConfig:
    """The checkpoint's [train] table, or one line naming the field and the rule."""
    where = checkpoint.path / CONFIG_FILE
    table = checkpoint.config.train
    if table is None:
        raise CheckpointError(f"config.json records no [train] table, in {where}",
                              hint="a resumed run needs the values it was started with; "
                                   "this config.json was not written by `fragment train`")
    try:
        return TrainConfig.model_validate(table)
    except ValidationError as exc:
        raise table_refusal("train", exc, where) from None

