"""The `fragment` command line: options in, one library call, a rendered result out.

This is the only place that maps errors to exit codes:
- `FragmentError`      -> `error: <what>, <where>` (+ `hint: ...`) on stderr, exit 1
- click usage errors   -> exit 2
- Ctrl-C               -> exit 130
- a closed stdout      -> exit 1, silently (click's own EPIPE handling): `... | head -1`
- SIGTERM              -> `terminated` (+ what was saved) on stderr, exit 143: it raises
                          `signals.Terminated`, so staged outputs and pools clean up first
- anything else        -> one "internal error" line and the path of a saved traceback
                          (the traceback itself with `--debug`), exit 70
Stage modules are imported inside each command so `fragment --help` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from fragment_llm import __version__
from fragment_llm.errors import FragmentError
from fragment_llm.safety.signals import Terminated, signals_as_exceptions

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a SIGTERM'd job

DEFAULT_RAW = Path("data/raw")
DEFAULT_PROCESSED = Path("data/processed")
DEFAULT_TOKENIZER = Path("data/tokenizer.json")
DEFAULT_CHECKPOINTS = Path("checkpoints")
DEFAULT_TOKENS = Path("data/tokens")


@dataclass
class Flags:
    """Global flags, kept where the error handler can see them after click has unwound."""

    debug: bool = False
    quiet: bool = False


FLAGS = Flags()


def _echo_error(message: str, hint: str | None = None) -> None:
    from fragment_llm.cli.display import safe

    click.echo(f"error: {safe(message)}", err=True)
    if hint:
        click.echo(f"hint: {safe(hint)}", err=True)


def _report_internal_error(exc: BaseException) -> None:
    from fragment_llm.cli.display import safe

    text = "".join(traceback.format_exception(exc))
    if FLAGS.debug:
        click.echo(safe(text, max_chars=100_000).replace("\\x0a", "\n"), err=True)
        click.echo(f"internal error: {safe(type(exc).__name__)}: {safe(exc)}", err=True)
        return
    fd, path = tempfile.mkstemp(prefix="fragment-crash-", suffix=".txt")
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(text)
    click.echo(f"internal error: {safe(type(exc).__name__)}: {safe(exc, 200)} "
               f"(traceback saved to {path}; rerun with --debug to print it)", err=True)


def _echo_click_error(exc: click.ClickException) -> None:
    """click's own report (usage line, help hint, message), every line escaped like a
    library error: a message can quote an argument, such as a hostile file name that a
    shell glob turned into an extra argument."""
    from fragment_llm.cli.display import safe

    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        exc.show()  # `fragment` alone: our own help text, not an error message
        return
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        for line in ctx.get_usage().splitlines():
            click.echo(safe(line), err=True)
        if ctx.command.get_help_option(ctx) is not None:
            option = max(ctx.command.get_help_option_names(ctx), key=len)
            click.echo(safe(f"Try '{ctx.command_path} {option}' for help."), err=True)
        click.echo(err=True)
    click.echo(f"Error: {safe(exc.format_message())}", err=True)


DEBUG_HELP = "Print full tracebacks for internal errors."
QUIET_HELP = "No progress bars or summaries; errors only."


def _set_global_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:  # given after the verb; the group already set what came before it
        setattr(FLAGS, str(param.name), True)


class FragmentCommand(click.Command):
    """A verb that also takes the global flags after its name: `fragment chat -q` is
    `fragment -q chat`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True,
                         callback=_set_global_flag, help=DEBUG_HELP),
            click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, is_eager=True,
                         callback=_set_global_flag, help=QUIET_HELP),
        ]


class FragmentGroup(click.Group):
    """A click group whose `main` owns the error-to-exit-code mapping."""

    command_class = FragmentCommand

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Any, prog_name: str | None, complete_var: str | None,
             **extra: Any) -> int:
        try:
            with signals_as_exceptions():
                result = super().main(args, prog_name, complete_var, standalone_mode=False,
                                      **extra)
            return result if isinstance(result, int) else 0
        except click.exceptions.Exit as exc:
            return exc.exit_code
        except click.ClickException as exc:
            _echo_click_error(exc)
            return exc.exit_code
        except (KeyboardInterrupt, click.exceptions.Abort):
            click.echo("interrupted", err=True)
            return EXIT_INTERRUPTED
        except Terminated as exc:
            from fragment_llm.cli.display import safe

            click.echo(f"terminated: {safe(exc)}" if str(exc) else "terminated", err=True)
            return EXIT_TERMINATED
        except FragmentError as exc:
            _echo_error(exc.message, exc.hint)
            return EXIT_ERROR
        except Exception as exc:  # the last line of defence: never a raw traceback
            _report_internal_error(exc)
            return EXIT_INTERNAL


