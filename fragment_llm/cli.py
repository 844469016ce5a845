"""The `fragment` command line: options in, one library call, a rendered result out.

This is the only place that maps errors to exit codes:
- `FragmentError`      -> `error: <what>, <where>` (+ `hint: ...`) on stderr, exit 1
- click usage errors   -> exit 2
- Ctrl-C               -> exit 130
- anything else        -> one "internal error" line and the path of a saved traceback
                          (the traceback itself with `--debug`), exit 70
Stage modules are imported inside each command so `fragment --help` stays instant.
"""

from __future__ import annotations

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

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

DEFAULT_RAW = Path("data/raw")
DEFAULT_PROCESSED = Path("data/processed")
DEFAULT_TOKENIZER = Path("data/tokenizer.json")
DEFAULT_CHECKPOINTS = Path("checkpoints")


@dataclass
class Flags:
    """Global flags, kept where the error handler can see them after click has unwound."""

    debug: bool = False
    quiet: bool = False


FLAGS = Flags()


def _echo_error(message: str, hint: str | None = None) -> None:
    from fragment_llm.display import safe

    click.echo(f"error: {safe(message)}", err=True)
    if hint:
        click.echo(f"hint: {safe(hint)}", err=True)


def _report_internal_error(exc: BaseException) -> None:
    from fragment_llm.display import safe

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


class FragmentGroup(click.Group):
    """A click group whose `main` owns the error-to-exit-code mapping."""

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
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            return result if isinstance(result, int) else 0
        except click.exceptions.Exit as exc:
            return exc.exit_code
        except click.ClickException as exc:
            exc.show()
            return exc.exit_code
        except (KeyboardInterrupt, click.exceptions.Abort):
            click.echo("interrupted", err=True)
            return EXIT_INTERRUPTED
        except FragmentError as exc:
            _echo_error(exc.message, exc.hint)
            return EXIT_ERROR
        except Exception as exc:  # the last line of defence: never a raw traceback
            _report_internal_error(exc)
            return EXIT_INTERNAL


@click.group(cls=FragmentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fragment")
@click.option("--debug", is_flag=True, help="Print full tracebacks for internal errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summaries; errors only.")
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


def _show(*renderables: Any) -> None:
    if FLAGS.quiet:
        return
    from fragment_llm.display import err_console

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
def preprocess(inputs: tuple[Path, ...], out: Path, config_path: Path | None,
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
    from fragment_llm.config import PreprocessConfig, load_stage_config
    from fragment_llm.display import listing_table, progress_bars, summary_table
    from fragment_llm.preprocess import run_preprocess

    overwrite = flags.pop("overwrite")
    config = load_stage_config(PreprocessConfig, "preprocess", config_path, flags)
    with progress_bars(not FLAGS.quiet) as progress:
        report = run_preprocess(list(inputs) or [DEFAULT_RAW], out, config,
                                overwrite=overwrite, progress=progress)
    problems = report.problem_rows()
    if problems:
        _show(listing_table("Files not used", ("file", "status", "reason"), problems))
    _show(summary_table("Preprocess summary", report.summary_rows()))


def main() -> None:
    """Console-script entry point (`fragment`, `python -m fragment_llm`)."""
    cli.main(prog_name="fragment")
