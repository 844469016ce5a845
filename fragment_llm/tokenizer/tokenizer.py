"""The byte-level BPE tokenizer: train, encode, decode, save and load (JSON).

    >>> tok = Tokenizer.train(["low lower lowest newest"] * 50, TokenizerConfig(vocab_size=272))
    >>> tok.merges[:3]                        # (108, 111) is "lo": merge 0 makes id 256
    [(108, 111), (119, 101), (32, 256)]
    >>> tok.encode("lowest newer")            # "lo" "west" " n" "e" "wer"
    [256, 260, 261, 101, 264]
    >>> tok.decode([256, 260, 261, 101, 264])
    'lowest newer'
    >>> tok.encode("<|endoftext|>")[:3], tok.eot_id      # special-token text stays text
    ([60, 124, 101], 267)

Ids: 0-255 are bytes, 256 + k is merge k, then the five special tokens in the order of
`SPECIAL_TOKENS`. Special tokens are produced only by `special_id` / `encode_special`;
`encode` treats their text like any other text.

This module owns the tokenizer file format and its loader, which treats a file as
hostile (see docs/tokenizer.md for the rules). The algorithm lives in `bpe.py`, text
splitting in `pretokenize.py`, export to HF `tokenizers` in `hf_export.py`.
"""

from __future__ import annotations

import codecs
import functools
import json
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Final

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from fragment_llm.config import TokenizerConfig
from fragment_llm.errors import TokenizerError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.safety.files import (
    atomic_write_bytes,
    dump_json,
    parse_json_guarded,
    read_capped,
    refuse_oversized,
    sha256_bytes,
)
from fragment_llm.safety.text import escape_for_display
from fragment_llm.tokenizer.bpe import (
    BYTES,
    ChunkEncoder,
    Merge,
    encode_many,
    token_bytes_table,
    train_merges,
)
from fragment_llm.tokenizer.chunk_count import count_chunks
from fragment_llm.tokenizer.pretokenize import CUSTOM, NAMED_PATTERNS, SplitPattern, Splitter