@click.group(cls=FragmentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fragment")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
@click.option("--quiet", "-q", is_flag=True, help=QUIET_HELP)
def cli(debug: bool, quiet: bool) -> None:
    """Fragment LLM: train a small GPT on your own text, safely, on a small machine.

    \b
    The pipeline, each verb reading what the previous one wrote:
      fragment preprocess        data/raw/        -> data/processed/
      fragment train-tokenizer   data/processed/  -> data/tokenizer.json
      fragment train             data/processed/  -> checkpoints/
      fragment chat              checkpoints/     -> your terminal

    Every verb validates what it is given and refuses bad input with one line
    naming the file or field and the rule broken. Run `fragment VERB --help`.
    """
    FLAGS.debug = debug
    FLAGS.quiet = quiet


def config_option(func: Any) -> Any:
    return click.option(
        "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
        help="TOML file with a table per stage ([preprocess], [tokenizer], ...); "
             "command-line flags override it.")(func)


def json_option(keys: str) -> Any:
    """`--json`: the summary as one JSON object on stdout, instead of the table on stderr."""
    return click.option("--json", "as_json", is_flag=True,
                        help=f"Print the summary as one JSON object ({keys}) on stdout.")


def _show(*renderables: Any) -> None:
    if FLAGS.quiet:
        return
    from fragment_llm.cli.display import err_console

    for item in renderables:
        err_console.print(item)


# ------------------------------------------------------------------------- preprocess


@cli.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=DEFAULT_PROCESSED,
              show_default=True, help="Folder for Parquet shards and manifest.json.")
@config_option
@click.option("--text-field", help="JSONL key / Parquet column holding the text [text].")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--invalid-utf8", type=click.Choice(["reject", "replace"]),
              help="Reject files with invalid UTF-8 [reject], or replace bad bytes with U+FFFD.")
@click.option("--max-file-bytes", type=click.IntRange(min=1), help="Per-file size cap [64 MiB].")
@click.option("--max-total-bytes", type=click.IntRange(min=1), help="Total input cap [64 GiB].")
@click.option("--min-doc-chars", type=click.IntRange(min=1),
              help="Drop cleaned documents shorter than this [16].")
@click.option("--max-doc-chars", type=click.IntRange(min=1),
              help="Drop documents longer than this [16,000,000].")
@click.option("--workers", type=click.IntRange(1, 256), help="Reading/cleaning processes [2].")
@json_option('"out", "counts", "shards", "seconds", "problems"')
def preprocess(inputs: tuple[Path, ...], out: Path, config_path: Path | None, as_json: bool,
               **flags: Any) -> None:
    """Validate, clean and shard raw text into data/processed/.

    \b
    INPUTS are files or folders (default: data/raw), searched recursively in a
    fixed order for .txt, .md, .jsonl and .parquet files; anything else is
    skipped and reported. Symlinks leaving an input folder, FIFOs, devices,
    binary files, invalid UTF-8 and oversized or malformed records are rejected
    with a reason code in the manifest. Text is normalised (newlines, NFC),
    stripped of control, bidi and zero-width characters, and deduplicated.

    \b
    Output: OUT/shard-00000.parquet ... (columns text, source, sha256) and
    OUT/manifest.json, built in a temporary folder and renamed into place only
    when complete: a failed run never damages an earlier result.

    \b
    Examples:
      fragment preprocess                         # data/raw -> data/processed
      fragment preprocess books/ notes.jsonl --out data/mine --overwrite
    """
    from fragment_llm.cli.display import listing_table, progress_bars, summary_table
    from fragment_llm.config import PreprocessConfig, load_stage_config
    from fragment_llm.data.preprocess import run_preprocess

    overwrite = flags.pop("overwrite")
    config = load_stage_config(PreprocessConfig, "preprocess", config_path, flags)
    with progress_bars(not FLAGS.quiet) as progress:
        report = run_preprocess(list(inputs) or [DEFAULT_RAW], out, config,
                                overwrite=overwrite, progress=progress)
    if as_json:
        click.echo(json.dumps(report.as_json()))
        return
    problems = report.problem_rows()
    if problems:
        _show(listing_table("Files not used", ("file", "status", "reason"), problems))
    _show(summary_table("Preprocess summary", report.summary_rows()))


