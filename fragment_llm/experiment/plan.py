"""An experiment plan: a TOML file naming a base config, a budget, seeds and the runs to
compare, validated into one `Training` per run and seed before anything trains.

    preset = "small"                 # optional, as `fragment train --preset`
    base = "base.toml"               # or [base.model] / [base.train] tables
    seeds = [1, 2, 3]
    [budget]
    max_time = "10m"                 # and/or max_steps = 500
    [grid]                           # or [[runs]] tables, each with a name
    train.lr = [1e-3, 2e-3]

Every run's [model] and [train] are layered preset < base < the run's overrides < the
budget and seed, and validated by the same `ModelConfig`/`TrainConfig` as `fragment
train --config`, so a refusal names the plan file, the run and the field. A plan is
hostile input: paths must stay inside the plan's folder, run names are plain folder
names, and the number of runs and seeds is capped before a grid is expanded. This
module reads and checks plans; running them is runner.py's.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from fragment_llm.config import (
    DEFAULT_PRESET,
    MODEL_PRESETS,
    TRAIN_PRESETS,
    ModelConfig,
    TrainConfig,
    parse_duration,
    read_config_file,
    read_toml,
    validate_stage,
)
from fragment_llm.errors import ConfigError
from fragment_llm.safety.text import escape_for_display

MAX_RUNS = 64  # configurations in a plan (a grid's product included)
MAX_SEEDS = 10
MAX_TRAININGS = 256  # runs x seeds
MAX_STEPS_CEILING = 100_000_000  # TrainConfig's largest max_steps: a time budget alone
RUN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,63}$"  # a plain folder name: no /, no leading .
# Set by the plan itself, never by an override: the seeds list and the budget.
PLAN_OWNED = {"seed": "seeds", "max_steps": "[budget]", "max_time_s": "[budget]",
              "epochs": "[budget]"}

Key = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Scalar = bool | int | float | Annotated[str, StringConstraints(max_length=256)]
Overrides = Annotated[dict[Key, Scalar], Field(max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Tables(_Strict):
    """[model] and [train] values, as in a `fragment train --config` file."""

    model: Overrides = {}
    train: Overrides = {}


class RunSpec(Tables):
    """One `[[runs]]` table: a name and its overrides of the base."""

    name: Annotated[str, StringConstraints(pattern=RUN_NAME)]


Values = Annotated[list[Scalar], Field(min_length=1, max_length=MAX_RUNS)]


class GridSpec(_Strict):
    """`[grid]`: each key's list of values; the runs are their cartesian product."""

    model: Annotated[dict[Key, Values], Field(max_length=16)] = {}
    train: Annotated[dict[Key, Values], Field(max_length=16)] = {}


class Budget(_Strict):
    """How long each run trains: `max_time` ("10m", or seconds), `max_steps`, or both
    (whichever comes first; the lr schedule ends with it)."""

    max_time: str | float | None = None
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS_CEILING)


class PlanFile(_Strict):
    description: str | None = Field(None, max_length=1000)
    preset: Literal["tiny", "small", "base"] | None = None
    base: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | Tables | None = None
    data: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    tokenizer: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    budget: Budget
    seeds: Annotated[list[Annotated[int, Field(ge=0, le=2**63 - 1)]],
                     Field(min_length=1, max_length=MAX_SEEDS)]
    runs: Annotated[list[RunSpec], Field(min_length=1, max_length=MAX_RUNS)] | None = None
    grid: GridSpec | None = None


@dataclass(frozen=True)
class PlannedRun:
    """One configuration of the plan: its name, what it changes, and its validated
    configs (the [train] one at the plan's first seed)."""

    name: str
    overrides: dict[str, Scalar]  # {"train.lr": 0.002}: what sets it apart from the base
    model: ModelConfig
    train: TrainConfig

    @property
    def label(self) -> str:
        """`train.lr=0.002 model.mlp=gelu`, or `base` for a run that changes nothing."""
        return " ".join(f"{key}={_shown(value)}" for key, value in self.overrides.items()) \
            or "base"


@dataclass(frozen=True)
class Training:
    """One run at one seed: an ordinary `fragment train` into `<out>/<run>/seed-<n>/`."""

    run: PlannedRun
    seed: int

    def folder(self, out: Path) -> Path:
        return out / self.run.name / f"seed-{self.seed}"

    @property
    def train(self) -> TrainConfig:
        return self.run.train.model_copy(update={"seed": self.seed})

    def config_toml(self) -> str:
        """The run's whole [model] and [train] tables as a `--config` file (None values,
        which TOML cannot say, are the defaults and left out)."""
        tables = {"model": self.run.model.model_dump(mode="json"),
                  "train": self.train.model_dump(mode="json")}
        lines = []
        for table, values in tables.items():
            lines.append(f"[{table}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()
                      if value is not None]
        text = "\n".join(lines) + "\n"
        assert tomllib.loads(text) == {t: {k: v for k, v in vs.items() if v is not None}
                                       for t, vs in tables.items()}
        return text


