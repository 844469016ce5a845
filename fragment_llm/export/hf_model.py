"""The model as a Hugging Face folder, and as GGUF, from one `Exportable`.

Hugging Face: `config.json` (LlamaForCausalLM), `generation_config.json`,
`model.safetensors`, `tokenizer.json` (hf_tokenizer.py's, plus a post-processor that
puts `<|endoftext|>` before a text, as our prompts start) and `tokenizer_config.json`
(the special tokens and the chat template). transformers loads it with no custom code.

GGUF: one `model.gguf` (gguf_file.py) with llama.cpp's `llama.*` hyper-parameters and
the tokenizer in its metadata: the byte-level token names, their types, the merges,
the special ids, the split pattern's llama.cpp name and the chat template.

This module knows no checkpoint and no folder swapping: it writes files into a folder
it is given (export/run.py stages it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch

from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, ModelConfig
from fragment_llm.errors import ModelError
from fragment_llm.export.chat_jinja import chat_template_jinja
from fragment_llm.export.gguf_file import FILE_TYPES, Metadata, write_gguf_file
from fragment_llm.export.hf_tokenizer import byte_to_unicode, to_hf_dict
from fragment_llm.export.llama import gguf_tensors, hf_config, hf_tensors
from fragment_llm.model.gpt import GPT
from fragment_llm.tokenizer.bpe import BYTES
from fragment_llm.tokenizer.tokenizer import EOT, Tokenizer

HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json")
GGUF_FILE = "model.gguf"
# llama.cpp's names for our split patterns (its `tokenizer.ggml.pre`): "dbrx" is the
# cl100k (GPT-4) regex with plain BPE merging; "llama-bpe", the same regex, would look
# whole words up in the vocabulary before merging, which our encoder never does.
LLAMA_CPP_PRE = {"gpt4": "dbrx", "gpt2": "gpt-2"}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types


@dataclass(frozen=True)
class Exportable:
    """A model ready to write (any adapter already merged) and what goes with it."""

    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer
    chat_format: str | None
    provenance: dict[str, str]  # fragment.* metadata: manifest hashes

    @property
    def eos_ids(self) -> list[int]:
        """Where an answer ends: `<|end|>` for a chat model (then `<|endoftext|>`)."""
        tok = self.tokenizer
        if self.chat_format == SPECIAL_TOKENS_CHAT_FORMAT:
            return [tok.special_id("<|end|>"), tok.eot_id]
        return [tok.eot_id]


def _json(path: Path, document: dict[str, Any]) -> None:
    with path.open("x", encoding="utf-8") as out:
        json.dump(document, out, indent=2, ensure_ascii=False, allow_nan=False)
        out.write("\n")


def hf_tokenizer_document(tok: Tokenizer) -> dict[str, Any]:
    """hf_tokenizer.py's document, with `<|endoftext|>` put before every encoded text
    (add_special_tokens=True, the default), as `fragment generate` starts a prompt."""
    document = to_hf_dict(tok)
    start = {"SpecialToken": {"id": EOT, "type_id": 0}}
    document["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [start, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [start, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {EOT: {"id": EOT, "ids": [tok.eot_id], "tokens": [EOT]}}}
    return document


def write_hf(folder: Path, item: Exportable) -> None:
    """The five files of HF_FILES into `folder`."""
    tok, config = item.tokenizer, item.config
    eos_names = [tok_name for tok_name, token_id in tok.special_tokens.items()
                 if token_id == item.eos_ids[0]]
    _json(folder / "config.json", hf_config(config, tok.eot_id, item.eos_ids))
    _json(folder / "generation_config.json", {
        "bos_token_id": tok.eot_id, "eos_token_id": item.eos_ids, "pad_token_id": tok.eot_id})
    safetensors.torch.save_file(hf_tensors(item.model, config), folder / "model.safetensors",
                                metadata={"format": "pt", **item.provenance})
    _json(folder / "tokenizer.json", hf_tokenizer_document(tok))
    _json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT,
        "eos_token": eos_names[0], "pad_token": EOT, "add_bos_token": True,
        "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
        "chat_template": chat_template_jinja(item.chat_format)})


def gguf_metadata(item: Exportable, quantize: str) -> list[Metadata]:
    """llama.cpp's keys for a Llama: hyper-parameters, tokenizer, chat template."""
    config, tok = item.config, item.tokenizer
    if tok.pattern_name not in LLAMA_CPP_PRE:
        raise ModelError(f"cannot export a tokenizer with a {tok.pattern_name} split pattern "
                         "to GGUF: llama.cpp only has its own named patterns",
                         hint="use --format hf (its tokenizer.json carries any pattern)")
    chars = byte_to_unicode()
    names = ["".join(chars[b] for b in tok.token_bytes(i)) for i in range(BYTES + len(tok.merges))]
    specials = sorted(tok.special_tokens.items(), key=lambda item: item[1])
    return [
        Metadata("general.architecture", "llama"), Metadata("general.name", "fragment-llm"),
        Metadata("general.file_type", FILE_TYPES[quantize]),
        Metadata("llama.vocab_size", tok.vocab_size),
        Metadata("llama.context_length", config.block_size),
        Metadata("llama.embedding_length", config.n_embd),
        Metadata("llama.block_count", config.n_layer),
        Metadata("llama.feed_forward_length", config.hidden_dim),
        Metadata("llama.attention.head_count", config.n_head),
        Metadata("llama.attention.head_count_kv", config.kv_heads),
        Metadata("llama.rope.dimension_count", config.head_dim),
        Metadata("llama.rope.freq_base", float(config.rope_theta)),
        Metadata("llama.attention.layer_norm_rms_epsilon", float(config.norm_eps)),
        Metadata("tokenizer.ggml.model", "gpt2"),
        Metadata("tokenizer.ggml.pre", LLAMA_CPP_PRE[tok.pattern_name]),
        Metadata("tokenizer.ggml.tokens", names + [name for name, _id in specials]),
        Metadata("tokenizer.ggml.token_type",
                 [TOKEN_NORMAL] * len(names) + [TOKEN_CONTROL] * len(specials), signed=True),
        Metadata("tokenizer.ggml.merges", [f"{names[a]} {names[b]}" for a, b in tok.merges]),
        Metadata("tokenizer.ggml.bos_token_id", tok.eot_id),
        Metadata("tokenizer.ggml.eos_token_id", item.eos_ids[0]),
        Metadata("tokenizer.ggml.eot_token_id", item.eos_ids[0]),
        Metadata("tokenizer.ggml.padding_token_id", tok.eot_id),
        Metadata("tokenizer.ggml.add_bos_token", True),
        Metadata("tokenizer.ggml.add_eos_token", False),
        Metadata("tokenizer.chat_template", chat_template_jinja(item.chat_format)),
        *(Metadata(f"fragment.{key}", value) for key, value in sorted(item.provenance.items())),
    ]


def write_gguf(folder: Path, item: Exportable, quantize: str) -> None:
    """`model.gguf` into `folder`, its matrices in F32 or Q8_0."""
    write_gguf_file(folder / GGUF_FILE, gguf_metadata(item, quantize),
                    gguf_tensors(item.model, item.config), quantize)
