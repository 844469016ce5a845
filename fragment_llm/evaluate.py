"""`fragment eval`: measure a trained model on text.

It measures in one of two ways, and says which: `evaluate_held_out`, the
run's own held-out split exactly as training's final evaluation reads it (so the two
report the same bits per byte), or `evaluate_documents`, the documents of any processed
folder from its start, which for the training corpus includes text the model learned.
The model comes from `load_trained` (checkpoint/trained.py), like generate's and chat's.
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

from fragment_llm.checkpoint.provenance import recorded_tokens_folder
from fragment_llm.checkpoint.trained import DEFAULT_BATCH_SIZE, Trained, load_trained
from fragment_llm.data.batches import consecutive_batches, eval_batches
from fragment_llm.data.processed import ProcessedCorpus
from fragment_llm.data.shards import MANIFEST, TokenShards
from fragment_llm.errors import DatasetError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.model.gpt import GPT
from fragment_llm.model.loss import bits_per_byte
from fragment_llm.tokenizer.tokenizer import Tokenizer


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


def _final_eval_blocks(trained: Trained) -> int:
    """How many blocks the run's final evaluation read: `final_eval_blocks`, or the
    periodic `eval_blocks` when that is larger (train.py, `_final_evaluation`)."""
    recorded = trained.checkpoint.config
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
        nll += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
        done += len(x)
        progress("evaluating", done, total_blocks)
    return nll / count


def held_out_shards(trained: Trained, tokens: Path) -> TokenShards:
    """The token shards the checkpoint was trained on: `tokens` itself when it holds a
    manifest, else the cache folder `fragment train` names from the hashes the checkpoint
    records (`tokens/<key>`). Refused unless its manifest is the one recorded."""
    checkpoint = trained.checkpoint
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


def evaluate_held_out(path: Path, tokens: Path, max_blocks: int | None = None,
                      progress: ProgressFn = no_progress) -> EvalResult:
    """Loss and bits per byte on the run's own held-out split, measured as training's
    final evaluation measures it (same blocks, batches and formula): the same figure."""
    trained = load_trained(path, evaluating=True)
    shards = held_out_shards(trained, tokens)
    block = trained.model.config.block_size
    blocks = min(shards.val.num_blocks(block), max_blocks or _final_eval_blocks(trained))
    if blocks == 0:
        raise DatasetError(f"the held-out split in {shards.folder} is shorter than one block "
                           f"({block + 1} tokens)", hint=HINT_OTHER_TEXT)
    batch = trained.checkpoint.config.train_count("batch_size", DEFAULT_BATCH_SIZE)
    batches = eval_batches(shards.val, block, batch, blocks)
    loss = _mean_loss(trained.model, batches, blocks, progress)
    val = shards.manifest.val
    return EvalResult(trained.checkpoint.path, loss, bits_per_byte(loss, val.tokens,
                      val.text_bytes), blocks * block, "val", shards.folder)


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


def evaluate_documents(path: Path, processed: Path, max_blocks: int | None = None,
                       progress: ProgressFn = no_progress) -> EvalResult:
    """Mean next-token loss over the first `max_blocks` blocks of the documents of
    `processed`, in order (training text included), and bits per byte."""

    trained = load_trained(path, evaluating=True)
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
    return EvalResult(trained.checkpoint.path, loss, bpb, usable * block, "all", processed)
