"""Load a trained model from a checkpoint for inference, and measure it on text.

`load_trained` is the one way later stages (eval, generate, chat) get a model: through
the hostile-folder checkpoint loader, with the tokenizer copy inside the checkpoint,
checked against the model's vocabulary before any weight is read.

`fragment eval` measures in one of two ways, and says which: `evaluate_held_out`, the
run's own held-out split exactly as training's final evaluation reads it (so the two
report the same bits per byte), or `evaluate_documents`, the documents of any processed
folder from its start, which for the training corpus includes text the model learned.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import ValidationError

from fragment_llm.config import ModelConfig
from fragment_llm.errors import CheckpointError, DatasetError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.model.gpt import GPT
from fragment_llm.model.loss import bits_per_byte
from fragment_llm.model.size import check_inference_memory
from fragment_llm.safety.text import escape_for_display


@dataclass
class Trained:
    """A model ready for inference, with the tokenizer it was trained with."""

    model: GPT
    tokenizer: Any
    checkpoint: Any  # checkpoint.Checkpoint
    device: torch.device

    @property
    def step(self) -> int:
        return self.checkpoint.step

    @property
    def val_bpb(self) -> float | None:
        value = self.checkpoint.config.get("val_bpb")
        return float(value) if isinstance(value, (int, float)) else None


def load_trained(path: Path, device: torch.device | None = None,
                 evaluating: bool = False) -> Trained:
    """Resolve a run or step folder, verify it, and build the model on `device`; for
    `generate`/`chat`, or for `eval` (its memory is planned for the run's batch size)."""
    from fragment_llm.checkpoint.load import open_checkpoint
    from fragment_llm.verify import checked_tokenizer

    device = device or torch.device("cpu")
    checkpoint = open_checkpoint(path)
    config = checkpoint_model_config(checkpoint)
    tokenizer = checked_tokenizer(checkpoint)  # the copy and config match the provenance
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"tokenizer vocab size {tokenizer.vocab_size} differs from the "
                              f"model's {config.vocab_size}, in {checkpoint.path}")
    _refuse_size_mismatch(config, checkpoint)
    eval_batch = _run_number(checkpoint.config, "batch_size", 8) if evaluating else None
    check_inference_memory(config, checkpoint.path, device, eval_batch)
    # Built for real (not on the meta device): non-persistent buffers such as RoPE's
    # cos/sin tables are computed in __init__ and are not in the checkpoint.
    model = GPT(config).to(device)
    checkpoint.load_model_into(model)
    model.eval()
    return Trained(model, tokenizer, checkpoint, device)


def checkpoint_model_config(checkpoint: Any) -> ModelConfig:
    """The checkpoint's [model] config, or one line naming the field and the rule."""
    try:
        config = ModelConfig.model_validate(checkpoint.config.get("model"))
    except ValidationError as exc:
        error = exc.errors()[0]
        # Escaped: the key names come from the file and must not break the line.
        field = escape_for_display(".".join(str(part) for part in error["loc"])) or "model"
        raise CheckpointError(f"invalid model config: model.{field}: {error['msg']}, in "
                              f"{checkpoint.path / 'config.json'}",
                              hint="use another checkpoint; this config.json was not written "
                                   "by `fragment train`") from None
    if config.vocab_size is None:  # "the tokenizer's" in a [model] table; training records it
        raise CheckpointError(f"invalid model config: model.vocab_size: Field required, in "
                              f"{checkpoint.path / 'config.json'}",
                              hint="use another checkpoint; this config.json was not written "
                                   "by `fragment train`")
    return config


def _refuse_size_mismatch(config: ModelConfig, checkpoint: Any) -> None:
    """Compare sizes before building: config.json is checked against model.safetensors
    (whose size is capped) so a hostile config cannot make us allocate a huge model."""
    from fragment_llm.model.size import count_parameters

    expected = count_parameters(config)  # from the config: nothing allocated
    stored = sum(math.prod(spec.shape) for spec in checkpoint.model_header.tensors.values())
    if expected != stored:
        raise CheckpointError(f"config.json describes {expected:,} parameters but "
                              f"model.safetensors holds {stored:,}, in {checkpoint.path}",
                              hint="the two files do not belong together; use another "
                                   "checkpoint")


@dataclass(frozen=True)
class EvalResult:
    checkpoint: Path
    loss: float
    bpb: float
    tokens: int
    split: str  # "val": the run's held-out split; "all": `data`'s documents, no split
    data: Path  # the token-shard folder (split "val") or the processed folder ("all")

    def as_json(self) -> dict[str, Any]:
        """`fragment eval --json`."""
        return {"loss": self.loss, "bpb": self.bpb, "tokens": self.tokens,
                "split": self.split, "data": str(self.data)}


