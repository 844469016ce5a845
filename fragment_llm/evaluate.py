"""`fragment eval`: measure a trained model on text.

It measures in one of two ways, and says which: `evaluate_held_out`, the
run's own held-out split exactly as training's final evaluation reads it (so the two
report the same bits per byte), or `evaluate_documents`, the documents of any processed
folder from its start, which for the training corpus includes text the model learned.
The model comes from `load_tuned` (finetune/artifact.py: a checkpoint, with an adapter
when one is given), like generate's and chat's. A fine-tuning run's held-out split is
conversations: the loss counts the assistant's tokens only, as training's does, and a
baseline (the adapter's base, or any checkpoint) can be measured on the same blocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from fragment_llm.checkpoint.load import Checkpoint
from fragment_llm.checkpoint.provenance import recorded_tokens_folder
from fragment_llm.checkpoint.trained import DEFAULT_BATCH_SIZE, Trained, load_trained
from fragment_llm.data.batches import IGNORED, consecutive_batches, eval_batches
from fragment_llm.data.processed import ProcessedCorpus
from fragment_llm.data.shards import MANIFEST, TokenShards
from fragment_llm.errors import DatasetError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.finetune.artifact import Tuned, load_tuned
from fragment_llm.model.gpt import GPT
from fragment_llm.model.loss import bits_per_byte
from fragment_llm.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class Baseline:
    """Another model measured on the same blocks: the adapter's base, or --baseline."""

    checkpoint: Path
    loss: float
    bpb: float


@dataclass(frozen=True)
class EvalResult:
    checkpoint: Path
    loss: float
    bpb: float
    tokens: int
    split: str  # "val": the run's held-out split; "all": `data`'s documents, no split
    data: Path  # the token-shard folder (split "val") or the processed folder ("all")
    adapter: Path | None = None
    assistant_only: bool = False  # conversations: the loss counts the assistant's tokens
    baseline: Baseline | None = None

    def as_json(self) -> dict[str, Any]:
        """`fragment eval --json`: the five keys always, the others when they apply."""
        values: dict[str, Any] = {"loss": self.loss, "bpb": self.bpb, "tokens": self.tokens,
                                  "split": self.split, "data": str(self.data)}
        if self.adapter is not None:
            values["adapter"] = str(self.adapter)
        if self.assistant_only:
            values["loss_counts"] = "assistant tokens"
        if self.baseline is not None:
            values["baseline"] = {"checkpoint": str(self.baseline.checkpoint),
                                  "loss": self.baseline.loss, "bpb": self.baseline.bpb}
        return values


def _measured(trained: Tuned) -> Checkpoint:
    """The step folder whose run is measured: the adapter's, else the checkpoint's."""
    return trained.adapter.checkpoint if trained.adapter is not None else trained.checkpoint


def _final_eval_blocks(trained: Tuned) -> int:
    """How many blocks the run's final evaluation read: `final_eval_blocks`, or the
    periodic `eval_blocks` when that is larger (train.py, `_final_evaluation`)."""
    recorded = _measured(trained).config
    return max(recorded.train_count("final_eval_blocks", 512),
               recorded.train_count("eval_blocks", 64))


@torch.no_grad()
def _mean_loss(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               total_blocks: int, progress: ProgressFn) -> float:
    """Mean next-token loss (nats) over `batches` of (inputs, targets), summed in float64."""
    nll, count, done = 0.0, 0, 0
    progress("evaluating", 0, total_blocks)
    for x, y in batches:
        logits = model(x)
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum",
                                     ignore_index=IGNORED))
        count += int((y != IGNORED).sum())
        done += len(x)
        progress("evaluating", done, total_blocks)
    return nll / max(count, 1)


def held_out_shards(trained: Tuned, tokens: Path) -> TokenShards:
    """The token shards the checkpoint was trained on: `tokens` itself when it holds a
    manifest, else the cache folder `fragment train` names from the hashes the checkpoint
    records (`tokens/<key>`). Refused unless its manifest is the one recorded."""
    checkpoint = _measured(trained)
    recorded = checkpoint.provenance.tokens_manifest_sha256
    folder = recorded_tokens_folder(tokens, checkpoint)
    if folder is None or not os.path.lexists(folder / MANIFEST):
        raise DatasetError(f"the token shards {checkpoint.path} was trained on are not in "
                           f"{tokens}", hint=HINT_OTHER_TEXT)
    shards = TokenShards.open(folder, trained.model.config.vocab_size)
    if shards.manifest_sha256 != recorded:
        raise DatasetError(f"{folder} holds other token shards than the ones "
                           f"{checkpoint.path} was trained on", hint=HINT_OTHER_TEXT)
    return shards