# -------------------------------------------------------------------- train-tokenizer


@cli.command("train-tokenizer")
@click.option("--data", type=click.Path(path_type=Path, file_okay=False),
              default=DEFAULT_PROCESSED, show_default=True,
              help="Processed folder written by `fragment preprocess`.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              default=DEFAULT_TOKENIZER, show_default=True, help="Tokenizer file to write.")
@config_option
@click.option("--vocab-size", type=click.IntRange(262, 1 << 20),
              help="256 bytes + merges + 5 special tokens [16384: the fewest bits per "
                   "byte from a 10-minute run, docs/benchmarks.md].")
@click.option("--pattern", type=click.Choice(["gpt2", "gpt4"]),
              help="Pre-split pattern [gpt4]; a custom regex goes in --config.")
@click.option("--max-chars", type=click.IntRange(min=1),
              help="Train on at most this many characters [all].")
@click.option("--workers", type=click.IntRange(1, 256), help="Counting processes [2].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@json_option('"out", "vocab_size", "merges", "bytes_per_token", "seconds", "sha256", ...')
def train_tokenizer_command(data: Path, out: Path, config_path: Path | None, as_json: bool,
                            **flags: Any) -> None:
    """Train a byte-level BPE tokenizer on data/processed/.

    \b
    Streams the documents, counts pre-split chunks (both cores for large
    corpora), learns merges up to --vocab-size, and writes OUT atomically:
    JSON with the merges, the split pattern, the special tokens
    <|endoftext|> <|system|> <|user|> <|assistant|> <|end|> and the processed
    manifest's sha256. A held-back sample measures bytes per token.

    \b
    Examples:
      fragment train-tokenizer                       # data/processed -> data/tokenizer.json
      fragment train-tokenizer --vocab-size 4096 --out data/tok4k.json --overwrite
    """
    from fragment_llm.cli.display import progress_bars, summary_table
    from fragment_llm.config import TokenizerConfig, load_stage_config
    from fragment_llm.tokenizer.train import check_output, train_tokenizer

    overwrite = flags.pop("overwrite")
    check_output(out, overwrite, data)
    config = load_stage_config(TokenizerConfig, "tokenizer", config_path, flags)
    with progress_bars(not FLAGS.quiet) as progress:
        report = train_tokenizer(data, out, config, overwrite=overwrite, progress=progress)
    if as_json:
        click.echo(json.dumps(report.as_json()))
        return
    _show(summary_table("Tokenizer summary", report.summary_rows()))


@cli.command("export-tokenizer")
@click.option("--format", "fmt", type=click.Choice(["hf"]), default="hf", show_default=True,
              help="hf: a Hugging Face `tokenizers` tokenizer.json.")
@click.option("--in", "source", type=click.Path(path_type=Path, dir_okay=False),
              default=DEFAULT_TOKENIZER, show_default=True, help="Tokenizer file to export.")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="File to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def export_tokenizer_command(fmt: str, source: Path, out: Path, overwrite: bool) -> None:
    """Export a tokenizer for other tools.

    \b
    The HF file loads with tokenizers.Tokenizer.from_file and encodes text to
    the same ids (set encode_special_tokens = True on it to keep special-token
    text as text, as fragment does).

    \b
    Example:
      fragment export-tokenizer --format hf --out tokenizer-hf.json
    """
    from fragment_llm.cli.display import summary_table
    from fragment_llm.export.hf_tokenizer import export_tokenizer

    report = export_tokenizer(source, out, fmt=fmt, overwrite=overwrite)
    _show(summary_table("Export summary", report.summary_rows()))


# ------------------------------------------------------------------------------ train

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class Duration(click.ParamType):
    """`90s`, `10m`, `2h`, `1.5h` or plain seconds -> seconds (float)."""

    name = "duration"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        unit = text[-1] if text and text[-1] in _DURATION_UNITS else "s"
        number = text[:-1] if text and text[-1] in _DURATION_UNITS else text
        try:
            seconds = float(number) * _DURATION_UNITS[unit]
        except ValueError:
            self.fail(f"{value!r} is not a duration like 90s, 10m or 2h", param, ctx)
        if not 0 < seconds <= 1e8:  # NaN fails too
            self.fail(f"{value!r} must be more than 0 and at most 1e8 s (3 years)", param, ctx)
        return seconds


class ByteSize(click.ParamType):
    """`512M`, `4G`, `4GiB` or plain bytes -> bytes (int)."""

    name = "size"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        unit = text[-1] if text and text[-1] in _SIZE_UNITS else ""
        try:
            return int(float(text[:-1] if unit else text) * _SIZE_UNITS[unit])
        except (ValueError, OverflowError):  # OverflowError: inf, 1e400
            self.fail(f"{value!r} is not a size like 512M or 4G", param, ctx)


def _train_configs(preset: str | None, config_path: Path | None,
                   train_flags: dict[str, Any]) -> tuple[Any, Any, Any]:
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


def _flag_name(param: Any, value: Any) -> str:
    """The flag as the user typed it: `--max-time` for max_time_s, `--no-compile`."""
    return param.secondary_opts[0] if value is False and param.secondary_opts else param.opts[0]


@cli.command()
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
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps planned.")
@click.option("--max-time", "max_time_s", type=Duration(),
              help="Stop after this much training time (90s, 10m, 2h); the lr schedule "
                   "ends with it.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Sequences per micro-step.")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Micro-steps per step.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for weights and data order.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), help="Steps between checkpoints.")
