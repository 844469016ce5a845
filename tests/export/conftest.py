"""Shared setup of the export tests: a base checkpoint and a fine-tuned one, exported once.

- `base_step`: a random GQA model (4 query heads, 2 key/value heads, tied embeddings)
  with the `chat_tokenizer`, its matrices scaled up so that greedy decoding has clear
  winners (a freshly initialised model's logits are nearly uniform, and a near tie
  would make "same greedy ids" a test of rounding, not of the export).
- `adapter_step`: a LoRA adapter of it with random (non-zero) B, chatting with the
  special tokens: the fine-tuned checkpoint, merged by export.
- `exports`: both as HF folders and as GGUF files (F32 and Q8_0), through the library
  call the CLI makes. Read only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fragment_llm.checkpoint.records import model_config_sha256
from fragment_llm.checkpoint.save import save_checkpoint
from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.config import ModelConfig
from fragment_llm.export.run import ExportRequest, export
from fragment_llm.finetune.adapters import AdapterSpec, attach_adapters
from fragment_llm.model.gpt import GPT
from fragment_llm.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer
from tests.helpers import CHAT_VOCAB, save_adapter_step

EXPORT_MODEL = {"vocab_size": CHAT_VOCAB, "n_layer": 2, "n_head": 4, "n_kv_head": 2,
                "n_embd": 64, "block_size": 128}
WEIGHT_SCALE = 4.0
# Text an exported tokenizer must encode to our ids (special-token text stays text).
HOSTILE_STRINGS = [
    "", "plain words", *SPECIAL_TOKENS, "a<|end|>b<|user|>c<|endoftext|>", "<|end|", "|>",
    "nul\x00inside\x00", "bidi \u202eevil\u202c \u2066x\u2069", "zero\u200bwidth\ufeff",
    "emoji 🙂👩‍👩‍👧 flags 🇫🇷", "Café naïve 日本語 ﷽", "crlf\r\nline\rcr\n\n\r\n",
    "tabs\t\t\tand    spaces   ", "a" * 500, "🙂" * 100, " " * 300, "\n" * 200,
    "don't I'LL we've 12345678 x1y2", "\udcff".encode("utf-8", "surrogatepass").decode(
        "utf-8", "replace"), "\x1b[2J\x07\x9b", "<|end|>" * 20,
]


def save_model(run: Path, model: GPT, tokenizer_file: Path, chat_format: str | None = None
               ) -> Path:
    """`model` as a `fragment train` step folder (hashes in its provenance)."""
    config = model.config.model_dump(mode="json")
    provenance = {"tokenizer_sha256": Tokenizer.load(tokenizer_file).sha256,
                  "model_config_sha256": model_config_sha256(config)}
    record: dict[str, object] = {"model": config}
    if chat_format is not None:
        record["chat_format"] = chat_format
    return save_checkpoint(run, 3, model=model, optimizer=None, trainer_state={"step": 3},
                           config=record, tokenizer_file=tokenizer_file, provenance=provenance)


def scaled_model(seed: int = 0, **config: object) -> GPT:
    """A random model of EXPORT_MODEL (with `config` changes), matrices times WEIGHT_SCALE."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**EXPORT_MODEL, **config})).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(WEIGHT_SCALE)
    return model


def save_random_adapter(run: Path, base: Path, seed: int = 1, method: str = "lora") -> Path:
    """A LoRA (or DoRA) adapter of `base` whose B is random, so base + adapter is not the
    base (DoRA's magnitudes are moved too)."""
    model = load_trained(base).model
    spec = AdapterSpec(method=method, rank=4, alpha=8.0)
    attach_adapters(model, spec)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif name.endswith("magnitude"):
                param.mul_(1 + 0.2 * torch.rand(param.shape, generator=generator))
    return save_adapter_step(run, 5, model, spec, base)


@pytest.fixture(scope="session")
def base_step(tmp_path_factory, chat_tokenizer) -> Path:
    return save_model(tmp_path_factory.mktemp("export-base") / "run", scaled_model(),
                      chat_tokenizer)


@pytest.fixture(scope="session")
def adapter_step(tmp_path_factory, base_step) -> Path:
    return save_random_adapter(tmp_path_factory.mktemp("export-adapter") / "run", base_step)


@pytest.fixture(scope="session")
def exports(tmp_path_factory, base_step, adapter_step) -> dict[str, Path]:
    """Output folders by name: base-hf, tuned-hf, base-gguf-f32, base-gguf-q8_0,
    tuned-gguf-f32."""
    root = tmp_path_factory.mktemp("exports")
    jobs = {"base-hf": (None, "hf", "f32"), "tuned-hf": (adapter_step, "hf", "f32"),
            "base-gguf-f32": (None, "gguf", "f32"), "base-gguf-q8_0": (None, "gguf", "q8_0"),
            "tuned-gguf-f32": (adapter_step, "gguf", "f32")}
    for name, (adapter, fmt, quantize) in jobs.items():
        export(ExportRequest(base_step, adapter, fmt, root / name, quantize))
    return {name: root / name for name in jobs}
