"""`fragment eval`: a checkpoint's loss and bits per byte on its held-out tokens or on
any processed folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from fragment_llm.evaluate import EvalResult

from fragment_llm.cli.common import (
    DEFAULT_TOKENS,
    FLAGS,
    FragmentCommand,
    checkpoint_option,
    model_paths,
    show,
)


@click.command("eval", cls=FragmentCommand)
@checkpoint_option
@click.option("--tokens", type=click.Path(path_type=Path, file_okay=False),
              help="The run's token-shard folder, or the tokens/ folder holding it "
                   "[RUN/tokens for a fine-tuning run, else data/tokens].")
@click.option("--data", type=click.Path(path_type=Path, file_okay=False),
              help="Measure the documents of this processed folder instead, from its start.")
@click.option("--baseline", type=click.Path(path_type=Path),
              help="Also measure this checkpoint on the same blocks [with --adapter: its "
                   "base].")
@click.option("--max-blocks", type=click.IntRange(min=1),
              help="Evaluate at most this many blocks [the run's final_eval_blocks, 512].")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"loss", "bpb", "tokens", "split", "data"} as JSON (with '
                   '"baseline" and "adapter" when they apply).')
def evaluate(checkpoint_path: Path | None, adapter_path: Path | None, tokens: Path | None,
             data: Path | None, baseline: Path | None, max_blocks: int | None,
             as_json: bool) -> None:
    """Report loss and bits per byte of a checkpoint (or a base + adapter).

    \b
    By default on the run's own held-out split, read from the token shards it was
    trained on (data/tokens/) exactly as training's final evaluation reads it: the
    same blocks, so the same bits per byte as the training summary's "val bits/byte".
    For a fine-tuning run that split is held-out conversations (in RUN/tokens/) and
    the loss counts the assistant's tokens only; with --adapter the base model is
    measured on the same blocks too, so the two numbers show what tuning bought.
    With --data, on the documents of any processed folder from its start instead,
    tokenized with the checkpoint's tokenizer copy; for the training corpus that
    includes text the model learned, so it is not the held-out figure. Bits per byte
    do not depend on the tokenizer, so checkpoints with different vocabularies can be
    compared.

    \b
    Examples:
      fragment eval                                  # checkpoints/, held-out split
      fragment eval --data other/processed --json    # another folder's documents
      fragment eval --adapter checkpoints-chat       # tuned vs base, held-out chats
      fragment eval --checkpoint checkpoints-merged --tokens checkpoints-chat/tokens
    """
    from fragment_llm.cli.display import progress_bars, summary_table
    from fragment_llm.evaluate import EvalRequest, evaluate_documents, evaluate_held_out

    if tokens is not None and data is not None:
        raise click.UsageError("give --tokens (the held-out split) or --data (every "
                               "document of a processed folder), not both")
    request = EvalRequest(model_paths(checkpoint_path, adapter_path), tokens, DEFAULT_TOKENS,
                          max_blocks, adapter_path, baseline)
    with progress_bars(not FLAGS.quiet) as progress:
        result = (evaluate_documents(request, data, progress) if data
                  else evaluate_held_out(request, progress))
    if as_json:
        click.echo(json.dumps(result.as_json()))
        return
    show(summary_table("Evaluation", _rows(result)))


def _rows(result: EvalResult) -> list[tuple[str, object]]:
    """The summary: what was measured, on what, and the baseline beside it."""
    text = (f"held-out split of {result.data}" if result.split == "val"
            else f"documents of {result.data}, from its start")
    counts = "assistant tokens" if result.assistant_only else "every token"
    rows: list[tuple[str, object]] = [("checkpoint", result.checkpoint)]
    if result.adapter is not None:
        rows.append(("adapter", result.adapter))
    rows += [("measured on", text), ("loss counts", counts),
             ("loss (nats/token)", f"{result.loss:.4f}"), ("bits per byte", f"{result.bpb:.4f}"),
             ("tokens", f"{result.tokens:,}")]
    if result.baseline is not None:
        base = result.baseline
        change = (result.loss - base.loss) / base.loss * 100 if base.loss else float("nan")
        rows += [("baseline", base.checkpoint), ("baseline loss", f"{base.loss:.4f}"),
                 ("baseline bits per byte", f"{base.bpb:.4f}"),
                 ("loss vs baseline", f"{change:+.1f}%")]
    return rows
