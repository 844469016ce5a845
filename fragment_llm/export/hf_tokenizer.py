"""Export a tokenizer to the HF `tokenizers` JSON format (`tokenizer.json`).

The file is written by hand: the package never imports `tokenizers`. It describes the
same tokenizer: the split regex (`Split`, behavior `Isolated`), then GPT-2's byte-to-
character map (`ByteLevel`, no prefix space, no regex of its own), a `BPE` model with our
vocabulary and merges in rank order, and a `ByteLevel` decoder. Loaded with
`tokenizers.Tokenizer.from_file`, it encodes every text to the same ids as
`Tokenizer.encode` (tested), with one caveat: HF matches special-token text such as
`<|endoftext|>` in the input, which `encode` never does; set
`hf.encode_special_tokens = True` on the loaded tokenizer to get our behaviour there too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fragment_llm.errors import OutputError
from fragment_llm.safety.files import atomic_write_text, make_dirs
from fragment_llm.tokenizer.bpe import BYTES
from fragment_llm.tokenizer.tokenizer import Tokenizer

FORMATS: Final = ("hf",)


def byte_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte: `[..., "!" for 33, ..., "Ġ" for 32]`.

    Printable Latin-1 bytes stand for themselves; the other 68 map to U+0100 upwards in
    byte order, so the space (0x20) becomes "Ġ" (U+0120).
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = [""] * BYTES
    shifted = 0
    for byte in range(BYTES):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(BYTES + shifted)
            shifted += 1
    return table


def to_hf_dict(tok: Tokenizer) -> dict[str, Any]:
    """The HF `tokenizers` document for `tok` (see the module docstring)."""
    chars = byte_to_unicode()
    names = ["".join(chars[b] for b in tok.token_bytes(i)) for i in range(BYTES + len(tok.merges))]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": token_id, "content": name, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}
                         for name, token_id in tok.special_tokens.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {name: token_id for token_id, name in enumerate(names)},
                  # "a b" strings: byte-level names never contain a space (it is "Ġ").
                  "merges": [f"{names[a]} {names[b]}" for a, b in tok.merges]},
    }


@dataclass(frozen=True)
class ExportReport:
    source: Path
    out: Path
    format: str
    vocab_size: int
    tokenizer_sha256: str

    def summary_rows(self) -> list[tuple[str, object]]:
        return [("tokenizer", self.source), ("format", self.format), ("written", self.out),
                ("vocab size", f"{self.vocab_size:,}"),
                ("tokenizer sha256", self.tokenizer_sha256[:16] + "…")]


def export_tokenizer(source: Path, out: Path, *, fmt: str = "hf",
                     overwrite: bool = False) -> ExportReport:
    """Load `source` (checked as hostile) and write it as `fmt` to `out`, atomically."""
    if fmt not in FORMATS:
        raise OutputError(f"unknown export format {fmt!r}", hint=f"formats: {', '.join(FORMATS)}")
    check_export_target(source, out, overwrite)
    tok = Tokenizer.load(source)
    make_dirs(out.parent)
    atomic_write_text(out, json.dumps(to_hf_dict(tok), indent=2, ensure_ascii=False,
                                      allow_nan=False) + "\n", replace=overwrite)
    return ExportReport(source, out, fmt, tok.vocab_size, tok.sha256)


def check_export_target(source: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise OutputError(f"refusing to overwrite the input tokenizer: {out}",
                          hint="choose another --out")
    if out.is_dir():
        raise OutputError(f"output is a folder: {out}", hint="--out must be a file path")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"output already exists: {out}",
                          hint="pass --overwrite to replace it, or choose another --out")
