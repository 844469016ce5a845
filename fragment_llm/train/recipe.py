"""What kind of run a training request is: where its token shards and its first weights
come from, what its step folders keep, and how chat should talk to what it trains.

`run_training` (run.py) drives every kind the same way, so gradient accumulation, AMP,
DDP, evaluation, checkpoints, signals and exact resume hold for all of them. Pretraining
(here) tokenizes a processed corpus and starts from random weights, or from another
checkpoint's (`fragment train --init-from`). Fine-tuning on conversations
(finetune/run.py) brings masked shards, a base model and, for LoRA/DoRA, adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from fragment_llm.checkpoint.records import recorded_path
from fragment_llm.config import TRANSCRIPT_CHAT_FORMAT
from fragment_llm.data.shards import BuildRequest, build_token_shards
from fragment_llm.errors import CheckpointError
from fragment_llm.events import ProgressFn
from fragment_llm.model.gpt import GPT
from fragment_llm.model.size import count_parameters

if TYPE_CHECKING:
    from fragment_llm.checkpoint.load import Checkpoint
    from fragment_llm.checkpoint.save import AdapterWeights
    from fragment_llm.config import ModelConfig
    from fragment_llm.tokenizer.tokenizer import Tokenizer


class Recipe(Protocol):
    """One kind of run. `run_training` calls, in order: `check`, `trainable_parameters`
    (for the memory plan, from the config alone), `build_shards` (rank 0), `build_model`
    (seeded), `restore` on resume; then, for each step folder, `provenance` and
    `adapter_weights`."""

    chat_format: str  # what the step folders' config.json records

    def check(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None: ...
    def build_shards(self, progress: ProgressFn) -> Path: ...
    def build_model(self, config: ModelConfig, device: torch.device) -> GPT: ...
    def trainable_parameters(self, config: ModelConfig) -> int: ...
    def restore(self, model: GPT, checkpoint: Checkpoint) -> None: ...
    def provenance(self) -> dict[str, str]: ...
    def adapter_weights(self, model: GPT) -> AdapterWeights | None: ...


def starting_weights_check(start: Checkpoint, model_config: ModelConfig,
                           tokenizer: Tokenizer, flag: str) -> None:
    """A run starting from `start`'s weights must build the same model with the same
    tokenizer: weights of another shape cannot be copied, and ids of another tokenizer
    would mean other text."""
    from fragment_llm.checkpoint.trained import checkpoint_model_config

    start.require_model()  # an adapter has no weights to start from
    recorded = checkpoint_model_config(start)
    if recorded != model_config:
        changed = sorted(key for key, value in model_config.model_dump().items()
                         if recorded.model_dump().get(key) != value)
        raise CheckpointError(f"{flag} {start.path} has another model config ({', '.join(changed)} "
                              f"differ)", hint="leave [model] and --preset out: the model "
                                               "comes from the checkpoint")
    if start.provenance.tokenizer_sha256 != tokenizer.sha256:
        raise CheckpointError(f"{flag} {start.path} was trained with another tokenizer "
                              f"({str(start.provenance.tokenizer_sha256)[:16]}…, this one is "
                              f"{tokenizer.sha256[:16]}…)",
                              hint=f"pass the checkpoint's own tokenizer: "
                                   f"{start.tokenizer_path}")


@dataclass
class Pretraining:
    """Next-token prediction on a processed corpus, from random weights or `init_from`'s."""

    data: Path
    tokenizer: Path
    tokens_root: Path
    val_fraction: float
    workers: int
    init_from: Checkpoint | None = None
    chat_format: str = field(default=TRANSCRIPT_CHAT_FORMAT, init=False)

    def check(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        if self.init_from is not None:
            starting_weights_check(self.init_from, model_config, tokenizer, "--init-from")

    def build_shards(self, progress: ProgressFn) -> Path:
        build = BuildRequest(self.data, self.tokenizer, self.tokens_root, self.val_fraction,
                             workers=self.workers)
        return build_token_shards(build, progress)

    def build_model(self, config: ModelConfig, device: torch.device) -> GPT:
        model = GPT(config).to(device)
        if self.init_from is not None:
            self.init_from.load_model_into(model)
        return model

    def trainable_parameters(self, config: ModelConfig) -> int:
        return count_parameters(config)

    def restore(self, model: GPT, checkpoint: Checkpoint) -> None:
        checkpoint.load_model_into(model)

    def provenance(self) -> dict[str, str]:
        if self.init_from is None:
            return {}
        return {"base_manifest_sha256": self.init_from.manifest_sha256,
                "base_checkpoint": recorded_path(self.init_from.path)}

    def adapter_weights(self, model: GPT) -> AdapterWeights | None:
        return None
