"""`fragment eval`: a checkpoint's loss and bits per byte on its held-out tokens or on
any processed folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fragment_llm.cli.common import (
    DEFAULT_CHECKPOINTS,
    DEFAULT_TOKENS,
    FLAGS,
    FragmentCommand,
    show,
)


@click.command("eval", cls=FragmentCommand)
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
    show(summary_table("Evaluation", [("checkpoint", result.checkpoint),
                                       ("measured on", text),
                                       ("loss (nats/token)", f"{result.loss:.4f}"),
                                       ("bits per byte", f"{result.bpb:.4f}"),
                                       ("tokens", f"{result.tokens:,}")]))