@dataclass(frozen=True)
class Plan:
    path: Path
    description: str | None
    runs: tuple[PlannedRun, ...]
    seeds: tuple[int, ...]
    max_steps: int | None
    max_time_s: float | None
    data: Path | None  # resolved against the plan's folder; None: the CLI's default
    tokenizer: Path | None

    @classmethod
    def load(cls, path: Path) -> Plan:
        """Read and validate a plan; every refusal is one line naming `path` and the field."""
        spec = _validated_file(path, read_toml(path))
        max_time_s = _budget_seconds(spec.budget, path)
        base = _base_tables(spec.base, path)
        preset = spec.preset or DEFAULT_PRESET
        runs = tuple(_planned_run(name, overrides, preset, base, spec, max_time_s, path)
                     for name, overrides in _run_specs(spec, path))
        names = [run.name.lower() for run in runs]  # one folder on a case-blind disk
        if len(set(names)) != len(names):
            twice = next(run.name for run in runs if names.count(run.name.lower()) > 1)
            raise ConfigError(f"run name {twice!r} appears twice, in {path}",
                              hint="each run needs its own name (case aside): it is its folder")
        if len(set(spec.seeds)) != len(spec.seeds):
            raise ConfigError(f"seeds repeat a seed ({spec.seeds}), in {path}",
                              hint="a seed is a folder of each run: list each once")
        if len(runs) * len(spec.seeds) > MAX_TRAININGS:
            raise ConfigError(f"{len(runs)} runs x {len(spec.seeds)} seeds is more than "
                              f"{MAX_TRAININGS} trainings, in {path}",
                              hint="split the plan, or use fewer seeds")
        return cls(path, spec.description, runs, tuple(spec.seeds), spec.budget.max_steps,
                   max_time_s, _inside(spec.data, path, "data"),
                   _inside(spec.tokenizer, path, "tokenizer"))

    @property
    def budget(self) -> str:
        """`10m`, `90s`, `500 steps`, or `10m or 500 steps`."""
        parts = []
        if self.max_time_s is not None:
            seconds = self.max_time_s
            parts.append(f"{seconds:g}s" if seconds < 60 else f"{seconds / 60:g}m"
                         if seconds < 3600 else f"{seconds / 3600:g}h")
        if self.max_steps is not None:
            parts.append(f"{self.max_steps:,} steps")
        return " or ".join(parts)

    def trainings(self) -> list[Training]:
        """Each run over every seed, run by run, in the plan's order."""
        return [Training(run, seed) for run in self.runs for seed in self.seeds]


# ----------------------------------------------------------------------------- reading


def _validated_file(path: Path, doc: dict[str, Any]) -> PlanFile:
    try:
        spec = PlanFile.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(escape_for_display(str(part), 64) for part in first["loc"]) or "plan"
        if first["type"] == "extra_forbidden":
            raise ConfigError(f"unknown plan key {where}, in {path}",
                              hint=f"known keys: {', '.join(PlanFile.model_fields)}; a run's "
                                   "keys: name, model, train") from None
        shown = escape_for_display(repr(first.get("input")), 80)
        raise ConfigError(f"invalid plan field {where} = {shown}: {first['msg']}, in {path}",
                          hint="docs/experiment.md describes the plan format") from None
    if (spec.runs is None) == (spec.grid is None):
        raise ConfigError(f"a plan needs [[runs]] or [grid] (one of them), in {path}",
                          hint="[[runs]] names each run; [grid] tries every combination")
    return spec


def _budget_seconds(budget: Budget, path: Path) -> float | None:
    if budget.max_time is None and budget.max_steps is None:
        raise ConfigError(f"[budget] needs max_time or max_steps, in {path}",
                          hint='e.g. max_time = "10m": every run trains that long')
    if budget.max_time is None:
        return None
    seconds = parse_duration(str(budget.max_time))
    if seconds is None:
        shown = escape_for_display(repr(budget.max_time), 80)
        raise ConfigError(f"invalid budget.max_time = {shown}: not a duration like 90s, 10m "
                          f"or 2h in (0, 1e8] s, in {path}")
    return seconds


def _inside(relative: str | None, plan: Path, field: str) -> Path | None:
    """A path the plan names, relative to its folder and staying inside it (symlinks
    resolved): a plan from elsewhere cannot point a run at /etc or ~/.ssh."""
    if relative is None:
        return None
    folder = plan.resolve().parent
    target = (folder / relative).resolve()
    if Path(relative).is_absolute() or not target.is_relative_to(folder):
        raise ConfigError(f"plan field {field} = {escape_for_display(relative, 80)} leaves the "
                          f"plan's folder {folder}, in {plan}",
                          hint=f"name a path relative to the plan, inside its folder, or "
                               f"pass --{field} on the command line")
    return target


