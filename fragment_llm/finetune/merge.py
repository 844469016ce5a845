"""`fragment merge`: fold an adapter into its base, giving a standalone checkpoint.

LoRA's layers become `W + s·B·A`, DoRA's the magnitude-normalised weight
(finetune/adapters.py `merge_adapters`). Before anything is written the merged model
is run beside base + adapter on a probe batch, and the merge is refused unless their
logits agree within `MERGE_TOLERANCE` (fp32). The checkpoint's provenance names both
parents by their manifests' sha256, and its config keeps the adapter's chat format, so
chat talks to it the way it talks to base + adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fragment_llm import __version__
from fragment_llm.checkpoint.layout import list_checkpoints
from fragment_llm.checkpoint.records import (
    CheckpointConfig,
    Provenance,
    TrainerState,
    model_config_sha256,
    recorded_path,
)
from fragment_llm.checkpoint.save import save_checkpoint
from fragment_llm.errors import CheckpointError, OutputError
from fragment_llm.finetune.adapters import merge_adapters
from fragment_llm.finetune.artifact import Tuned, load_tuned

MERGE_TOLERANCE = 1e-5  # max |logit difference|, merged against base + adapter, in fp32
PROBE_SEED = 20_260_101


@dataclass(frozen=True)
class MergeSummary:
    checkpoint: Path  # the step folder written
    base: Path
    adapter: Path
    max_logit_difference: float
    chat_format: str | None


def merge(adapter_path: Path, base_path: Path | None, out: Path) -> MergeSummary:
    """Load base + adapter (both verified, the base the adapter's own), merge, check the
    outputs, then write OUT/step-NNNNNNN (the adapter's step) atomically."""
    if list_checkpoints(out):
        raise OutputError(f"{out} already holds checkpoints; merge writes a new run folder",
                          hint="choose another --out (nothing there was changed)")
    tuned = load_tuned(base_path, adapter_path)
    if tuned.adapter is None:  # load_tuned gives one whenever a path is given
        raise CheckpointError(f"no adapter in {adapter_path}")
    difference = merge_checked(tuned)
    adapter = tuned.adapter.checkpoint
    config = CheckpointConfig(model=tuned.checkpoint.config.model, train=adapter.config.train,
                              fragment_version=__version__,
                              chat_format=adapter.config.chat_format,
                              val_loss=adapter.config.val_loss, val_bpb=adapter.config.val_bpb)
    provenance = Provenance(
        tokenizer_sha256=tuned.tokenizer.sha256,
        tokens_manifest_sha256=adapter.provenance.tokens_manifest_sha256,
        processed_manifest_sha256=adapter.provenance.processed_manifest_sha256,
        model_config_sha256=model_config_sha256(config.model),
        base_manifest_sha256=tuned.checkpoint.manifest_sha256,
        base_checkpoint=recorded_path(tuned.checkpoint.path),
        adapter_manifest_sha256=adapter.manifest_sha256,
        adapter_checkpoint=recorded_path(adapter.path))
    written = save_checkpoint(out, adapter.step, model=tuned.model, optimizer=None,
                              trainer_state=TrainerState(step=adapter.step), config=config,
                              tokenizer_file=tuned.checkpoint.tokenizer_path,
                              provenance=provenance, keep_last=1)
    return MergeSummary(written, tuned.checkpoint.path, adapter.path, difference,
                        config.chat_format)


@torch.no_grad()
def merge_checked(tuned: Tuned) -> float:
    """Merge in place; the largest logit difference it made on a probe batch."""
    model = tuned.model
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probe = torch.randint(model.config.vocab_size or 1, (2, min(64, model.config.block_size)),
                          generator=generator).to(tuned.device)
    before = model(probe).float()
    merge_adapters(model)
    model.eval()
    difference = float((model(probe).float() - before).abs().max())
    if not difference <= MERGE_TOLERANCE:  # NaN fails too
        raise CheckpointError(f"the merged model's logits differ from base + adapter by "
                              f"{difference:.2e} (more than {MERGE_TOLERANCE:.0e})",
                              hint="use --adapter with the base instead of merging")
    return difference
