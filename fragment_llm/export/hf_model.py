"""What an export writes from (`Exportable`), and the model as a Hugging Face folder.

The folder: `config.json` (LlamaForCausalLM), `generation_config.json`,
`model.safetensors`, `tokenizer.json` (hf_tokenizer.py's, plus a post-processor that
puts `<|endoftext|>` before a text, as our prompts start) and `tokenizer_config.json`
(the special tokens and the chat template). transformers loads it with no custom code.

This module knows no checkpoint and no folder swapping: it writes files into a folder
it is given (export/run.py stages it). GGUF is gguf_model.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch

from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, ModelConfig
from fragment_llm.export.chat_jinja import chat_template_jinja
from fragment_llm.export.hf_tokenizer import to_hf_dict
from fragment_llm.export.llama import hf_config, hf_tensors
from fragment_llm.model.gpt import GPT
from fragment_llm.tokenizer.tokenizer import EOT, Tokenizer

HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json")


@dataclass(frozen=True)
class Exportable:
    """A model ready to write (any adapter already merged) and what goes with it."""

    model: GPT
    config: ModelConfig
    tokenizer: Tokenizer
    chat_format: str | None
    provenance: dict[str, str]  # fragment.* metadata: manifest hashes

    @property
    def eos_names(self) -> list[str]:
        """Where an answer ends: `<|end|>` for a chat model (then `<|endoftext|>`)."""
        return ["<|end|>", EOT] if self.chat_format == SPECIAL_TOKENS_CHAT_FORMAT else [EOT]

    @property
    def eos_ids(self) -> list[int]:
        return [self.tokenizer.special_id(name) for name in self.eos_names]


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
    _json(folder / "config.json", hf_config(config, tok.eot_id, item.eos_ids))
    _json(folder / "generation_config.json", {
        "bos_token_id": tok.eot_id, "eos_token_id": item.eos_ids, "pad_token_id": tok.eot_id})
    safetensors.torch.save_file(hf_tensors(item.model, config), folder / "model.safetensors",
                                metadata={"format": "pt", **item.provenance})
    _json(folder / "tokenizer.json", hf_tokenizer_document(tok))
    _json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT,
        "eos_token": item.eos_names[0], "pad_token": EOT, "add_bos_token": True,
        "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": config.block_size,
        "chat_template": chat_template_jinja(item.chat_format)})