def _run_number(config: dict[str, Any], key: str, default: int) -> int:
    """A positive integer from a checkpoint config's recorded [train] table, or `default`."""
    train = config.get("train")
    value = train.get(key) if isinstance(train, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return default


def _final_eval_blocks(trained: Trained) -> int:
    """How many blocks the run's final evaluation read: `final_eval_blocks`, or the
    periodic `eval_blocks` when that is larger (train.py, `_final_evaluation`)."""
    return max(_run_number(trained.checkpoint.config, "final_eval_blocks", 512),
               _run_number(trained.checkpoint.config, "eval_blocks", 64))


@torch.no_grad()
def _mean_loss(model: GPT, batches: Any, total_blocks: int, progress: ProgressFn) -> float:
    """Mean next-token loss (nats) over `batches` of (inputs, targets), summed in float64."""
    nll, count, done = 0.0, 0, 0
    progress("evaluating", 0, total_blocks)
    for x, y in batches:
        logits = model(x)
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
        done += len(x)
        progress("evaluating", done, total_blocks)
    return nll / count


def held_out_shards(trained: Trained, tokens: Path) -> Any:
    """The token shards the checkpoint was trained on: `tokens` itself when it holds a
    manifest, else the cache folder `fragment train` names from the hashes the checkpoint
    records (`tokens/<key>`). Refused unless its manifest is the one recorded."""
    from fragment_llm.data.shards import TokenShards, recorded_tokens_folder

    checkpoint = trained.checkpoint
    recorded = checkpoint.provenance.get("tokens_manifest_sha256")
    folder = recorded_tokens_folder(tokens, checkpoint.provenance, checkpoint.config)
    if folder is None or not os.path.lexists(folder / "manifest.json"):
        raise DatasetError(f"the token shards {checkpoint.path} was trained on are not in "
                           f"{tokens}", hint=HINT_OTHER_TEXT)
    shards = TokenShards.open(folder, trained.model.config.vocab_size)
    if shards.manifest_sha256 != recorded:
        raise DatasetError(f"{folder} holds other token shards than the ones "
                           f"{checkpoint.path} was trained on", hint=HINT_OTHER_TEXT)
    return shards


HINT_OTHER_TEXT = ("pass --tokens with the data/tokens folder of the run, or --data with a "
                   "processed folder to measure all of its documents instead")


def evaluate_held_out(path: Path, tokens: Path, max_blocks: int | None = None,
                      progress: ProgressFn = no_progress) -> EvalResult:
    """Loss and bits per byte on the run's own held-out split, measured as training's
    final evaluation measures it (same blocks, batches and formula): the same figure."""
    from fragment_llm.data.batches import eval_batches

    trained = load_trained(path, evaluating=True)
    shards = held_out_shards(trained, tokens)
    block = trained.model.config.block_size
    blocks = min(shards.val.num_blocks(block), max_blocks or _final_eval_blocks(trained))
    if blocks == 0:
        raise DatasetError(f"the held-out split in {shards.folder} is shorter than one block "
                           f"({block + 1} tokens)", hint=HINT_OTHER_TEXT)
    batch = _run_number(trained.checkpoint.config, "batch_size", 8)
    batches = eval_batches(shards.val, block, batch, blocks)
    loss = _mean_loss(trained.model, batches, blocks, progress)
    val = shards.manifest.val
    return EvalResult(trained.checkpoint.path, loss, bits_per_byte(loss, val.tokens,
                      val.text_bytes), blocks * block, "val", shards.folder)


def _token_stream(processed: Path, tokenizer: Any, want: int,
                  progress: ProgressFn) -> tuple[np.ndarray, int]:
    """Tokens of the folder's documents (eot-separated) until `want`, and their bytes."""
    from fragment_llm.data.processed import ProcessedCorpus

    corpus = ProcessedCorpus.open(processed)
    pieces, count, text_bytes = [], 0, 0
    for text in corpus.iter_texts():
        ids = tokenizer.encode(text) + [tokenizer.eot_id]
        pieces.append(np.asarray(ids, dtype=np.int64))
        count += len(ids)
        text_bytes += len(text.encode("utf-8"))
        progress("tokenizing", min(count, want), want)
        if count >= want:
            break
    if not pieces:
        raise DatasetError(f"no documents in {processed}")
    return np.concatenate(pieces), text_bytes


def evaluate_documents(path: Path, processed: Path, max_blocks: int | None = None,
                       progress: ProgressFn = no_progress) -> EvalResult:
    """Mean next-token loss over the first `max_blocks` blocks of the documents of
    `processed`, in order (training text included), and bits per byte."""
    from fragment_llm.data.batches import consecutive_batches

    trained = load_trained(path, evaluating=True)
    block = trained.model.config.block_size
    max_blocks = max_blocks or _final_eval_blocks(trained)
    tokens, text_bytes = _token_stream(processed, trained.tokenizer, max_blocks * block + 1,
                                       progress)
    usable = min(max_blocks, (len(tokens) - 1) // block)
    if usable == 0:
        raise DatasetError(f"fewer than {block + 1} tokens in {processed}",
                           hint="evaluate on more text")
    batch = _run_number(trained.checkpoint.config, "batch_size", 8)
    batches = consecutive_batches(tokens, block, batch, usable)
    loss = _mean_loss(trained.model, batches, usable, progress)
    bytes_covered = text_bytes * min(1.0, (usable * block + 1) / len(tokens))
    bpb = bits_per_byte(loss, usable * block, bytes_covered)
    return EvalResult(trained.checkpoint.path, loss, bpb, usable * block, "all", processed)
