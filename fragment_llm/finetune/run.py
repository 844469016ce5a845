"""A fine-tuning run: a base checkpoint, conversations, and `run_training`.

`FineTuning` is the run's recipe (train/recipe.py): conversation shards with a loss
mask (finetune/shards.py), the base's weights, and for LoRA/DoRA the adapters
(finetune/adapters.py) as the only trainable parameters, saved as adapter step folders
(finetune/artifact.py). Everything else is `fragment train`'s own loop: accumulation,
AMP, DDP, evaluation, metrics.jsonl, checkpoints, signals, exact resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fragment_llm.checkpoint.load import Checkpoint, latest_valid_checkpoint, open_checkpoint
from fragment_llm.checkpoint.provenance import checked_tokenizer
from fragment_llm.checkpoint.records import recorded_path
from fragment_llm.checkpoint.save import AdapterWeights
from fragment_llm.checkpoint.trained import checkpoint_model_config
from fragment_llm.config import (
    SPECIAL_TOKENS_CHAT_FORMAT,
    FinetuneConfig,
    GivenSettings,
    TrainConfig,
)
from fragment_llm.errors import CheckpointError, ConfigError
from fragment_llm.events import EventFn, NoteEvent, ProgressFn
from fragment_llm.finetune.adapters import (
    AdapterSpec,
    attach_adapters,
    expected_adapter_shapes,
    load_adapter_tensors,
)
from fragment_llm.finetune.artifact import (
    adapter_of,
    adapter_record,
    adapter_weights,
    base_step,
    check_adapter_base,
    check_adapter_tensors,
)
from fragment_llm.finetune.conversations import ConversationLimits, read_conversations
from fragment_llm.finetune.shards import build_conversation_shards
from fragment_llm.model.gpt import GPT
from fragment_llm.model.size import count_parameters
from fragment_llm.safety.text import escape_for_display
from fragment_llm.train.recipe import starting_weights_check
from fragment_llm.train.resume import resumed_settings
from fragment_llm.train.run import TrainRequest, TrainSummary, run_training

SHOWN_REFUSALS = 5  # refused records named on screen; conversations.json lists more

if TYPE_CHECKING:
    from fragment_llm.config import ModelConfig
    from fragment_llm.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class FinetuneRequest:
    """Everything `fragment finetune` needs, validated by the config layer. `base` may be
    None on `resume`: the run's recorded base is used (and verified)."""

    base: Path | None
    data: Path
    out: Path
    finetune: FinetuneConfig
    train: TrainConfig
    resume: bool = False
    tokens_dir: Path | None = None  # default: OUT/tokens
    given: GivenSettings | None = None
    limits: ConversationLimits = field(default_factory=ConversationLimits)


