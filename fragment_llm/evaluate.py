"""Load a trained model from a checkpoint for inference, and measure it on any text.

`load_trained` is the one way later stages (eval, generate, chat) get a model: through
the hostile-folder checkpoint loader, with the tokenizer copy inside the checkpoint,
checked against the model's vocabulary before any weight is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import ValidationError

from fragment_llm.config import ModelConfig
from fragment_llm.errors import CheckpointError, DatasetError
from fragment_llm.memplan import MemoryPlan
from fragment_llm.model import GPT
from fragment_llm.sanitize import escape_for_display

MiB = 1 << 20


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
                 eval_batch: int | None = None) -> Trained:
    """Resolve a run or step folder, verify it, and build the model on `device`; for
    `generate`/`chat`, or for `eval` at `eval_batch` blocks (what its memory is planned for)."""
    from fragment_llm.checkpoint import load_checkpoint, resolve_checkpoint
    from fragment_llm.verify import checked_tokenizer

    device = device or torch.device("cpu")
    checkpoint = load_checkpoint(resolve_checkpoint(path))
    config = checkpoint_model_config(checkpoint)
    tokenizer = checked_tokenizer(checkpoint)  # the copy and config match the provenance
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"tokenizer vocab size {tokenizer.vocab_size} differs from the "
                              f"model's {config.vocab_size}, in {checkpoint.path}")
    _refuse_size_mismatch(config, checkpoint)
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
        return ModelConfig.model_validate(checkpoint.config.get("model"))
    except ValidationError as exc:
        error = exc.errors()[0]
        # Escaped: the key names come from the file and must not break the line.
        field = escape_for_display(".".join(str(part) for part in error["loc"])) or "model"
        raise CheckpointError(f"invalid model config: model.{field}: {error['msg']}, in "
                              f"{checkpoint.path / 'config.json'}",
                              hint="use another checkpoint; this config.json was not written "
                                   "by `fragment train`") from None


def _refuse_size_mismatch(config: ModelConfig, checkpoint: Any) -> None:
    """Compare sizes before building: config.json is checked against model.safetensors
    (whose size is capped) so a hostile config cannot make us allocate a huge model."""
    from fragment_llm.model import count_parameters

    expected = count_parameters(config)  # counted on the meta device: nothing allocated
    stored = sum(math.prod(spec.shape) for spec in checkpoint.model_header.tensors.values())
    if expected != stored:
        raise CheckpointError(f"config.json describes {expected:,} parameters but "
                              f"model.safetensors holds {stored:,}, in {checkpoint.path}",
                              hint="the two files do not belong together; use another "
                                   "checkpoint")


def check_inference_memory(config: ModelConfig, folder: Path, device: torch.device,
                           eval_batch: int | None = None) -> MemoryPlan:
    """Refuse a config whose planned peak memory (`memplan.plan_inference`) is past the
    limit `train` uses by default (80% of the memory available now), before any of it is
    allocated: the parameter count does not bound the KV cache or the attention."""
    from fragment_llm.memplan import SAFE_FRACTION, default_memory_limit, plan_inference

    plan = plan_inference(config, device.type, eval_batch)
    limit = default_memory_limit(device)
    if plan.total > limit:
        use = "generate" if eval_batch is None else f"evaluate {eval_batch} blocks at once"
        raise CheckpointError(
            f"config.json plans {plan.total / MiB:,.0f} MiB to {use} ({config.n_layer} "
            f"layers, a {config.block_size:,}-token context), over the limit of "
            f"{limit / MiB:,.0f} MiB ({SAFE_FRACTION:.0%} of the memory available), in "
            f"{folder / 'config.json'}",
            hint="run it where more memory is free; a config.json that asks for a huge "
                 "context or depth with few weights is a sign that it was edited")
    return plan


@dataclass(frozen=True)
class EvalResult:
    checkpoint: Path
    loss: float
    bpb: float
    tokens: int


def _token_stream(processed: Path, tokenizer: Any, want: int) -> tuple[np.ndarray, int]:
    """Tokens of the folder's documents (eot-separated) until `want`, and their bytes."""
    from fragment_llm.processed import ProcessedCorpus

    corpus = ProcessedCorpus.open(processed)
    pieces, count, text_bytes = [], 0, 0
    for text in corpus.iter_texts():
        ids = tokenizer.encode(text) + [tokenizer.eot_id]
        pieces.append(np.asarray(ids, dtype=np.int64))
        count += len(ids)
        text_bytes += len(text.encode("utf-8"))
        if count >= want:
            break
    if not pieces:
        raise DatasetError(f"no documents in {processed}")
    return np.concatenate(pieces), text_bytes


@torch.no_grad()
def evaluate_checkpoint(path: Path, processed: Path, max_blocks: int = 256,
                        batch_size: int = 8) -> EvalResult:
    """Mean next-token loss over up to `max_blocks` blocks, and bits per byte."""
    trained = load_trained(path, eval_batch=batch_size)
    block = trained.model.config.block_size
    tokens, text_bytes = _token_stream(processed, trained.tokenizer, max_blocks * block + 1)
    usable = min(max_blocks, (len(tokens) - 1) // block)
    if usable == 0:
        raise DatasetError(f"fewer than {block + 1} tokens in {processed}",
                           hint="evaluate on more text")
    nll, count = 0.0, 0
    for first in range(0, usable, batch_size):
        rows = [tokens[k * block:k * block + block + 1]
                for k in range(first, min(usable, first + batch_size))]
        data = torch.from_numpy(np.stack(rows))
        logits = trained.model(data[:, :-1])
        nll += float(F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten(),
                                     reduction="sum"))
        count += data[:, 1:].numel()
    loss = nll / count
    bytes_covered = text_bytes * min(1.0, (usable * block + 1) / len(tokens))
    bpb = loss * count / bytes_covered / math.log(2)
    return EvalResult(trained.checkpoint.path, loss, bpb, count)
