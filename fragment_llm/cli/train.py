"""`fragment train`: presets, --config and flags layered into the run's settings, the
live display, and the summary (a table, or JSON with --json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.table import Table

    from fragment_llm.cli.display import TrainDisplay
    from fragment_llm.config import GivenSettings, ModelConfig, TrainConfig
    from fragment_llm.train.run import TrainSummary

from fragment_llm.cli.common import (
    DEFAULT_CHECKPOINTS,
    DEFAULT_PROCESSED,
    DEFAULT_TOKENIZER,
    EXIT_INTERRUPTED,
    FLAGS,
    Decorated,
    FlagValue,
    FragmentCommand,
    config_option,
    format_number,
    json_option,
    show,
)
from fragment_llm.safety.signals import Terminated

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class Duration(click.ParamType):
    """`90s`, `10m`, `2h`, `1.5h` or plain seconds -> seconds (float)."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        from fragment_llm.config import parse_duration

        if isinstance(value, (int, float)):
            return float(value)
        seconds = parse_duration(str(value))
        if seconds is None:
            self.fail(f"{value!r} is not a duration like 90s, 10m or 2h, more than 0 and "
                      "at most 1e8 s (3 years)", param, ctx)
        return seconds


class ByteSize(click.ParamType):
    """`512M`, `4G`, `4GiB` or plain bytes -> bytes (int)."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1] if text and text[-1] in _SIZE_UNITS else ""
        try:
            return int(float(text[:-1] if unit else text) * _SIZE_UNITS[unit])
        except (ValueError, OverflowError):  # OverflowError: inf, 1e400
            self.fail(f"{value!r} is not a size like 512M or 4G", param, ctx)


def _train_configs(preset: str | None, config_path: Path | None,
                   train_flags: dict[str, FlagValue]
                   ) -> tuple[ModelConfig, TrainConfig, GivenSettings]:
    """Layer preset < config file < flags for the [model] and [train] tables, and say
    which keys were chosen (not defaults): a resumed run is checked against those."""
    from fragment_llm.config import (
        DEFAULT_PRESET,
        MODEL_PRESETS,
        TRAIN_PRESETS,
        GivenSettings,
        ModelConfig,
        TrainConfig,
        read_config_file,
        resolve,
    )

    tables = read_config_file(config_path) if config_path is not None else {}
    name = preset or DEFAULT_PRESET
    model = resolve(ModelConfig, "model", tables, config_path, {}, base=MODEL_PRESETS[name])
    train = resolve(TrainConfig, "train", tables, config_path, train_flags,
                    base=TRAIN_PRESETS[name])
    spelled = {param.name: param for param in click.get_current_context().command.params}
    flags = {key: _flag_name(spelled[key], value) for key, value in train_flags.items()
             if value is not None}
    return model, train, GivenSettings.collect(preset, tables, config_path, flags)


def _model_of(checkpoint: Path) -> ModelConfig:
    from fragment_llm.checkpoint.load import open_checkpoint
    from fragment_llm.checkpoint.trained import checkpoint_model_config

    return checkpoint_model_config(open_checkpoint(checkpoint))


def _flag_name(param: click.Option, value: FlagValue) -> str:
    """The flag as the user typed it: `--max-time` for max_time_s, `--no-compile`."""
    return param.secondary_opts[0] if value is False and param.secondary_opts else param.opts[0]


def training_options(func: Decorated) -> Decorated:
    """The [train] flags `train` and `finetune` share: budget, batch, optimiser, cadence,
    device and memory."""
    int_at_least = click.IntRange
    options = [
        click.option("--max-steps", type=int_at_least(min=1), help="Optimizer steps planned."),
        click.option("--max-time", "max_time_s", type=Duration(),
                     help="Stop after this much training time (90s, 10m, 2h); the lr "
                          "schedule ends with it."),
        click.option("--epochs", type=click.FloatRange(min=0, min_open=True),
                     help="Passes over the training split (sets the steps planned)."),
        click.option("--batch-size", type=int_at_least(min=1), help="Sequences per micro-step."),
        click.option("--grad-accum", type=int_at_least(min=1), help="Micro-steps per step."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True),
                     help="Peak learning rate."),
        click.option("--seed", type=int_at_least(min=0), help="Seed for weights and data order."),
        click.option("--checkpoint-every", type=int_at_least(min=0),
                     help="Steps between checkpoints."),
        click.option("--eval-every", type=int_at_least(min=0), help="Steps between evaluations."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                     help="auto: bf16/fp16 on CUDA, fp32 on CPU."),
        click.option("--compile/--no-compile", "compile", default=None,
                     help="torch.compile the model (optional)."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]),
                     help="auto: CUDA, then MPS, then CPU."),
        click.option("--activation-checkpointing", is_flag=True, default=None,
                     help="Recompute activations to fit a larger model in less memory."),
        click.option("--max-memory", type=ByteSize(), help="Refuse plans above this (e.g. 4G)."),
        click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True),
                     help="Share of documents (or conversations) held out for validation."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command(cls=FragmentCommand)
@click.option("--data", type=click.Path(path_type=Path, file_okay=False),
              default=DEFAULT_PROCESSED, show_default=True, help="Processed folder.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              default=DEFAULT_TOKENIZER, show_default=True, help="Tokenizer file.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              default=DEFAULT_CHECKPOINTS, show_default=True,
              help="Run folder: checkpoints, metrics.jsonl.")
@click.option("--preset", type=click.Choice(["tiny", "small", "base"]),
              help="Model + training preset [small]; see docs/model.md.")
@config_option
@training_options
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its latest valid checkpoint, with the "
                   "settings it recorded.")
@click.option("--init-from", type=click.Path(path_type=Path),
              help="Start a new run from this checkpoint's weights (continued pretraining "
                   "on new text): same model and tokenizer, fresh optimizer and schedule.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan, a timing probe and the estimated training time, then exit.")
@json_option('"steps", "val_bpb", "checkpoint", "plan", ...')
def train(data: Path, tokenizer_path: Path, out: Path, preset: str | None,
          config_path: Path | None, resume: bool, init_from: Path | None, dry_run: bool,
          as_json: bool, **flags: FlagValue) -> int:
    """Train a GPT on the processed corpus; checkpoints go to --out.

    \b
    Tokenizes data/processed once with the tokenizer (cached in data/tokens/ while
    both are unchanged), then trains: small (the default) with Muon for the blocks'
    matrices, AdamW for the rest and warmup-stable-decay; tiny and base with AdamW
    and warmup + cosine; gradient accumulation and clipping. Every
    --checkpoint-every steps a checkpoint folder OUT/step-NNNNNNN/ is written
    atomically (safetensors + JSON, sha256 manifest). Ctrl-C finishes the step,
    checkpoints and exits 130 (SIGTERM: the same, exit 143); --resume continues
    exactly where the newest valid checkpoint left off, with the run's recorded
    settings: a flag given with it must agree, except a larger --max-steps or
    --max-time and the cadence flags (docs/training.md has the list).

    \b
    Layering: --preset values < the [model]/[train] tables of --config < flags.
    Several processes: torchrun --nproc_per_node=2 -m fragment_llm train ...

    \b
    Examples:
      fragment train --preset tiny                 # quick start, about a minute
      fragment train --max-time 10m                # small preset, ten minutes
      fragment train --resume                      # continue checkpoints/
      fragment train --preset base --dry-run       # memory and speed plan only
      fragment train --init-from checkpoints --data other/processed --out runs/more
    """
    from fragment_llm.cli.display import TrainDisplay
    from fragment_llm.train.run import TrainRequest, run_training
    from fragment_llm.train.runtime import keep_freed_memory

    keep_freed_memory()  # ~25% faster CPU steps; this process exists to train
    if init_from is not None and resume:
        raise click.UsageError("--init-from starts a new run and --resume continues one: "
                               "give one of them")
    model_config, train_config, given = _train_configs(preset, config_path, flags)
    if init_from is not None and not given.model:
        model_config = _model_of(init_from)  # the checkpoint's model, not a preset's
    request = TrainRequest(data=data, tokenizer=tokenizer_path, out=out, model=model_config,
                           train=train_config, resume=resume, given=given, init_from=init_from)
    with TrainDisplay(not FLAGS.quiet, train_config.max_steps) as display:
        summary = run_training(request, display, dry_run=dry_run)
    if summary.terminated:  # one line and exit 143, like any verb stopped by SIGTERM
        raise Terminated(f"checkpoint saved at {summary.checkpoint}; --resume continues")
    if as_json:
        click.echo(json.dumps(summary_as_json(summary, display, dry_run)))
    else:
        show(summary_for_display(summary, display, dry_run))
    return EXIT_INTERRUPTED if summary.interrupted else 0


def summary_for_display(summary: TrainSummary, display: TrainDisplay, dry_run: bool) -> Table:
    from fragment_llm.cli.display import summary_table

    plan = display.plan
    rows: list[tuple[str, object]] = [
        ("parameters", f"{plan.get('parameters', summary.parameters):,}"),
        ("device / precision", f"{plan.get('device')} / {plan.get('precision')}"),
        ("estimated peak memory", f"{int(plan.get('memory_bytes', 0)) / 2**20:,.0f} MiB"),
        ("tokens per step", f"{plan.get('tokens_per_step', 0):,}"),
        ("train / val tokens", f"{plan.get('train_tokens', 0):,} / {plan.get('val_tokens', 0):,}"),
    ]
    if dry_run:
        rows += [("seconds per step (probe)", f"{display.probe:.3f}"),
                 ("estimated training time", _planned_time(display))]
        return summary_table("Training plan (dry run)", rows)
    rows += [("steps", summary.steps), ("tokens", f"{summary.tokens:,}"),
             ("time", f"{summary.seconds:,.1f} s"),
             ("final train loss", format_number(summary.final_train_loss)),
             ("val loss", format_number(summary.val_loss)),
             ("val bits/byte", format_number(summary.val_bpb)),
             ("checkpoint", summary.checkpoint or "-")]
    title = "Training interrupted (checkpoint saved)" if summary.interrupted else "Training done"
    return summary_table(title, rows)


def summary_as_json(summary: TrainSummary, display: TrainDisplay,
                    dry_run: bool) -> dict[str, Any]:
    """`fragment train --json`: the summary's fields and the plan; no NaN or inf (not JSON)."""
    from dataclasses import asdict

    def finite(value: object) -> object:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    plan = {key: finite(value) for key, value in display.plan.items()}
    if dry_run:  # nothing was trained: the plan and the probe are the result
        return {"out": str(summary.out), "dry_run": True, "parameters": summary.parameters,
                "plan": plan, "seconds_per_step_probe": finite(display.probe),
                "estimated_training_seconds": finite(display.planned().eta_s)}
    values = {**asdict(summary), "out": str(summary.out), "dry_run": False,
              "checkpoint": None if summary.checkpoint is None else str(summary.checkpoint),
              "plan": plan}
    return {key: finite(value) for key, value in values.items()}


def _planned_time(display: TrainDisplay) -> str:
    """`0:54:10 (3,000 steps)`, or `0:03:00 (~166 steps; --max-time ends it)`: whichever
    bound ends the run first, at the probe's speed (training time only)."""
    from fragment_llm.cli.display import clock

    budget, step = display.planned(), int(display.plan.get("step", 0))
    steps = f"{budget.steps - step:,} steps" + (f" from step {step:,}" if step else "")
    if budget.bound == "time":
        return f"{clock(budget.eta_s)} (~{steps}; --max-time ends it)"
    return f"{clock(budget.eta_s)} ({steps})"
