"""`fragment preprocess`: raw files in, a processed folder out, and a report of what
was kept and refused."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fragment_llm.cli.common import (
    DEFAULT_PROCESSED,
    DEFAULT_RAW,
    FLAGS,
    FlagValue,
    FragmentCommand,
    config_option,
    json_option,
    show,
)


@click.command(cls=FragmentCommand)
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
               **flags: FlagValue) -> None:
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
        show(listing_table("Files not used", ("file", "status", "reason"), problems))
    show(summary_table("Preprocess summary", report.summary_rows()))
