"""Plain helpers and constants that several test modules share (fixtures are in conftest.py).

Test modules import from here (`from tests.helpers import ...`), never fixtures from each
other, so a module can move to another folder without breaking its neighbours.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fragment_llm.config import DEFAULT_PRESET, TRAIN_PRESETS, ModelConfig, TrainConfig, resolve
from fragment_llm.data.shards import MANIFEST
from fragment_llm.model.gpt import GPT
from fragment_llm.safety.files import sha256_bytes

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "raw"  # the bundled plays: the real text every corpus is cut from

# ------------------------------------------------------------------ corpora

# Documents that survive cleaning unchanged, so a processed folder reads back exactly these.
DOCS = [f"Document number {i}:" + " words and more words." * (i + 3) for i in range(12)]
# Merges "ab" (256), "abc" (257), "dd" (258): with the 5 special tokens, vocab 264.
MERGES = [(97, 98), (256, 99), (100, 100)]
TOKENIZER_VOCAB = 256 + len(MERGES) + 5
# What the chat tokenizer (and the tiny checkpoint) is trained on: chat lines and non-ASCII.
CHAT_TEXT = ("User: hello there, how are you?\nAssistant: I am well, thank you kindly.\n"
             "The quick brown fox jumps over the lazy dog. Café, naïve, 日本語, emoji 🙂.\n") * 20
CHAT_VOCAB = 300
# What the hostile checkpoint says, forever: "ok", a CSI clearing the screen, then an 8-bit
# OSC (U+009D is the bytes C2 9D) setting the window title, ended by BEL.
HOSTILE = b"ok\x1b[2J\xc2\x9d0;pwned\x07"


@dataclass(frozen=True)
class Corpus:
    """Three plays, the processed folder made from them, and a tokenizer trained on it."""

    raw: Path  # macbeth, hamlet and the sonnets, 40 KB of each
    other_raw: Path  # othello and julius caesar, for a second, different preprocess run
    processed: Path
    tokenizer: Path  # 320 tokens, by the train-tokenizer stage, so it names `processed`

    @property
    def root(self) -> Path:
        """The folder holding `processed`: where a run's token cache goes by default."""
        return self.processed.parent


# ------------------------------------------------------------------ token shards


def write_token_shards(folder: Path, train: list[np.ndarray], val: list[np.ndarray],
                       vocab: int = 300, dtype: str = "uint16", **overrides) -> Path:
    """A token-shard folder built by hand, one shard per array, so loader tests need no
    tokenizer; `overrides` replace manifest fields."""
    folder.mkdir(parents=True, exist_ok=True)

    def split(name, arrays):
        shards = []
        for i, array in enumerate(arrays):
            raw = np.asarray(array, dtype=dtype).tobytes()
            (folder / f"{name}-{i:05d}.bin").write_bytes(raw)
            shards.append({"file": f"{name}-{i:05d}.bin", "tokens": len(array),
                           "sha256": sha256_bytes(raw)})
        return {"documents": len(arrays), "tokens": sum(len(a) for a in arrays),
                "text_bytes": 4 * sum(len(a) for a in arrays), "shards": shards}

    manifest = {"format": "fragment-tokens", "version": 1, "fragment_version": "test",
                "dtype": dtype, "vocab_size": vocab, "eot_id": vocab - 1, "val_fraction": 0.1,
                "tokenizer_sha256": "0" * 64, "processed_manifest_sha256": "0" * 64,
                "train": split("train", train), "val": split("val", val)}
    manifest.update(overrides)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


# ------------------------------------------------------------------ models and runs


# The tiny model of every test that trains or generates (vocab and context vary).
TINY_GPT = {"n_layer": 2, "n_head": 2, "n_embd": 32}


def tiny_gpt(**config) -> GPT:
    """A random `TINY_GPT` with `config` added (or changed), in eval mode; the same weights
    on every call."""
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY_GPT, **config})).eval()


# The [model] and [train] tables of a training run that takes seconds on a CPU.
MODEL = {**TINY_GPT, "block_size": 32}
FAST = {"batch_size": 4, "max_steps": 12, "warmup_steps": 2, "lr": 3e-3, "eval_every": 6,
        "checkpoint_every": 4, "eval_blocks": 4, "log_every": 1, "device": "cpu",
        "precision": "fp32", "workers": 1}


def cli_train_config(**values) -> TrainConfig:
    """What `fragment train --config` makes of a [train] table holding `values`: the
    default preset's training values under them, so a run built here in process and one
    started through the CLI are the same run."""
    return resolve(TrainConfig, "train", {"train": values}, None, {},
                   base=TRAIN_PRESETS[DEFAULT_PRESET])


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    last = sorted(out.glob("step-*"))[-1]
    return load_file(last / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
