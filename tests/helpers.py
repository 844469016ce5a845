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

from fragment_llm.checkpoint.load import open_checkpoint
from fragment_llm.checkpoint.save import save_checkpoint
from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.config import (
    DEFAULT_PRESET,
    MODEL_PRESETS,
    SPECIAL_TOKENS_CHAT_FORMAT,
    TRAIN_PRESETS,
    ModelConfig,
    TrainConfig,
    resolve,
)
from fragment_llm.data.shards import MANIFEST
from fragment_llm.finetune.adapters import AdapterSpec, attach_adapters
from fragment_llm.finetune.artifact import adapter_record, adapter_weights
from fragment_llm.model.gpt import GPT
from fragment_llm.safety.files import sha256_bytes
from fragment_llm.tokenizer.tokenizer import Tokenizer

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


def cli_model_config(**values) -> ModelConfig:
    """What `fragment train --config` makes of a [model] table holding `values`: the
    default preset's model under them (small sets zero_init_proj), as cli_train_config."""
    return resolve(ModelConfig, "model", {"model": values}, None, {},
                   base=MODEL_PRESETS[DEFAULT_PRESET])


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


# ------------------------------------------------------------------ scripted chat models

SCRIPTED_EMBD = 320  # one-hot embeddings need at least one dimension per token


def scripted_model(vocab: int, after: dict[int, int], otherwise: int) -> GPT:
    """A bigram machine: greedily, token `t` is followed by `after[t]`, any other token by
    `otherwise`. Attention and MLP write nothing (zero output projections), so the last
    hidden state is the current token's one-hot embedding, normalised, and the logits
    are column `t` of lm_head."""
    config = ModelConfig(vocab_size=vocab, n_layer=1, n_head=4, n_embd=SCRIPTED_EMBD,
                         block_size=64, tie_embeddings=False)
    model = GPT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.zero_()
        model.wte.weight.copy_(torch.eye(vocab, SCRIPTED_EMBD))
        head = torch.zeros(vocab, SCRIPTED_EMBD)
        head[otherwise, :vocab] = 1.0
        for here, then in after.items():
            head[:, here] = 0.0
            head[then, here] = 1.0
        model.lm_head.weight.copy_(head)
    return model.eval()


def scripted_answer(tok: Tokenizer, answer: str, otherwise: str = "x") -> GPT:
    """A model that answers `<|assistant|>` with `answer` then `<|end|>` (greedily), and
    continues anything else with `otherwise`, repeated."""
    chain = [tok.special_id("<|assistant|>"), *tok.encode(answer), tok.special_id("<|end|>")]
    assert len(set(chain)) == len(chain), "each token of the answer once"
    (filler,) = tok.encode(otherwise)
    return scripted_model(tok.vocab_size, dict(zip(chain, chain[1:])), filler)


def save_scripted(run: Path, model: GPT, tokenizer_file: Path,
                  chat_format: str | None = None) -> Path:
    """`model` as step 1 of `run`: a base model, or with `chat_format` a tuned one."""
    config: dict[str, object] = {"model": model.config.model_dump(mode="json")}
    if chat_format is not None:
        config["chat_format"] = chat_format
    return save_checkpoint(run, 1, model=model, optimizer=None, trainer_state={"step": 1},
                           config=config, tokenizer_file=tokenizer_file)


def save_untrained_adapter(run: Path, base: Path) -> Path:
    """A LoRA adapter of `base` as a fine-tuning run's step 1 would hold it before any
    step (B = 0: base + adapter computes the base), which chats with the special tokens."""
    model = load_trained(base).model
    spec = AdapterSpec(method="lora", rank=2, alpha=4.0)
    attach_adapters(model, spec)
    return save_adapter_step(run, 1, model, spec, base)


def save_adapter_step(run: Path, step: int, model: GPT, spec: AdapterSpec, base: Path) -> Path:
    """`model`'s attached adapters saved as an adapter step folder of `base` (chat format
    with special tokens, no optimizer state), the way `fragment finetune` saves one."""
    checkpoint = open_checkpoint(base)
    provenance = {"tokenizer_sha256": Tokenizer.load(checkpoint.tokenizer_path).sha256,
                  "base_manifest_sha256": checkpoint.manifest_sha256}
    return save_checkpoint(
        run, step, model=None, optimizer=None, trainer_state={"step": step},
        config={"model": checkpoint.config.model, "chat_format": SPECIAL_TOKENS_CHAT_FORMAT},
        tokenizer_file=checkpoint.tokenizer_path, provenance=provenance,
        adapter=adapter_weights(model, adapter_record(spec, checkpoint)))
