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
Each verb lives in its own module (cli/<verb>.py) and imports its stage inside the
command, so `fragment --help` stays instant.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from fragment_llm import __version__
from fragment_llm.cli.chat import chat
from fragment_llm.cli.common import (
    DEBUG_HELP,
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    FLAGS,
    QUIET_HELP,
    FragmentCommand,
    report_internal_error,
)
from fragment_llm.cli.evaluate import evaluate
from fragment_llm.cli.experiment import experiment
from fragment_llm.cli.export import export
from fragment_llm.cli.finetune import finetune
from fragment_llm.cli.generate import generate
from fragment_llm.cli.merge import merge
from fragment_llm.cli.preprocess import preprocess
from fragment_llm.cli.report import report
from fragment_llm.cli.serve import serve
from fragment_llm.cli.tokenizer import export_tokenizer_command, train_tokenizer_command
from fragment_llm.cli.train import train
from fragment_llm.cli.verify import verify
from fragment_llm.errors import FragmentError
from fragment_llm.safety.signals import Terminated, signals_as_exceptions


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


class FragmentGroup(click.Group):
    """A click group whose `main` owns the error-to-exit-code mapping."""

    command_class = FragmentCommand

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> int:
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args: Sequence[str] | None, prog_name: str | None, complete_var: str | None,
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
            from fragment_llm.cli.display import safe

            click.echo(f"error: {safe(exc.message)}", err=True)
            if exc.hint:
                click.echo(f"hint: {safe(exc.hint)}", err=True)
            return EXIT_ERROR
        except Exception as exc:  # the last line of defence: never a raw traceback
            report_internal_error(exc)
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
      fragment finetune          data/conversations/ + checkpoints/ -> checkpoints-chat/
      fragment chat              checkpoints-chat/ -> your terminal
      fragment serve             checkpoints-chat/ -> an OpenAI-compatible API, a chat page
      fragment export            checkpoints-chat/ -> a Hugging Face folder or a GGUF file
      fragment experiment        a plan of training runs -> experiments/, results.csv

    Every verb validates what it is given and refuses bad input with one line
    naming the file or field and the rule broken. Run `fragment VERB --help`.
    """
    FLAGS.debug = debug
    FLAGS.quiet = quiet


# The verbs, each in its own module; `fragment --help` lists them alphabetically.
for command in (preprocess, train_tokenizer_command, export_tokenizer_command, train, finetune,
                merge, evaluate, verify, generate, chat, serve, export, experiment, report):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point (`fragment`, `python -m fragment_llm`)."""
    cli.main(prog_name="fragment")