@click.option("--eval-every", type=click.IntRange(min=0), help="Steps between evaluations.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="auto: bf16/fp16 on CUDA, fp32 on CPU.")
@click.option("--compile/--no-compile", "compile", default=None,
              help="torch.compile the model (optional).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]),
              help="auto: CUDA, then MPS, then CPU.")
@click.option("--activation-checkpointing", is_flag=True, default=None,
              help="Recompute activations to fit a larger model in less memory.")
@click.option("--max-memory", type=ByteSize(), help="Refuse plans above this (e.g. 4G).")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True),
              help="Documents held out for validation.")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its latest valid checkpoint, with the "
                   "settings it recorded.")
@click.option("--dry-run", is_flag=True,
              help="Print the plan, a timing probe and the estimated training time, then exit.")
@json_option('"steps", "val_bpb", "checkpoint", "plan", ...')
def train(data: Path, tokenizer_path: Path, out: Path, preset: str | None,
          config_path: Path | None, resume: bool, dry_run: bool, as_json: bool,
          **flags: Any) -> int:
    """Train a GPT on the processed corpus; checkpoints go to --out.

    \b
    Tokenizes data/processed once with the tokenizer (cached in data/tokens/ while
    both are unchanged), then trains with AdamW, warmup + cosine schedule,
    gradient accumulation and clipping. Every --checkpoint-every steps a
    checkpoint folder OUT/step-NNNNNNN/ is written atomically (safetensors +
    JSON, sha256 manifest). Ctrl-C finishes the step, checkpoints and exits 130
    (SIGTERM: the same, exit 143); --resume continues exactly where the newest valid
    checkpoint left off, with the run's recorded settings: a flag given with it must
    agree, except a larger --max-steps or --max-time and the cadence flags
    (docs/training.md has the list).

    \b
    Layering: --preset values < the [model]/[train] tables of --config < flags.
    Several processes: torchrun --nproc_per_node=2 -m fragment_llm train ...

    \b
    Examples:
      fragment train --preset tiny                 # quick start, about a minute
      fragment train --max-time 10m                # small preset, ten minutes
      fragment train --resume                      # continue checkpoints/
      fragment train --preset base --dry-run       # memory and speed plan only
    """
    from fragment_llm.cli.display import TrainDisplay
    from fragment_llm.train.run import TrainRequest, run_training
    from fragment_llm.train.runtime import keep_freed_memory

    keep_freed_memory()  # ~25% faster CPU steps; this process exists to train
    model_config, train_config, given = _train_configs(preset, config_path, flags)
    request = TrainRequest(data=data, tokenizer=tokenizer_path, out=out, model=model_config,
                           train=train_config, resume=resume, given=given)
    with TrainDisplay(not FLAGS.quiet, train_config.max_steps) as display:
        summary = run_training(request, display, dry_run=dry_run)
    if summary.terminated:  # one line and exit 143, like any verb stopped by SIGTERM
        raise Terminated(f"checkpoint saved at {summary.checkpoint}; --resume continues")
    if as_json:
        click.echo(json.dumps(summary_as_json(summary, display, dry_run)))
    else:
        _show(summary_for_display(summary, display, dry_run))
    return EXIT_INTERRUPTED if summary.interrupted else 0


