"""`fragment export`: a checkpoint (and its adapter, merged) as a Hugging Face folder or GGUF.

The order: refuse a bad `--out` before loading anything; load the checkpoint through
`load_tuned` (every check chat runs: hashes, the tokenizer copy, the adapter's base);
refuse a model with a component no Llama has; merge the adapter (refused unless the
merged logits match base + adapter, as `fragment merge`); then build the whole output in
a staged folder and swap it into place. A killed export leaves no half-written folder.

The output records where it came from: `fragment_export.json` (the checkpoint's and the
adapter's manifest sha256, the tokenizer's, every file's sha256), and the same hashes in
model.safetensors' metadata or GGUF's `fragment.*` keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fragment_llm import __version__
from fragment_llm.checkpoint.layout import STEP_NAME
from fragment_llm.checkpoint.records import recorded_path
from fragment_llm.errors import OutputError
from fragment_llm.export.gguf_model import write_gguf_model
from fragment_llm.export.hf_model import Exportable, write_hf
from fragment_llm.export.llama import refuse_unfaithful
from fragment_llm.finetune.artifact import Tuned, checkpoint_model_config, load_tuned
from fragment_llm.finetune.merge import merge_checked
from fragment_llm.safety.files import (
    atomic_write_text,
    dump_json,
    sha256_file,
    staged_dir,
)

ExportFormat = Literal["hf", "gguf"]
Quantize = Literal["f32", "q8_0"]
PROVENANCE_FILE = "fragment_export.json"
EXPORT_FORMAT = "fragment-export"


@dataclass(frozen=True)
class ExportRequest:
    checkpoint: Path | None  # None: the adapter's recorded base
    adapter: Path | None
    format: ExportFormat
    out: Path
    quantize: Quantize = "f32"
    overwrite: bool = False


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    format: ExportFormat
    quantize: Quantize
    checkpoint: Path  # the step folder exported
    adapter: Path | None
    source_manifest_sha256: str
    adapter_manifest_sha256: str | None
    merge_difference: float | None  # merged against base + adapter, max |logit|
    parameters: int
    files: dict[str, int]  # name -> bytes

    def as_json(self) -> dict[str, object]:
        return {"out": str(self.out), "format": self.format, "quantize": self.quantize,
                "checkpoint": str(self.checkpoint),
                "adapter": None if self.adapter is None else str(self.adapter),
                "source_manifest_sha256": self.source_manifest_sha256,
                "adapter_manifest_sha256": self.adapter_manifest_sha256,
                "merge_max_logit_difference": self.merge_difference,
                "parameters": self.parameters, "files": self.files}


def export(request: ExportRequest) -> ExportSummary:
    """Load, check, merge, write (see the module docstring); the summary of what was written."""
    if request.format == "hf" and request.quantize != "f32":
        raise OutputError(f"--quantize {request.quantize} is for --format gguf",
                          hint="a Hugging Face export is float32")
    check_out(request.out, request.overwrite, [p for p in (request.checkpoint, request.adapter)
                                               if p is not None])
    tuned = load_tuned(request.checkpoint, request.adapter)
    check_out(request.out, request.overwrite, _sources(tuned))
    config = checkpoint_model_config(tuned.checkpoint)
    refuse_unfaithful(config)
    difference = merge_checked(tuned) if tuned.adapter is not None else None
    item = Exportable(tuned.model, config, tuned.tokenizer, tuned.chat_format,
                      _provenance(tuned))
    with torch.no_grad(), staged_dir(request.out, request.overwrite) as staging:
        if request.format == "hf":
            write_hf(staging, item)
        else:
            write_gguf_model(staging, item, request.quantize)
        files = _write_record(staging, request, tuned)
    adapter = None if tuned.adapter is None else tuned.adapter.checkpoint
    return ExportSummary(request.out, request.format, request.quantize, tuned.checkpoint.path,
                         None if adapter is None else adapter.path,
                         tuned.checkpoint.manifest_sha256,
                         None if adapter is None else adapter.manifest_sha256,
                         difference, sum(p.numel() for p in tuned.model.parameters()), files)


def _sources(tuned: Tuned) -> list[Path]:
    """The step folders read, and their run folders."""
    steps = [tuned.checkpoint.path]
    if tuned.adapter is not None:
        steps.append(tuned.adapter.checkpoint.path)
    return steps + [step.parent for step in steps if STEP_NAME.fullmatch(step.name)]


def check_out(out: Path, overwrite: bool, sources: list[Path]) -> None:
    """Refuse an --out that is a link, holds or sits in an input, or is something other
    than a previous export that --overwrite may replace."""
    if out.is_symlink():
        raise OutputError(f"--out is a symbolic link: {out}",
                          hint="name a real folder; export never writes through a link")
    target = Path(os.path.realpath(out))
    for source in sources:
        source = Path(os.path.realpath(source))
        if target == source or source in target.parents or target in source.parents:
            raise OutputError(f"--out {out} overlaps the input {source}",
                              hint="write the export outside the checkpoint and adapter folders")
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise OutputError(f"output already exists: {out}",
                          hint="pass --overwrite to replace a previous export, or choose "
                               "another --out")
    record = out / PROVENANCE_FILE
    is_export = record.is_file() and not record.is_symlink()
    if not out.is_dir() or (any(out.iterdir()) and not is_export):
        raise OutputError(f"--overwrite replaces only a previous export, and {out} is not one "
                          f"(no {PROVENANCE_FILE})", hint="choose another --out")


def _provenance(tuned: Tuned) -> dict[str, str]:
    """The hashes every output carries in its own metadata."""
    hashes = {"source_manifest_sha256": tuned.checkpoint.manifest_sha256,
              "tokenizer_sha256": tuned.tokenizer.sha256}
    if tuned.adapter is not None:
        hashes["adapter_manifest_sha256"] = tuned.adapter.checkpoint.manifest_sha256
    return hashes


def _write_record(folder: Path, request: ExportRequest, tuned: Tuned) -> dict[str, int]:
    """fragment_export.json: the sources and every other file's sha256; all files' sizes."""
    files = {path.name: path.stat().st_size for path in sorted(folder.iterdir())}
    adapter = tuned.adapter
    record = {
        "format": EXPORT_FORMAT, "version": 1, "fragment_version": __version__,
        "export_format": request.format, "quantize": request.quantize,
        "source_checkpoint": recorded_path(tuned.checkpoint.path),
        "adapter_checkpoint": None if adapter is None else recorded_path(adapter.checkpoint.path),
        **_provenance(tuned), "chat_format": tuned.chat_format,
        "files": {name: {"bytes": size, "sha256": sha256_file(folder / name, OutputError)}
                  for name, size in files.items()}}
    atomic_write_text(folder / PROVENANCE_FILE, dump_json(record), replace=False)
    return {**files, PROVENANCE_FILE: (folder / PROVENANCE_FILE).stat().st_size}
