"""`fragment train-tokenizer` and `fragment export-tokenizer`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fragment_llm.cli.common import (
    DEFAULT_PROCESSED,
    DEFAULT_TOKENIZER,
    FLAGS,
    FlagValue,
    FragmentCommand,
    config_option,
    json_option,
    show,
)


@click.command("train-tokenizer", cls=FragmentCommand)
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
                            **flags: FlagValue) -> None:
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
    show(summary_table("Tokenizer summary", report.summary_rows()))


@click.command("export-tokenizer", cls=FragmentCommand)
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
    show(summary_table("Export summary", report.summary_rows()))