FORMAT: Final = "fragment-bpe"
VERSION: Final = 1
EOT: Final = "<|endoftext|>"
SPECIAL_TOKENS: Final = (EOT, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
MAX_VOCAB: Final = 1 << 20  # ids must stay below 0x110000 to be held as chr(id)
MAX_FILE_BYTES: Final = 64 << 20  # ~1M merges at ~40 bytes each, with room to spare
MAX_JSON_DEPTH: Final = 8
# Caps on the token table, checked from the merge list by arithmetic before the table is
# built: a 719-byte file whose merges each join the last token with itself asks for a
# 2^30-byte token. Real vocabularies stay far below both (the longest tokens of GPT-4's
# and Llama 3's are a few hundred bytes; a 1M-token table averaging 64 bytes is 64 MiB),
# and `train` never makes a token past them (`bpe.train_merges` skips such merges). 1024
# is also the longest chunk the default `max_chunk_chars` (256 characters) can hold.
MAX_TOKEN_BYTES: Final = 1024
MAX_TABLE_BYTES: Final = 64 << 20  # the 256 byte tokens and every merge's bytes
SHA256_HEX: Final = r"^[0-9a-f]{64}$"
_MERGES_SLOT: Final = "\x00merges\x00"


# ------------------------------------------------------------------------- file schema


class TrainingInfo(BaseModel):
    """How a tokenizer was trained; recorded in its file for provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    config: TokenizerConfig
    corpus_sha256: StrictStr | None = Field(None, pattern=SHA256_HEX,
                                            description="processed manifest sha256, if any")
    documents: StrictInt = Field(ge=0, description="documents counted for training")
    chars: StrictInt = Field(ge=0, description="characters counted for training")
    stop_reason: StrictStr = Field(max_length=200)


class TokenizerFile(BaseModel):
    """The pinned JSON file (format "fragment-bpe", version 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: StrictStr
    version: StrictInt
    pattern_name: StrictStr = Field(max_length=64)
    pattern: StrictStr = Field(max_length=4096)
    merges: list[Annotated[list[StrictInt], Field(min_length=2, max_length=2)]] = Field(
        max_length=MAX_VOCAB)
    special_tokens: dict[StrictStr, StrictInt] = Field(max_length=len(SPECIAL_TOKENS) + 16)
    vocab_size: StrictInt
    training: TrainingInfo | None = None


# --------------------------------------------------------------------------- tokenizer


class Tokenizer:
    """A trained byte-level BPE tokenizer. Build one with `train`, `load` or `from_merges`."""

    def __init__(self, merges: Sequence[Merge], split: SplitPattern,
                 training: TrainingInfo | None = None) -> None:
        """Internal: `merges` and `split` must already be valid (see `from_merges`)."""
        self._merges: list[Merge] = [(int(a), int(b)) for a, b in merges]
        self._split = split
        self._training = training
        n_base = BYTES + len(self._merges)
        self._special = {name: n_base + i for i, name in enumerate(SPECIAL_TOKENS)}
        names = [name.encode("utf-8") for name in SPECIAL_TOKENS]
        self._bytes: tuple[bytes, ...] = (*token_bytes_table(self._merges), *names)
        self._encoder = ChunkEncoder(Splitter(split), self._merges)

    # ----------------------------------------------------------------- constructors

    @classmethod
    def train(cls, texts: Iterable[str], config: TokenizerConfig,
              progress: ProgressFn | None = None, *, corpus_sha256: str | None = None,
              total_chars: int | None = None, workers: int | None = None) -> Tokenizer:
        """Learn merges from `texts` (streamed; at most `config.max_chars` characters).

        `corpus_sha256` (the processed manifest's) and `total_chars` (for the progress
        bar) are optional; `workers` (default `config.workers`) is how many processes
        count, which changes no merge and is not recorded. Deterministic: the same texts
        and config give the same file.
        """
        progress = progress or no_progress
        splitter = _splitter_for_config(config)
        if total_chars is None and isinstance(texts, Sequence):
            total_chars = sum(map(len, texts))
        counted = count_chunks(texts, splitter, max_chunk_chars=config.max_chunk_chars,
                               max_chars=config.max_chars, workers=workers or config.workers,
                               total=total_chars, progress=progress)
        n_merges = config.vocab_size - BYTES - len(SPECIAL_TOKENS)
        trained = train_merges(counted.counts, n_merges, config.min_frequency, progress,
                               max_token_bytes=MAX_TOKEN_BYTES, max_table_bytes=MAX_TABLE_BYTES)
        info = TrainingInfo(config=config, corpus_sha256=corpus_sha256,
                            documents=counted.documents, chars=counted.chars,
                            stop_reason=trained.stop_reason)
        return cls(trained.merges, splitter.spec, info)

    @classmethod
    def from_merges(cls, merges: Sequence[Sequence[int]], pattern: str = "gpt4",
                    custom_pattern: str | None = None) -> Tokenizer:
        """A tokenizer from a merge list, checked like a loaded file (TokenizerError)."""
        checked: list[Merge] = []
        for pair in merges:
            if not (isinstance(pair, Sequence) and len(pair) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
                raise TokenizerError(f"every merge must be a pair of integer ids, got {pair!r}")
            checked.append((pair[0], pair[1]))
        _check_merges(checked, "")
        text = custom_pattern if pattern == CUSTOM else NAMED_PATTERNS.get(pattern, "")
        return cls(checked, Splitter.for_spec(SplitPattern(pattern, text or "")).spec)

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        """Load a tokenizer file, treating it as hostile (TokenizerError naming the rule)."""
        if not os.path.lexists(path):  # the usual case on a first run: say what makes one
            raise TokenizerError(f"tokenizer file not found: {path}",
                                 hint="train one with `fragment train-tokenizer` (it writes "
                                      "data/tokenizer.json)")
        raw = read_capped(path, MAX_FILE_BYTES, TokenizerError)
        data = parse_json_guarded(raw, str(path), TokenizerError, max_depth=MAX_JSON_DEPTH)
        where = f", in {path}"
        _check_header(data, where)
        file = _validate_schema(data, where)
        merges = [(pair[0], pair[1]) for pair in file.merges]
        _check_merges(merges, where)
        _check_specials(file, len(merges), where)
        try:
            split = Splitter.for_spec(SplitPattern(file.pattern_name, file.pattern)).spec
        except TokenizerError as exc:
            raise TokenizerError(exc.message + where, hint=exc.hint) from None
        return cls(merges, split, file.training)

    # -------------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    @property
    def merges(self) -> list[Merge]:
        """The merges in rank order: merge k joins (a, b) into id 256 + k."""
        return list(self._merges)

    @property
    def pattern_name(self) -> str:
        return self._split.name

    @property
    def pattern(self) -> str:
        return self._split.pattern

    @property
    def training(self) -> TrainingInfo | None:
        return self._training

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eot_id(self) -> int:
        """The id of `<|endoftext|>`, the document separator."""
        return self._special[EOT]

    @functools.cached_property
    def sha256(self) -> str:
        """sha256 of the canonical file text: equal to the file's own hash when written by
        `save`, and the same for the same tokenizer however its file was formatted."""
        return sha256_bytes(self._canonical_json().encode("utf-8"))

    # ------------------------------------------------------------- special tokens

    def special_id(self, name: str) -> int:
        """`special_id("<|user|>") -> vocab_size - 3`; TokenizerError for unknown names."""
        try:
            return self._special[name]
        except (KeyError, TypeError):
            raise TokenizerError(f"unknown special token {name!r}",
                                 hint=f"special tokens: {', '.join(SPECIAL_TOKENS)}") from None

    def encode_special(self, name: str) -> list[int]:
        """`[special_id(name)]`, to build sequences: `encode_special(EOT) + encode(text)`."""
        return [self.special_id(name)]

    def is_special(self, token_id: int) -> bool:
        return self.vocab_size - len(SPECIAL_TOKENS) <= token_id < self.vocab_size

    # ----------------------------------------------------------------- encode/decode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token text is encoded as ordinary text.

        A lone surrogate (not valid Unicode text, so not encodable as UTF-8) is encoded
        as U+FFFD; every other string round-trips through `decode`.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, not {type(text).__name__}")
        return self._encoder.encode(text)

    def encode_batch(self, texts: Iterable[str], workers: int = 2) -> list[list[int]]:
        """`[encode(t) for t in texts]`, on `workers` processes for large batches."""
        batch = list(texts)
        if not all(isinstance(text, str) for text in batch):
            raise TokenizerError("encode_batch takes an iterable of str")
        return encode_many(self._encoder, self._merges, batch, workers)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of `ids` joined; TokenizerError for an id outside the vocabulary."""
        ids = ids if isinstance(ids, list) else list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join(map(self._bytes.__getitem__, ids))
        except (IndexError, TypeError):
            bad = next((token_id for token_id in ids if not isinstance(token_id, int)
                        or not 0 <= token_id < self.vocab_size), None)
            raise TokenizerError(f"token ids must be integers in [0, {self.vocab_size}); "
                                 f"got {bad!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token's are its name)."""
        return self.decode_bytes([token_id])

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # ------------------------------------------------------------------------ saving

    def save(self, path: Path, *, replace: bool = True) -> None:
        """Write the file atomically (the old file or the new one, never half); with
        `replace=False`, an existing file is refused at the rename. A file `load` would
        refuse as too large is not written."""
        data = self._canonical_json().encode("utf-8")
        refuse_oversized(data, MAX_FILE_BYTES, path, TokenizerError,
                         hint="lower --vocab-size, or shorten the custom pattern")
        atomic_write_bytes(path, data, replace=replace)

    def to_file_model(self) -> TokenizerFile:
        return TokenizerFile(format=FORMAT, version=VERSION, pattern_name=self.pattern_name,
                             pattern=self.pattern, merges=[list(m) for m in self._merges],
                             special_tokens=self.special_tokens, vocab_size=self.vocab_size,
                             training=self._training)

    def _canonical_json(self) -> str:
        """The project's JSON style (`dump_json`), except one merge per line, for people
        reading the file. "merges" sorts before any key that could hold the slot text."""
        doc = self.to_file_model().model_dump(mode="json", exclude_none=True)
        doc["merges"] = _MERGES_SLOT
        merges = ",\n    ".join(f"[{a}, {b}]" for a, b in self._merges)
        listed = f"[\n    {merges}\n  ]" if merges else "[]"
        return dump_json(doc).replace(json.dumps(_MERGES_SLOT), listed, 1)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, pattern={self.pattern_name!r})"


class StreamDecoder:
    """Turns ids into text as they arrive, never splitting a UTF-8 character.

        >>> dec = tok.stream_decoder()
        >>> [dec.feed(i) for i in tok.encode("é")]    # two byte tokens: 0xC3, 0xA9
        ['', 'é']

    Whatever way the ids are split, the pieces joined (plus `flush()`) equal
    `tok.decode(all_ids)`; an incomplete character at the end is U+FFFD after `flush`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: int | Iterable[int]) -> str:
        """Text completed by these ids (possibly empty while a character is pending)."""
        batch = [ids] if isinstance(ids, numbers.Integral) else ids
        return self._utf8.decode(self._tokenizer.decode_bytes(batch))

    def flush(self) -> str:
        """Whatever is pending (U+FFFD for an incomplete character); resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ------------------------------------------------------------------- loader rules


def _splitter_for_config(config: TokenizerConfig) -> Splitter:
    if config.pattern == CUSTOM:
        if config.custom_pattern is None:
            raise TokenizerError("pattern = 'custom' needs custom_pattern (the split regex)")
        return Splitter.custom(config.custom_pattern)
    if config.custom_pattern is not None:
        raise TokenizerError("custom_pattern is only used with pattern = 'custom'",
                             hint=f"drop custom_pattern or set pattern = 'custom' "
                                  f"(pattern is {config.pattern!r})")
    return Splitter.named(config.pattern)


def _check_header(data: object, where: str) -> None:
    if not isinstance(data, Mapping):
        raise TokenizerError(f"not a tokenizer file (expected a JSON object){where}")
    if data.get("format") != FORMAT:
        raise TokenizerError(f"wrong format {data.get('format')!r}: expected {FORMAT!r}{where}",
                             hint="train one with `fragment train-tokenizer`")
    if data.get("version") != VERSION or isinstance(data.get("version"), bool):
        raise TokenizerError(f"unsupported version {data.get('version')!r}: this "
                             f"fragment-llm reads version {VERSION}{where}")


def _validate_schema(data: object, where: str) -> TokenizerFile:
    try:
        return TokenizerFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # Key names come from the file: escaped, so the message stays one harmless line.
        field = escape_for_display(".".join(str(part) for part in first["loc"])) or "(top level)"
        if first["type"] == "extra_forbidden":
            raise TokenizerError(f"unknown key '{field}'{where}") from None
        raise TokenizerError(f"invalid field {field}: {first['msg']}{where}") from None


def _check_merges(merges: list[Merge], where: str) -> None:
    """Every merge joins earlier ids, the token table stays within its caps (measured
    before it is built), and no two tokens have the same bytes."""
    if len(merges) + BYTES + len(SPECIAL_TOKENS) > MAX_VOCAB:
        raise TokenizerError(f"too many merges ({len(merges)}): vocab_size is capped at "
                             f"{MAX_VOCAB}{where}")
    lengths = [1] * BYTES  # bytes of each token so far; each stays <= MAX_TOKEN_BYTES
    total = BYTES
    for rank, (a, b) in enumerate(merges):
        if not (0 <= a < BYTES + rank and 0 <= b < BYTES + rank):
            raise TokenizerError(f"merge {rank} ({a}, {b}) uses an id not defined before it "
                                 f"(ids must be in [0, {BYTES + rank})){where}")
        length = lengths[a] + lengths[b]
        total += length
        if length > MAX_TOKEN_BYTES or total > MAX_TABLE_BYTES:
            cap = (f"{length} bytes, over the {MAX_TOKEN_BYTES}-byte cap on one token"
                   if length > MAX_TOKEN_BYTES else
                   f"a token table of {total:,} bytes, over the {MAX_TABLE_BYTES:,}-byte cap")
            raise TokenizerError(f"merge {rank} ({a}, {b}) makes {cap}{where}",
                                 hint="`fragment train-tokenizer` never writes such a file; "
                                      "use one it wrote")
        lengths.append(length)
    table = token_bytes_table(merges)
    if len(set(table)) != len(table):
        seen: dict[bytes, int] = {}
        for token_id, data in enumerate(table):
            if data in seen:
                raise TokenizerError(f"duplicate byte string: merge {token_id - BYTES} makes "
                                     f"{data!r}, already token {seen[data]}{where}")
            seen[data] = token_id


def _check_specials(file: TokenizerFile, n_merges: int, where: str) -> None:
    n_base = BYTES + n_merges
    if set(file.special_tokens) != set(SPECIAL_TOKENS):
        raise TokenizerError(f"special tokens must be exactly {list(SPECIAL_TOKENS)}, got "
                             f"{sorted(file.special_tokens)}{where}")
    for i, name in enumerate(SPECIAL_TOKENS):
        if file.special_tokens[name] != n_base + i:
            raise TokenizerError(f"special token {name} must have id {n_base + i} (special ids "
                                 f"follow the merges contiguously), got "
                                 f"{file.special_tokens[name]}{where}")
    expected = n_base + len(SPECIAL_TOKENS)
    if file.vocab_size != expected:
        raise TokenizerError(f"vocab_size {file.vocab_size} does not match 256 bytes + "
                             f"{n_merges} merges + {len(SPECIAL_TOKENS)} special tokens = "
                             f"{expected}{where}")