def _base_tables(base: str | Tables | None, path: Path) -> tuple[str, Tables]:
    """The base [model]/[train] tables and where they came from (for refusals)."""
    if base is None:
        return "", Tables()
    if isinstance(base, Tables):
        return f"{path} [base]", base
    file = _inside(base, path, "base")
    assert file is not None
    try:
        tables = read_config_file(file)
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} (the base of {path})", hint=exc.hint) from None
    extra = sorted(set(tables) - {"model", "train"})
    if extra:
        raise ConfigError(f"base config {file} has a [{extra[0]}] table, in {path}",
                          hint="a plan's base holds [model] and [train] only")
    return str(file), Tables.model_validate({"model": tables.get("model", {}),
                                             "train": tables.get("train", {})})


def _run_specs(spec: PlanFile, path: Path) -> list[tuple[str, dict[str, Scalar]]]:
    """(name, {"table.key": value}) for each run: the [[runs]] as listed, or the grid's
    cartesian product, refused before it is expanded if larger than `MAX_RUNS`."""
    if spec.runs is not None:
        return [(run.name, {**{f"model.{k}": v for k, v in run.model.items()},
                            **{f"train.{k}": v for k, v in run.train.items()}})
                for run in spec.runs]
    assert spec.grid is not None
    axes = {**{f"model.{k}": v for k, v in spec.grid.model.items()},
            **{f"train.{k}": v for k, v in spec.grid.train.items()}}
    if not axes:
        raise ConfigError(f"[grid] names no key, in {path}",
                          hint="e.g. [grid] train.lr = [1e-3, 2e-3]")
    count = math.prod(len(values) for values in axes.values())
    if count > MAX_RUNS:
        raise ConfigError(f"[grid] makes {count:,} runs, more than {MAX_RUNS}, in {path}",
                          hint="fewer values per key, or several plans")
    specs = []
    for combination in itertools.product(*axes.values()):
        overrides = dict(zip(axes, combination, strict=True))
        name = "+".join(f"{key.split('.', 1)[1]}={_shown(value)}"
                        for key, value in overrides.items())
        if not re.fullmatch(RUN_NAME, name):
            raise ConfigError(f"[grid] run name {escape_for_display(name, 80)} is not a plain "
                              f"folder name, in {path}",
                              hint="use [[runs]] with a name for each, or simpler values")
        specs.append((name, overrides))
    return specs


def _planned_run(name: str, overrides: dict[str, Scalar], preset: str,
                 base: tuple[str, Tables], spec: PlanFile, max_time_s: float | None,
                 path: Path) -> PlannedRun:
    """Layer preset < base < the run's overrides < budget, and validate each table."""
    base_source, base_tables = base
    where = f"{path} run {name!r}"
    configs = {}
    for table, stage, presets in (("model", ModelConfig, MODEL_PRESETS),
                                  ("train", TrainConfig, TRAIN_PRESETS)):
        values = dict(presets[preset])
        sources = dict.fromkeys(values, f"preset {preset}")
        layers = ((base_source, getattr(base_tables, table)),
                  (where, {key.split(".", 1)[1]: value for key, value in overrides.items()
                           if key.startswith(f"{table}.")}))
        for source, layer in layers:
            _refuse_plan_owned(table, layer, source)
            values.update(layer)
            sources.update(dict.fromkeys(layer, source))
        if table == "train":
            values.update(_budget_values(spec, max_time_s), seed=spec.seeds[0])
        configs[table] = validate_stage(stage, table, values, sources)
    return PlannedRun(name, overrides, configs["model"], configs["train"])


def _refuse_plan_owned(table: str, layer: dict[str, Scalar], source: str) -> None:
    owned = [key for key in layer if table == "train" and key in PLAN_OWNED
             or table == "model" and key == "vocab_size"]
    if not owned:
        return
    key = owned[0]
    owner = "the tokenizer" if key == "vocab_size" else f"the plan's {PLAN_OWNED[key]}"
    raise ConfigError(f"{table}.{key} is set by {owner}, not by a run, in {source}",
                      hint=f"leave {key} out of the run's tables")


def _budget_values(spec: PlanFile, max_time_s: float | None) -> dict[str, Any]:
    """A time budget alone lifts max_steps, so that time alone ends every run."""
    return {"max_time_s": max_time_s,
            "max_steps": spec.budget.max_steps or MAX_STEPS_CEILING}


def _shown(value: Scalar) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _toml_value(value: Any) -> str:
    """A scalar as TOML: JSON's strings, numbers and booleans are TOML's too."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{value} cannot be written to a run's config")
    return json.dumps(value)
