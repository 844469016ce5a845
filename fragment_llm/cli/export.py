"""`fragment export`: a checkpoint as a Hugging Face folder or a GGUF file, for other programs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fragment_llm.cli.common import (
    FragmentCommand,
    checkpoint_option,
    json_option,
    model_paths,
    show,
)


@click.command(cls=FragmentCommand)
@checkpoint_option
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), required=True,
              help="hf: a folder transformers loads (LlamaForCausalLM); gguf: one model.gguf "
                   "for llama.cpp.")
@click.option("--quantize", type=click.Choice(["f32", "q8_0"]), default="f32",
              show_default=True, help="GGUF matrices as float32, or 8-bit blocks (Q8_0).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The folder to write (a new one, or a previous export with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace a previous export at --out.")
@json_option('"out", "format", "checkpoint", "source_manifest_sha256", "files", ...')
def export(checkpoint_path: Path | None, adapter_path: Path | None, fmt: str, quantize: str,
           out: Path, overwrite: bool, as_json: bool) -> None:
    """Export a model for other programs: Hugging Face transformers or llama.cpp.

    \b
    The checkpoint is verified as chat verifies it, an adapter is merged first
    (refused unless the merged logits match), and a model with a part Llama does
    not have (learned positions, LayerNorm, GELU) is refused, naming it. The
    output folder is built aside and swapped into place, and records the
    checkpoint's manifest sha256 (docs/export.md).

    \b
    Load the results with transformers' AutoModelForCausalLM.from_pretrained(
    "export-hf") and AutoTokenizer (no trust_remote_code), or run the GGUF with
    llama.cpp: llama-cli -m export-gguf/model.gguf.

    \b
    Examples:
      fragment export --format hf --out export-hf
      fragment export --adapter checkpoints-chat --format gguf --quantize q8_0 --out export-gguf
    """
    from fragment_llm.cli.display import summary_table
    from fragment_llm.export.run import ExportRequest
    from fragment_llm.export.run import export as run_export

    summary = run_export(ExportRequest(model_paths(checkpoint_path, adapter_path), adapter_path,
                                       fmt, out, quantize, overwrite))  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(summary.as_json()))
        return
    rows: list[tuple[str, object]] = [
        ("written", summary.out), ("format", f"{summary.format} ({summary.quantize})"),
        ("checkpoint", summary.checkpoint),
        ("source manifest sha256", summary.source_manifest_sha256[:16] + "…")]
    if summary.adapter is not None:
        rows += [("adapter (merged)", summary.adapter),
                 ("merge max logit difference", f"{summary.merge_difference:.1e}")]
    rows += [("parameters", f"{summary.parameters:,}"),
             ("bytes", f"{sum(summary.files.values()):,} in {len(summary.files)} files")]
    show(summary_table("Exported", rows))
