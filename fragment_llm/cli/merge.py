"""`fragment merge`: an adapter folded into its base, written as a standalone checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fragment_llm.cli.common import FragmentCommand, json_option, show


@click.command(cls=FragmentCommand)
@click.option("--adapter", "adapter_path", type=click.Path(path_type=Path), required=True,
              help="A LoRA/DoRA fine-tuning run folder (its newest valid step) or step folder.")
@click.option("--base", type=click.Path(path_type=Path),
              help="The checkpoint it was trained on [the one the adapter recorded].")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="A new run folder for the merged checkpoint.")
@json_option('"checkpoint", "base", "adapter", "max_logit_difference"')
def merge(adapter_path: Path, base: Path | None, out: Path, as_json: bool) -> None:
    """Fold an adapter into its base: one checkpoint that needs no --adapter.

    \b
    Both are verified first, and the base must be the one the adapter was trained
    on (its manifest's sha256). LoRA layers become W + (alpha/r)·B·A, DoRA layers
    the magnitude-normalised weight; the merged model's logits are compared with
    base + adapter on a probe batch and the merge is refused beyond 1e-5. The new
    checkpoint (OUT/step-NNNNNNN, written atomically) records both parents in its
    provenance and chats with the adapter's chat template.

    \b
    Examples:
      fragment merge --adapter checkpoints-chat --out checkpoints-merged
      fragment merge --adapter checkpoints-chat --base checkpoints --out merged
      fragment chat --checkpoint checkpoints-merged
    """
    from fragment_llm.cli.display import summary_table
    from fragment_llm.finetune.merge import merge as merge_adapter

    summary = merge_adapter(adapter_path, base, out)
    if as_json:
        click.echo(json.dumps({"checkpoint": str(summary.checkpoint), "base": str(summary.base),
                               "adapter": str(summary.adapter),
                               "max_logit_difference": summary.max_logit_difference}))
        return
    show(summary_table("Merged", [("checkpoint", summary.checkpoint), ("base", summary.base),
                                  ("adapter", summary.adapter),
                                  ("max logit difference", f"{summary.max_logit_difference:.1e}"),
                                  ("chat format", summary.chat_format or "-")]))
