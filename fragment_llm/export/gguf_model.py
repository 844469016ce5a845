"""The model as one GGUF file for llama.cpp: `model.gguf`, written by gguf_file.py.

Its metadata holds llama.cpp's `llama.*` hyper-parameters and the tokenizer: the
byte-level token names, their types (special tokens are `control`), the merges, the
special ids, llama.cpp's name for our split regex and the chat template; and the
`fragment.*` provenance hashes. Tensors are llama.py's, under llama.cpp's names.
"""

from __future__ import annotations

from pathlib import Path

from fragment_llm.errors import ModelError
from fragment_llm.export.chat_jinja import chat_template_jinja
from fragment_llm.export.gguf_file import FILE_TYPES, Metadata, write_gguf_file
from fragment_llm.export.hf_model import Exportable
from fragment_llm.export.hf_tokenizer import byte_to_unicode
from fragment_llm.export.llama import gguf_tensors
from fragment_llm.tokenizer.bpe import BYTES

GGUF_FILE = "model.gguf"
# llama.cpp's names for our split patterns (its `tokenizer.ggml.pre`): "dbrx" is the
# cl100k (GPT-4) regex with plain BPE merging; "llama-bpe", the same regex, would look
# whole words up in the vocabulary before merging, which our encoder never does.
LLAMA_CPP_PRE = {"gpt4": "dbrx", "gpt2": "gpt-2"}
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types


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


def write_gguf_model(folder: Path, item: Exportable, quantize: str) -> None:
    """`model.gguf` into `folder`, its matrices in F32 or Q8_0."""
    write_gguf_file(folder / GGUF_FILE, gguf_metadata(item, quantize),
                    gguf_tensors(item.model, item.config), quantize)