def summary_for_display(summary: Any, display: Any, dry_run: bool) -> Any:
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
             ("final train loss", _fmt(summary.final_train_loss)),
             ("val loss", _fmt(summary.val_loss)), ("val bits/byte", _fmt(summary.val_bpb)),
             ("checkpoint", summary.checkpoint or "-")]
    title = "Training interrupted (checkpoint saved)" if summary.interrupted else "Training done"
    return summary_table(title, rows)


def summary_as_json(summary: Any, display: Any, dry_run: bool) -> dict[str, Any]:
    """`fragment train --json`: the summary's fields and the plan; no NaN or inf (not JSON)."""
    from dataclasses import asdict

    def finite(value: Any) -> Any:
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


def _planned_time(display: Any) -> str:
    """`0:54:10 (3,000 steps)`, or `0:03:00 (~166 steps; --max-time ends it)`: whichever
    bound ends the run first, at the probe's speed (training time only)."""
    from fragment_llm.cli.display import clock

    budget, step = display.planned(), int(display.plan.get("step", 0))
    steps = f"{budget.steps - step:,} steps" + (f" from step {step:,}" if step else "")
    if budget.bound == "time":
        return f"{clock(budget.eta_s)} (~{steps}; --max-time ends it)"
    return f"{clock(budget.eta_s)} ({steps})"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@cli.command(name="eval")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(path_type=Path),
              default=DEFAULT_CHECKPOINTS, show_default=True,
              help="A run folder (its latest valid checkpoint) or one step folder.")
@click.option("--tokens", type=click.Path(path_type=Path, file_okay=False),
              help="The run's token-shard folder, or the tokens/ folder holding it "
                   "[data/tokens].")
@click.option("--data", type=click.Path(path_type=Path, file_okay=False),
              help="Measure the documents of this processed folder instead, from its start.")
@click.option("--max-blocks", type=click.IntRange(min=1),
              help="Evaluate at most this many blocks [the run's final_eval_blocks, 512].")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"loss", "bpb", "tokens", "split", "data"} as JSON.')
