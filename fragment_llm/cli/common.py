"""What every verb shares: exit codes, default paths, the global --debug/--quiet flags
(also accepted after the verb), reusable options, the internal-error report, and the
few output helpers that respect --quiet."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from rich.console import RenderableType

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

# A command function, as click's option decorators take and return it.
Decorated = TypeVar("Decorated", bound=Callable[..., object])
# What an option hands a command: flags left unset arrive as None.
FlagValue = str | int | float | bool | Path | tuple[str, ...] | None


@dataclass
class Flags:
    """Global flags, kept where the error handler can see them after click has unwound."""

    debug: bool = False
    quiet: bool = False


FLAGS = Flags()
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


def config_option(func: Decorated) -> Decorated:
    return click.option(
        "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False),
        help="TOML file with a table per stage ([preprocess], [tokenizer], ...); "
             "command-line flags override it.")(func)


def json_option(keys: str) -> Callable[[Decorated], Decorated]:
    """`--json`: the summary as one JSON object on stdout, instead of the table on stderr."""
    return click.option("--json", "as_json", is_flag=True,
                        help=f"Print the summary as one JSON object ({keys}) on stdout.")


def show(*renderables: RenderableType) -> None:
    if FLAGS.quiet:
        return
    from fragment_llm.cli.display import err_console

    for item in renderables:
        # A line of text (a path, a hint) is never broken by an inserted newline, so it
        # stays whole for copy and paste; tables still fit the terminal.
        err_console.print(item, soft_wrap=isinstance(item, str))


def format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def sampling_options(func: Decorated) -> Decorated:
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


def checkpoint_option(func: Decorated) -> Decorated:
    """--checkpoint and --adapter: a model, and optionally a LoRA/DoRA adapter on it."""
    func = click.option(
        "--adapter", "adapter_path", type=click.Path(path_type=Path),
        help="A fine-tuning run's adapter (its folder or one step folder), applied to "
             "--checkpoint, by default the base it was trained on.")(func)
    return click.option(
        "--checkpoint", "checkpoint_path", type=click.Path(path_type=Path),
        help=f"A run folder (its latest valid checkpoint) or one step folder "
             f"[{DEFAULT_CHECKPOINTS}, or the adapter's base].")(func)


def model_paths(checkpoint: Path | None, adapter: Path | None) -> Path | None:
    """The checkpoint to load: the one given, else none when an adapter names its base,
    else the default run folder."""
    if checkpoint is not None or adapter is not None:
        return checkpoint
    return DEFAULT_CHECKPOINTS


def use_threads(count: int) -> None:
    import torch

    torch.set_num_threads(count)


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def report_internal_error(exc: BaseException) -> None:
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