HINT_OTHER_TEXT = ("pass --tokens with the data/tokens folder of the run, or --data with a "
                   "processed folder to measure all of its documents instead")


def default_tokens(trained: Tuned, fallback: Path) -> Path:
    """A fine-tuning run caches its conversations in RUN/tokens; pretraining runs, in
    data/tokens (`fallback`)."""
    beside = _measured(trained).path.parent / "tokens"
    return beside if beside.is_dir() and not beside.is_symlink() else fallback


@dataclass(frozen=True)
class EvalRequest:
    """What to measure: a checkpoint (with `adapter`), on its run's held-out split found
    in `tokens` (None: beside the run, else `default_tokens`), and against `baseline`
    (None: the adapter's base when there is an adapter, else nothing)."""

    checkpoint: Path | None
    tokens: Path | None = None
    default_tokens: Path = Path("data/tokens")
    max_blocks: int | None = None
    adapter: Path | None = None
    baseline: Path | None = None


def evaluate_held_out(request: EvalRequest, progress: ProgressFn = no_progress) -> EvalResult:
    """Loss and bits per byte on the run's own held-out split, measured as training's
    final evaluation measures it (same blocks, batches and formula): the same figure."""
    trained = load_tuned(request.checkpoint, request.adapter, evaluating=True)
    shards = held_out_shards(trained, request.tokens or default_tokens(
        trained, request.default_tokens))
    block = trained.model.config.block_size
    blocks = min(shards.val.num_blocks(block), request.max_blocks or _final_eval_blocks(trained))
    if blocks == 0:
        raise DatasetError(f"the held-out split in {shards.folder} is shorter than one block "
                           f"({block + 1} tokens)", hint=HINT_OTHER_TEXT)
    batch = _measured(trained).config.train_count("batch_size", DEFAULT_BATCH_SIZE)

    def measure(model: GPT) -> tuple[float, float]:
        loss = _mean_loss(model, eval_batches(shards.val, block, batch, blocks), blocks,
                          progress)
        val = shards.manifest.val
        return loss, bits_per_byte(loss, val.counted_tokens, val.text_bytes)

    loss, bpb = measure(trained.model)
    baseline_path = request.baseline or (trained.checkpoint.path if trained.adapter else None)
    baseline = None
    if baseline_path is not None:
        other = load_trained(baseline_path, evaluating=True)
        _same_tokenizer(other, trained)
        baseline = Baseline(other.checkpoint.path, *measure(other.model))
    return EvalResult(_measured(trained).path, loss, bpb, blocks * block, "val",
                      shards.folder, adapter=request.adapter,
                      assistant_only=shards.manifest.masked, baseline=baseline)


def _same_tokenizer(baseline: Trained, trained: Tuned) -> None:
    if baseline.tokenizer.sha256 != trained.tokenizer.sha256:
        raise DatasetError(f"the baseline {baseline.checkpoint.path} uses another tokenizer: "
                           "the same blocks would mean other text",
                           hint="compare checkpoints trained with the same tokenizer")


def _token_stream(processed: Path, tokenizer: Tokenizer, want: int,
                  progress: ProgressFn) -> tuple[np.ndarray, int]:
    """Tokens of the folder's documents (eot-separated) until `want`, and their bytes."""
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


def evaluate_documents(request: EvalRequest, processed: Path,
                       progress: ProgressFn = no_progress) -> EvalResult:
    """Mean next-token loss over the first `max_blocks` blocks of the documents of
    `processed`, in order (training text included), and bits per byte."""
    trained = load_tuned(request.checkpoint, request.adapter, evaluating=True)
    max_blocks = request.max_blocks
    block = trained.model.config.block_size
    max_blocks = max_blocks or _final_eval_blocks(trained)
    tokens, text_bytes = _token_stream(processed, trained.tokenizer, max_blocks * block + 1,
                                       progress)
    usable = min(max_blocks, (len(tokens) - 1) // block)
    if usable == 0:
        raise DatasetError(f"fewer than {block + 1} tokens in {processed}",
                           hint="evaluate on more text")
    batch = trained.checkpoint.config.train_count("batch_size", DEFAULT_BATCH_SIZE)
    batches = consecutive_batches(tokens, block, batch, usable)
    loss = _mean_loss(trained.model, batches, usable, progress)
    bytes_covered = text_bytes * min(1.0, (usable * block + 1) / len(tokens))
    bpb = bits_per_byte(loss, usable * block, bytes_covered)
    return EvalResult(_measured(trained).path, loss, bpb, usable * block, "all", processed,
                      adapter=request.adapter)