def evaluate(checkpoint_path: Path, tokens: Path | None, data: Path | None,
             max_blocks: int | None, as_json: bool) -> None:
    """Report loss and bits per byte of a checkpoint.

    \b
    By default on the run's own held-out split, read from the token shards it was
    trained on (data/tokens/) exactly as training's final evaluation reads it: the
    same blocks, so the same bits per byte as the training summary's "val bits/byte".
    With --data, on the documents of any processed folder from its start instead,
    tokenized with the checkpoint's tokenizer copy; for the training corpus that
    includes text the model learned, so it is not the held-out figure. Bits per byte
    do not depend on the tokenizer, so checkpoints with different vocabularies can be
    compared.

    \b
    Examples:
      fragment eval                                  # checkpoints/, held-out split
      fragment eval --data other/processed --json    # another folder's documents
    """
    from fragment_llm.cli.display import progress_bars, summary_table
    from fragment_llm.evaluate import evaluate_documents, evaluate_held_out

    if tokens is not None and data is not None:
        raise click.UsageError("give --tokens (the held-out split) or --data (every "
                               "document of a processed folder), not both")
    with progress_bars(not FLAGS.quiet) as progress:
        result = (evaluate_documents(checkpoint_path, data, max_blocks, progress) if data
                  else evaluate_held_out(checkpoint_path, tokens or DEFAULT_TOKENS, max_blocks,
                                         progress))
    if as_json:
        click.echo(json.dumps(result.as_json()))
        return
    text = (f"held-out split of {result.data}" if result.split == "val"
            else f"documents of {result.data}, from its start")
    _show(summary_table("Evaluation", [("checkpoint", result.checkpoint),
                                       ("measured on", text),
                                       ("loss (nats/token)", f"{result.loss:.4f}"),
                                       ("bits per byte", f"{result.bpb:.4f}"),
                                       ("tokens", f"{result.tokens:,}")]))


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--processed", type=click.Path(path_type=Path, file_okay=False),
              help="Processed folder to follow the chain to [the data folder's processed/].")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Tokenizer file to follow the chain to [the data folder's tokenizer.json].")
@click.option("--tokens", type=click.Path(path_type=Path, file_okay=False),
              help="Token-shard folder, or the tokens/ folder holding them [data/tokens/].")
@click.option("--strict", is_flag=True,
              help="Exit 1 unless every link of the chain was followed (none not present).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"path", "kind", "ok", "complete", "note", "latest_valid", '
                   '"checks": [...]} as JSON.')
def verify(path: Path, processed: Path | None, tokenizer_path: Path | None,
           tokens: Path | None, strict: bool, as_json: bool) -> None:
    """Check an artifact and the chain of hashes back to its inputs; exit 0 only if all holds.

    \b
    PATH is any artifact the pipeline writes:
      data/processed             manifest, every shard's sha256, every document's
                                 sha256, and the input files it lists (where present)
      data/tokenizer.json        format, then the processed folder it was trained on
      data/tokens/<key>          manifest, shard hashes, token ids, document count,
                                 cache key, then its tokenizer and processed folder
      checkpoints/step-NNNNNNN   manifest, every file's sha256, every value finite,
                                 weight headers against config.json (no model is
                                 built), the memory generate would plan, tokenizer copy
                                 and config against the recorded provenance, then the
                                 tokenizer, token shards and processed folder it names
      checkpoints                every step folder, and which one is the latest valid
    Upstream artifacts are looked for next to PATH (processed/, tokenizer.json and
    tokens/ in one data folder; data/ next to a run folder) or where the options say.
    An absent one is "not present" and the summary says the chain was not verified
    (exit 0; 1 with --strict); a present one with another hash fails. A step folder
    that a running trainer prunes while it is being checked is "removed".

    \b
    Examples:
      fragment verify checkpoints
      fragment verify data/tokenizer.json --processed other/processed
      fragment verify checkpoints --strict         # exit 1 unless every link was followed
      fragment verify checkpoints/step-0000200 --json
    """
    from fragment_llm.cli.display import listing_table
    from fragment_llm.verify import Upstream, describe
    from fragment_llm.verify import verify as run_verify

    report = run_verify(path, Upstream(processed, tokenizer_path, tokens))
    if as_json:
        click.echo(json.dumps(report.as_json()))
    else:
        counts = ", ".join(f"{n} {status}" for status, n in describe(report.checks).items()
                           if n)
        chain = "chain verified" if report.complete and report.ok else "chain NOT verified"
        title = f"fragment verify {path} ({report.kind}): {counts}; {chain}"  # escaped there
        _show(listing_table(title, ["artifact", "check", "result", "detail"],
                            [(c.artifact, c.check, c.status, c.detail) for c in report.checks],
                            caption=report.note))
    report.raise_for_failure()
    if strict:
        report.raise_if_incomplete()


# --------------------------------------------------------------------- generate, chat


def sampling_options(func: Any) -> Any:
    """Flags shared by `generate` and `chat`; ranges are checked by GenerateConfig,
    so a bad value is refused with the same message as in a config file."""
    options = [
        click.option("--max-new-tokens", type=int, help="Tokens per answer [256; chat 200]."),
        click.option("--temperature", type=float, help="0 = greedy (argmax) [0.8]."),
        click.option("--top-k", type=int, help="Sample among the k likeliest tokens [50]."),
        click.option("--top-p", type=float, help="Nucleus sampling mass, in (0, 1] [0.95]."),
        click.option("--repetition-penalty", type=float, help="In [1, 10]; 1 = off [1]."),
        click.option("--seed", type=int, help="Same seed, prompt and settings -> same text."),
        click.option("--stop", multiple=True, callback=_none_if_empty, metavar="TEXT",
                     help="End the answer where this text appears (not printed); "
                          "repeat for several [none]."),
        click.option("--threads", type=int, help="torch threads [1: fastest at batch 1 on a "
                                                 "busy 2-core machine]."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _none_if_empty(ctx: click.Context, param: click.Parameter, value: tuple) -> tuple | None:
    # A repeatable flag given zero times must not override the config file's list.
    return value or None


def checkpoint_option(func: Any) -> Any:
    return click.option(
        "--checkpoint", "checkpoint_path", type=click.Path(path_type=Path),
        default=DEFAULT_CHECKPOINTS, show_default=True,
        help="A run folder (its latest valid checkpoint) or one step folder.")(func)


def _use_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@cli.command()
@checkpoint_option
@click.option("--prompt", "prompt_text", help="The text to continue; `-` reads standard input.")
@click.option("--prompt-file", type=click.Path(path_type=Path, dir_okay=False),
              help="Read the prompt from a UTF-8 file.")
@sampling_options
@click.option("--json", "as_json", is_flag=True,
              help='Print {"text", "new_tokens", "prompt_tokens", "tokens_per_s", '
                   '"time_to_first_token_s"} instead of the text.')
@config_option
def generate(checkpoint_path: Path, prompt_text: str | None, prompt_file: Path | None,
             as_json: bool, config_path: Path | None, **flags: Any) -> None:
    """Continue a prompt with a trained model; the text goes to stdout.

    \b
    The prompt is cleaned like chat input (control characters and escape sequences
    removed, NFC) and capped in characters and tokens (exit 1 past a cap). The
    completion is streamed to stdout, sanitised, and nothing else is written there.

    \b
    Examples:
      fragment generate --prompt "ROMEO:" --max-new-tokens 100
      fragment generate --prompt-file start.txt --temperature 0 --json
      echo "To be" | fragment generate --prompt - --seed 1
    """
    from fragment_llm.checkpoint.trained import load_trained
    from fragment_llm.config import GenerateConfig, load_stage_config
    from fragment_llm.inference.chat import complete, read_prompt

    if (prompt_text is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt TEXT, --prompt - or --prompt-file")
    settings = load_stage_config(GenerateConfig, "generate", config_path, flags)
    prompt = read_prompt(prompt_text, prompt_file, settings)
    _use_threads(settings.threads)
    trained = load_trained(checkpoint_path)
    result = complete(trained.model, trained.tokenizer, prompt, settings,
                      on_text=None if as_json else _write_stdout)
    if as_json:
        click.echo(json.dumps(result.as_json()))
    else:
        _write_stdout("\n")


MAX_PIPED_LINE_BYTES = 64 << 20  # 4 bytes a character for the largest max_prompt_chars


class ChatTerminal:
    """The chat's I/O on the real streams.

    On a terminal (stdin a tty): readline input after `you>`, a paste of several lines
    taken as one message (bracketed paste, switched on for the session), the model's
    turn labelled `model>` and, when stdout is a terminal too, coloured (never with
    NO_COLOR set or TERM=dumb); Ctrl-D leaves the cursor on a fresh line. From a pipe:
    one line per message, each answer plain on stdout ending in a newline, everything
    else on stderr. Questions (`confirm`) go to /dev/tty, never to stdin. Model text
    arrives already safe; messages are printed as rich Text, markup off.
    """

    PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"
    PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
    LABEL, MODEL_TEXT, RESET = "\x1b[1;36m", "\x1b[36m", "\x1b[0m"  # bold cyan, cyan

    def __init__(self, interactive: bool, colour: bool = False, paste: bool = False) -> None:
        from rich.console import Console

        self.interactive, self.colour, self.paste = interactive, colour, paste
        self.console = Console(highlight=False, markup=False, emoji=False, soft_wrap=True)

    @classmethod
    def for_this_process(cls) -> ChatTerminal:
        interactive = sys.stdin.isatty()
        fancy = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
        return cls(interactive, colour=fancy and not os.environ.get("NO_COLOR"),
                   paste=interactive and fancy)

    def __enter__(self) -> ChatTerminal:
        if self.paste:
            _write_stdout(self.PASTE_ON)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.paste:
            _write_stdout(self.PASTE_OFF)

    def read(self, prompt: str) -> str:
        if not self.interactive:
            # Bytes that are not UTF-8 become U+FFFD, like any prompt: not a crash. A line
            # is read up to a cap (the prompt's own caps refuse it later), and the rest of
            # an over-long line is skipped rather than taken as the next message.
            raw = sys.stdin.buffer.readline(MAX_PIPED_LINE_BYTES)
            if len(raw) == MAX_PIPED_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := sys.stdin.buffer.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
            line = raw.decode("utf-8", errors="replace")
            if not line:
                raise EOFError
            return line.rstrip("\n")
        try:
            line = input(prompt)
        except EOFError:
            _write_stdout("\n")  # Ctrl-D: the shell's prompt starts on a fresh line
            raise
        if self.PASTE_START in line:  # without readline a paste arrives line by line
            lines = [line]
            with contextlib.suppress(EOFError):
                while self.PASTE_END not in lines[-1]:
                    lines.append(input())
            line = "\n".join(lines)
        return line.replace(self.PASTE_START, "").replace(self.PASTE_END, "")

    def begin_answer(self) -> None:
        if self.interactive:
            _write_stdout(f"{self.LABEL}model>{self.RESET} " if self.colour else "model> ")
        if self.colour:
            _write_stdout(self.MODEL_TEXT)

    def write(self, text: str) -> None:
        _write_stdout(text)

    def end_answer(self, interrupted: bool) -> None:
        # Ends the answer's line; in a pipe that makes one answer per line.
        _write_stdout(f"{self.RESET}\n" if self.colour else "\n")
        if interrupted:
            self.message("[stopped]")

    def message(self, text: str) -> None:
        from rich.text import Text

        from fragment_llm.cli.display import err_console

        # soft_wrap: a long line (a path) is never broken by an inserted newline
        (self.console if self.interactive else err_console).print(Text(text), soft_wrap=True)

    def failure(self, exc: Exception) -> None:
        _report_internal_error(exc)

    def confirm(self, question: str) -> bool | None:
        """y or n typed on the controlling terminal (/dev/tty), whatever stdin is; None
        without one. Input typed or pasted before the question is discarded first, and
        a pasted answer arrives wrapped in paste markers, so it is never a yes."""
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "r+b", buffering=0) as tty:
            with contextlib.suppress(ImportError, OSError):
                import termios

                termios.tcflush(fd, termios.TCIFLUSH)
            tty.write(question.encode("utf-8", "replace"))
            try:
                answer = tty.readline(4096)  # a terminal's whole line (its line buffer)
            except KeyboardInterrupt:
                tty.write(b"\n")
                return False
        return answer.strip().lower() in (b"y", b"yes")


CHAT_HINT = "/help lists the commands; Ctrl-D leaves, Ctrl-C stops an answer"


@cli.command()
@checkpoint_option
@sampling_options
@click.option("--system", help="System prompt (what the assistant should be).")
@config_option
def chat(checkpoint_path: Path, system: str | None, config_path: Path | None,
         **flags: Any) -> int:
    """Talk to a trained model: an interactive REPL with streamed answers.

    \b
    Commands: /help /reset /set KEY=VALUE /settings /system TEXT /save FILE /exit.
    Ctrl-C stops an answer; Ctrl-D or /exit leaves; a paste of several lines is one
    message. Everything the model writes is sanitised: no control character or
    terminal escape sequence reaches the screen, and [markup] is shown as typed.
    /save replaces a file only after a yes typed on the terminal. With stdin not a
    terminal, each line is one prompt and each answer is printed plainly, one per
    line, so a chat can be scripted.

    \b
    Examples:
      fragment chat                                      # checkpoints/, latest step
      fragment chat --temperature 0.5 --system "You are terse."
      printf 'hello\\nhow are you?\\n' | fragment chat -q
    """
    from fragment_llm.checkpoint.trained import load_trained
    from fragment_llm.cli.display import summary_table
    from fragment_llm.config import ChatConfig, load_stage_config
    from fragment_llm.inference.chat import ChatSession, banner_rows, enable_line_editing, run_repl

    settings = load_stage_config(ChatConfig, "chat", config_path, {**flags, "system": system})
    _use_threads(settings.threads)
    trained = load_trained(checkpoint_path)
    terminal = ChatTerminal.for_this_process()
    session = ChatSession(trained.model, trained.tokenizer, settings, trained.checkpoint.config,
                          confirm=terminal.confirm)
    _show(summary_table("fragment chat", banner_rows(trained)))
    # readline only for a terminal: a pipe is read line by line, with no editing
    save_history = (enable_line_editing(settings.history) if terminal.interactive
                    else (lambda: None))
    try:
        with terminal:
            if terminal.interactive and not FLAGS.quiet:
                terminal.message(CHAT_HINT)
            return run_repl(session, terminal)
    finally:
        save_history()


def main() -> None:
    """Console-script entry point (`fragment`, `python -m fragment_llm`)."""
    cli.main(prog_name="fragment")
