"""Shared setup of the fine-tuning tests: a tiny base checkpoint and a small set of
conversations, built once per session and handed out read only.

- `base_checkpoint`: a random `TINY_GPT` (vocab of `chat_tokenizer`, context 64) saved as
  a pretraining step folder, with the provenance a `fragment train` step records
  (tokenizer and model config hashes), so `fragment finetune --base` takes it.
- `other_base`, `other_tokenizer_base`: a base of the same shape with other weights, and
  one trained with another tokenizer (same vocabulary size).
- `conversations_file`: `CONVERSATIONS` short two-turn conversations in the OpenAI
  `messages` format, a few with a system prompt: a train split of some dozens of
  64-token blocks and a validation split of at least one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fragment_llm.checkpoint.records import model_config_sha256
from fragment_llm.checkpoint.save import save_checkpoint
from fragment_llm.config import ModelConfig, TokenizerConfig
from fragment_llm.model.gpt import GPT
from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.helpers import CHAT_VOCAB, TINY_GPT

CONVERSATIONS = 40
BASE_BLOCK_SIZE = 64


def conversation_record(number: int) -> dict[str, object]:
    """Conversation `number`: a question and an answer, both naming it."""
    messages = [{"role": "user", "content": f"hello there, how are you, number {number}?"},
                {"role": "assistant", "content": f"I am well, thank you kindly. {number}"}]
    if number % 5 == 0:
        messages.insert(0, {"role": "system", "content": "Answer kindly."})
    return {"messages": messages}


def save_base(run: Path, tokenizer_file: Path, seed: int = 0) -> Path:
    """A tiny random model (weights from `seed`) saved as `fragment train` would save a
    step: the records' hashes in the provenance. Returns the step folder."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**TINY_GPT, vocab_size=CHAT_VOCAB, block_size=BASE_BLOCK_SIZE))
    config = model.config.model_dump(mode="json")
    provenance = {"tokenizer_sha256": Tokenizer.load(tokenizer_file).sha256,
                  "model_config_sha256": model_config_sha256(config)}
    return save_checkpoint(run, 10, model=model, optimizer=None, trainer_state={"step": 10},
                           config={"model": config}, tokenizer_file=tokenizer_file,
                           provenance=provenance)


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory, chat_tokenizer) -> Path:
    """The base step folder every fine-tuning test tunes. Read only."""
    return save_base(tmp_path_factory.mktemp("base") / "run", chat_tokenizer)


@pytest.fixture(scope="session")
def other_base(tmp_path_factory, chat_tokenizer) -> Path:
    """A base like `base_checkpoint` (same config, same tokenizer) with other weights.
    Read only."""
    return save_base(tmp_path_factory.mktemp("other-weights") / "run", chat_tokenizer, seed=1)


@pytest.fixture(scope="session")
def conversations_file(tmp_path_factory) -> Path:
    """`CONVERSATIONS` conversations as JSON Lines. Read only."""
    path = tmp_path_factory.mktemp("conversations") / "chat.jsonl"
    path.write_text("".join(json.dumps(conversation_record(n)) + "\n"
                            for n in range(CONVERSATIONS)), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def other_tokenizer_base(tmp_path_factory) -> Path:
    """A base like `base_checkpoint` (same model config, same vocabulary size) trained
    with another tokenizer. Read only."""
    root = tmp_path_factory.mktemp("other-base")
    text = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod. " * 30
    Tokenizer.train([text], TokenizerConfig(vocab_size=CHAT_VOCAB, workers=1)).save(
        root / "tokenizer.json")
    return save_base(root / "run", root / "tokenizer.json")


# ------------------------------------------------- tuned models (tests of using them)

# A few steps at a high learning rate: LoRA's B and DoRA's magnitude move well away from
# their start, so a merge or an eval that ignored the adapter would show. Every held-out
# block is evaluated at the end (final_eval_blocks covers the split).
TUNED_TRAIN = {"batch_size": 4, "max_steps": 3, "warmup_steps": 1, "lr": 3e-2,
               "eval_every": 0, "checkpoint_every": 0, "eval_blocks": 4,
               "final_eval_blocks": 64, "log_every": 1, "device": "cpu", "precision": "fp32",
               "workers": 1}


def tune(base: Path, data: Path, out: Path, method: str) -> Path:
    """`fragment finetune --method METHOD` of `base` on `data` into the run folder `out`
    (rank 4, alpha 8 for the adapters), as `TUNED_TRAIN` says. Returns `out`."""
    from fragment_llm.config import FINETUNE_TRAIN, FinetuneConfig, TrainConfig, resolve
    from fragment_llm.finetune.run import FinetuneRequest, run_finetune

    train = resolve(TrainConfig, "train", {"train": TUNED_TRAIN}, None, {},
                    base=dict(FINETUNE_TRAIN))
    tuning = FinetuneConfig(method=method, rank=4, alpha=8.0)
    run_finetune(FinetuneRequest(base=base, data=data, out=out, finetune=tuning, train=train),
                 lambda _event: None)
    return out


@pytest.fixture(scope="session")
def tuned_runs(tmp_path_factory, base_checkpoint, conversations_file) -> dict[str, Path]:
    """A LoRA, a DoRA and a full fine-tuning run folder of `base_checkpoint` on
    `conversations_file`, `TUNED_TRAIN`'s few steps each (one step folder, the
    conversation shards in RUN/tokens). Keyed by method. Read only."""
    root = tmp_path_factory.mktemp("tuned")
    return {method: tune(base_checkpoint, conversations_file, root / method, method)
            for method in ("lora", "dora", "full")}