@dataclass
class FineTuning:
    """The recipe: conversations, the base's weights, and optionally an adapter."""

    base: Checkpoint
    data: Path
    tokens_root: Path
    val_fraction: float
    tokenizer: Tokenizer
    spec: AdapterSpec | None
    limits: ConversationLimits
    on_event: EventFn
    chat_format: str = field(default=SPECIAL_TOKENS_CHAT_FORMAT, init=False)

    def check(self, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
        starting_weights_check(self.base, model_config, tokenizer, "--base")

    def build_shards(self, progress: ProgressFn) -> Path:
        found = read_conversations(self.data, self.limits, lambda _phase, done, total:
                                   progress("reading conversations", done, total))
        refused = ", ".join(f"{reason} {count:,}" for reason, count in
                            sorted(found.refused_counts.items()))
        self.on_event(NoteEvent(f"{len(found.conversations):,} conversations from "
                                f"{len(found.sources):,} files"
                                + (f"; refused: {refused}" if refused else "")))
        for refusal in found.refused[:SHOWN_REFUSALS]:  # the rest: the cache's report
            where = f"{refusal.source}:{refusal.record}" if refusal.record else refusal.source
            self.on_event(NoteEvent(escape_for_display(
                f"  refused {where}: {refusal.reason} ({refusal.detail})", max_chars=200)))
        return build_conversation_shards(found, self.tokenizer, self.tokens_root,
                                         self.val_fraction, progress)

    def build_model(self, config: ModelConfig, device: torch.device) -> GPT:
        model = GPT(config).to(device)
        self.base.load_model_into(model)
        if self.spec is not None:  # seeded by the caller: the same A for the same --seed
            attach_adapters(model, self.spec)
        return model

    def trainable_parameters(self, config: ModelConfig) -> int:
        if self.spec is None:
            return count_parameters(config)
        shapes = expected_adapter_shapes(config, self.spec)
        return sum(math.prod(shape) for shape in shapes.values())

    def restore(self, model: GPT, checkpoint: Checkpoint) -> None:
        if self.spec is None:
            # The weights come from the checkpoint, but they were tuned from its base:
            # another --base would be recorded as theirs.
            recorded = checkpoint.provenance.document().get("base_manifest_sha256")
            if recorded != self.base.manifest_sha256:
                raise CheckpointError(
                    f"{checkpoint.path} was tuned from a base whose manifest hashes to "
                    f"{str(recorded)[:16]}…, but --base {self.base.path} hashes to "
                    f"{self.base.manifest_sha256[:16]}…",
                    hint="resume with the base the run started from, or tune into a new --out")
            checkpoint.load_model_into(model)
            return
        if not checkpoint.is_adapter:
            raise CheckpointError(f"{checkpoint.path} holds a whole model, this run trains "
                                  f"an adapter", hint="resume with the run's own --method")
        saved = adapter_of(checkpoint)
        check_adapter_base(saved, self.base)
        check_adapter_tensors(saved, checkpoint_model_config(self.base))
        load_adapter_tensors(model, checkpoint.read_weights())

    def provenance(self) -> dict[str, str]:
        return {"base_manifest_sha256": self.base.manifest_sha256,
                "base_checkpoint": recorded_path(self.base.path)}

    def adapter_weights(self, model: GPT) -> AdapterWeights | None:
        if self.spec is None:
            return None
        return adapter_weights(model, adapter_record(self.spec, self.base))


# The [finetune] keys an adapter records (adapter_config.json), so a resume can take them.
ADAPTER_SETTINGS = ("method", "rank", "alpha", "dropout", "targets", "rslora")
FLAG_NAMES = {"dropout": "lora-dropout"}  # the flags not named after their key


def adapter_spec(config: FinetuneConfig) -> AdapterSpec | None:
    if config.method == "full":
        return None
    return AdapterSpec(method=config.method, rank=config.rank, alpha=config.alpha,
                       dropout=config.dropout, targets=tuple(config.targets),
                       rslora=config.rslora)


def run_finetune(request: FinetuneRequest, on_event: EventFn,
                 dry_run: bool = False) -> TrainSummary:
    """Fine-tune `request.base` on the conversations in `request.data`; on --resume, with
    the adapter and the split the run recorded (the rest is resumed by `run_training`)."""
    latest = latest_valid_checkpoint(request.out)[0] if request.resume else None
    where = _base_path(request, latest)
    if latest is not None and latest.is_adapter:  # a run folder: the step it was tuned on
        where = base_step(where, adapter_of(latest).record.base_manifest_sha256)
    base = open_checkpoint(where)
    if base.is_adapter:
        raise CheckpointError(f"--base {base.path} is an adapter",
                              hint="merge it first (`fragment merge`), or fine-tune its base")
    tokenizer = checked_tokenizer(base)
    model_config = checkpoint_model_config(base)
    tuning, val_fraction = request.finetune, request.train.val_fraction
    if latest is not None:  # the shards and the adapter are built before the resume
        tuning = _resumed_tuning(tuning, latest)
        val_fraction = resumed_settings(latest, model_config, request.train,
                                        request.given).train.val_fraction
    recipe = FineTuning(base, request.data, request.tokens_dir or request.out / "tokens",
                        val_fraction, tokenizer, adapter_spec(tuning), request.limits, on_event)
    train = TrainRequest(data=request.data, tokenizer=base.tokenizer_path, out=request.out,
                         model=model_config, train=request.train, resume=request.resume,
                         tokens_dir=request.tokens_dir, given=request.given, recipe=recipe)
    return run_training(train, on_event, dry_run=dry_run)


def _resumed_tuning(given: FinetuneConfig, latest: Checkpoint) -> FinetuneConfig:
    """The [finetune] settings of the run being resumed: its adapter's, or "full" for a
    whole-model run. A setting given (flag or --config) must agree, as [train]'s do."""
    recorded: dict[str, object] = {"method": "full"}
    if latest.is_adapter:
        recorded = adapter_of(latest).record.model_dump(include=set(ADAPTER_SETTINGS))
    for key in sorted(given.model_fields_set & recorded.keys()):
        if getattr(given, key) != recorded[key]:
            raise ConfigError(f"finetune.{key} is {recorded[key]!r} in the run being resumed "
                              f"({latest.path}), but {getattr(given, key)!r} is given",
                              hint=f"a resumed run keeps the adapter it was started with: "
                                   f"leave out --{FLAG_NAMES.get(key, key)}, or tune into a new "
                                   f"--out")
    return given.model_copy(update=recorded)


def _base_path(request: FinetuneRequest, latest: Checkpoint | None) -> Path:
    """--base, or on --resume without it, the base the run's newest step recorded."""
    if request.base is not None:
        return request.base
    if not request.resume:
        raise ConfigError("--base is required", hint="pass the pretrained checkpoint to tune, "
                                                     "e.g. --base checkpoints")
    if latest is None:
        raise CheckpointError(f"no checkpoint in {request.out} to resume",
                              hint="start the run with --base")
    if latest.is_adapter:
        return adapter_of(latest).base_path
    raise ConfigError(f"--resume of a full fine-tuning run needs --base, in {request.out}",
                      hint="pass the checkpoint it started from (its steps record its hash)")
