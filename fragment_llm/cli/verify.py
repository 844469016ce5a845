"""`fragment verify`: an artifact's own checks and its sha256 chain, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fragment_llm.cli.common import (
    FragmentCommand,
    show,
)


@click.command(cls=FragmentCommand)
@click.argument("path", type=click.Path(path_type=Path), required=False)
@click.option("--adapter", "adapter_path", type=click.Path(path_type=Path),
              help="Verify this adapter (run or step folder) against PATH as its base "
                   "[the base it recorded].")
@click.option("--base", type=click.Path(path_type=Path),
              help="The checkpoint a fine-tuned or --init-from run started from "
                   "[an adapter's recorded base].")
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
def verify(path: Path | None, adapter_path: Path | None, base: Path | None,
           processed: Path | None, tokenizer_path: Path | None, tokens: Path | None,
           strict: bool, as_json: bool) -> None:
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
      checkpoints-chat           a fine-tuning run: the same, plus each adapter's
                                 tensors against the base's config, the base it was
                                 trained on (by its manifest's sha256) and the
                                 conversations report its token shards record
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
      fragment verify checkpoints --adapter checkpoints-chat   # adapter and its base
    """
    from fragment_llm.cli.display import listing_table
    from fragment_llm.verify import Upstream, describe
    from fragment_llm.verify import verify as run_verify

    if path is None and adapter_path is None:
        raise click.UsageError("give the PATH to verify (or --adapter DIR)")
    if adapter_path is not None:  # the adapter, with PATH (if any) as its base
        path, base = adapter_path, base or path
    report = run_verify(path, Upstream(processed, tokenizer_path, tokens, base))
    if as_json:
        click.echo(json.dumps(report.as_json()))
    else:
        counts = ", ".join(f"{n} {status}" for status, n in describe(report.checks).items()
                           if n)
        chain = "chain verified" if report.complete and report.ok else "chain NOT verified"
        title = f"fragment verify {path} ({report.kind}): {counts}; {chain}"  # escaped there
        show(listing_table(title, ["artifact", "check", "result", "detail"],
                            [(c.artifact, c.check, c.status, c.detail) for c in report.checks],
                            caption=report.note))
    report.raise_for_failure()
    if strict:
        report.raise_if_incomplete()
