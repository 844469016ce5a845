"""Token shards: processed documents -> binary token files + manifest, and their loader.

Owns the token-shard format (`tokens/<key>/manifest.json`, `train-00000.bin`, ...),
its cache key, the train/validation split, the builder and the validating loader,
which hands each split to `batches.TokenSplit`. The order batches are read in, and how
blocks are cut, live in `batches.py`. Knows nothing of models or optimisers.

Format: each shard is a flat little-endian array of token ids (uint16 when the
vocabulary fits, else uint32); every document is followed by `<|endoftext|>`. Shards of
conversations (finetune/shards.py) also hold a loss mask per shard, `train-00000.mask`:
one byte per token, 1 where the model is trained to produce it; their manifest says
how many tokens the mask counts (`loss_tokens`) and which chat template rendered them.
Documents go to the train or validation split by their content hash, so the split
is deterministic and does not depend on file order.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fragment_llm import __version__
from fragment_llm.data.batches import TokenSplit
from fragment_llm.errors import DatasetError, OutputError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.safety.files import (
    HASH_CHUNK,
    atomic_write_bytes,
    dump_json,
    make_dirs,
    open_regular,
    parse_json_guarded,
    read_capped,
    refuse_oversized,
    sha256_bytes,
    staged_dir,
)
from fragment_llm.safety.text import escape_for_display

if TYPE_CHECKING:
    from fragment_llm.data.processed import ProcessedCorpus
    from fragment_llm.tokenizer.tokenizer import Tokenizer

TOKENS_FORMAT = "fragment-tokens"
TOKENS_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
SHARD_NAME = re.compile(r"(train|val)-\d{5}\.bin")
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MB of uint16 per shard: small enough to fsync often
ENCODE_CHUNK_DOCS = 16
ENCODE_WINDOW_DOCS = 256  # documents in flight at once: bounds memory whatever the corpus


# --------------------------------------------------------------------------- manifest


class ShardEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    file: str = Field(pattern=f"^{SHARD_NAME.pattern}$")
    tokens: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    mask_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # of its loss mask

    @property
    def mask_file(self) -> str:
        return mask_name(self.file)


class SplitEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    documents: int = Field(ge=0)
    tokens: int = Field(ge=0)
    text_bytes: int = Field(ge=0, description="UTF-8 bytes of the documents, for bits/byte "
                                              "(of the text the loss counts, when masked)")
    shards: list[ShardEntry]
    loss_tokens: int | None = Field(None, ge=0)  # tokens the loss mask counts, when masked

    @property
    def counted_tokens(self) -> int:
        """The tokens a loss is averaged over: all of them, or those the mask counts."""
        return self.tokens if self.loss_tokens is None else self.loss_tokens


class TokensManifest(BaseModel):
    """`manifest.json` of a token-shard folder (pinned keys; extend, never rename)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    format: Literal["fragment-tokens"]
    version: Literal[1]
    fragment_version: str
    dtype: Literal["uint16", "uint32"]
    vocab_size: int = Field(ge=256, le=1 << 32)
    eot_id: int = Field(ge=0)
    val_fraction: float = Field(ge=0.0, lt=1.0)
    tokenizer_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    processed_manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    train: SplitEntry
    val: SplitEntry
    # Shards of conversations: the chat format they were rendered with
    # (tokenizer/chat_template.py), and `processed_manifest_sha256` is their report's.
    chat_format: str | None = Field(None, pattern=r"^[a-z_]{1,32}$")

    @property
    def masked(self) -> bool:
        return self.train.loss_tokens is not None


def mask_name(shard_file: str) -> str:
    """`train-00000.bin -> train-00000.mask`."""
    return shard_file.removesuffix(".bin") + ".mask"


def dump_manifest(manifest: TokensManifest) -> str:
    """The manifest's file text (safety.files.dump_json: sorted keys, ASCII). Keys a
    document corpus does not use stay out, so its manifest reads as it always has."""
    return dump_json(manifest.model_dump(mode="json", exclude_none=True))


def cache_key(processed_sha256: str, tokenizer_sha256: str, val_fraction: float) -> str:
    """Name of the cache folder: changes whenever an input of the shards changes."""
    text = f"{TOKENS_VERSION}:{processed_sha256}:{tokenizer_sha256}:{val_fraction!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_validation(doc_sha256: str, val_fraction: float) -> bool:
    """Deterministic split by content: the first 8 hex digits as a number in [0, 1)."""
    return int(doc_sha256[:8], 16) / 0x1_0000_0000 < val_fraction


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class BuildRequest:
    """What `build_token_shards` needs."""

    processed: Path
    tokenizer_path: Path
    out_root: Path
    val_fraction: float
    workers: int = 2
    shard_tokens: int = DEFAULT_SHARD_TOKENS


def build_token_shards(request: BuildRequest, progress: ProgressFn | None = None) -> Path:
    """Tokenize the processed corpus once; reuse the cached folder while inputs match.

    Returns the shard folder `out_root/<cache key>/`.
    """
    from fragment_llm.data.processed import ProcessedCorpus
    from fragment_llm.tokenizer.tokenizer import Tokenizer

    progress = progress or no_progress
    corpus = ProcessedCorpus.open(request.processed)
    tokenizer = Tokenizer.load(request.tokenizer_path)
    key = cache_key(corpus.manifest_sha256, tokenizer.sha256, request.val_fraction)
    folder = request.out_root / key
    if (folder / MANIFEST).is_file():
        try:
            TokenShards.open(folder, tokenizer.vocab_size)
            return folder
        except DatasetError:
            pass  # a damaged cache is rebuilt, not trusted
    damaged = os.path.lexists(folder)
    make_dirs(request.out_root, hint=f"the token cache is written beside --data "
                                     f"({request.out_root}): copy {request.processed} to a "
                                     "writable place and pass that as --data")
    try:
        with staged_dir(folder, overwrite=damaged) as tmp:
            manifest = _write_shards(tmp, corpus, tokenizer, request, progress)
            data = dump_manifest(manifest).encode("ascii")
            refuse_oversized(data, MAX_MANIFEST_BYTES, tmp / MANIFEST, DatasetError)
            atomic_write_bytes(tmp / MANIFEST, data)
    except OutputError:
        if damaged or not (folder / MANIFEST).is_file():
            raise
        # Another trainer built the same cache meanwhile: the same inputs, the same
        # bytes. Keep theirs (the caller verifies it) rather than pull it from under them.
    return folder


def _write_shards(tmp: Path, corpus: ProcessedCorpus, tokenizer: Tokenizer,
                  request: BuildRequest, progress: ProgressFn) -> TokensManifest:
    dtype = shard_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(tmp, split, dtype, request.shard_tokens)
               for split in ("train", "val")}
    docs = _document_splits(corpus, request.val_fraction)
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    encoded = _encode_all(tokenizer, docs, request.workers, corpus.total_chars)
    for done, (text, split, ids) in enumerate(encoded, start=1):
        writers[split].add(np.concatenate([np.asarray(ids, dtype=np.int64), eot]),
                           len(text.encode("utf-8")))
        progress("tokenizing", done, corpus.documents)
    return TokensManifest(
        format=TOKENS_FORMAT, version=TOKENS_VERSION, fragment_version=__version__,
        dtype=dtype.name, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
        val_fraction=request.val_fraction, tokenizer_sha256=tokenizer.sha256,
        processed_manifest_sha256=corpus.manifest_sha256,
        train=writers["train"].entry(), val=writers["val"].entry())


def _document_splits(corpus: ProcessedCorpus, val_fraction: float) -> Iterator[tuple[str, str]]:
    forced = _forced_validation_doc(corpus, val_fraction)
    for text, _source, doc_sha in corpus.iter_documents():
        held_out = doc_sha == forced or is_validation(doc_sha, val_fraction)
        yield text, ("val" if held_out else "train")


def _forced_validation_doc(corpus: ProcessedCorpus, val_fraction: float) -> str | None:
    """A small corpus can hash every document into train; then hold out the document
    with the smallest hash, so there is always something to evaluate on."""
    if val_fraction <= 0:
        return None
    smallest, count = None, 0
    for _text, _source, doc_sha in corpus.iter_documents():
        if is_validation(doc_sha, val_fraction):
            return None
        count += 1
        smallest = doc_sha if smallest is None else min(smallest, doc_sha)
    return smallest if count >= 2 else None


class ShardWriter:
    """Accumulates token arrays for one split and writes fixed-size shards into `folder`;
    with loss masks (conversations), a `.mask` file beside each shard."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int,
                 masked: bool = False) -> None:
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shard_tokens, self.masked = shard_tokens, masked
        self.pending: list[np.ndarray] = []
        self.pending_masks: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[ShardEntry] = []
        self.documents = self.tokens = self.text_bytes = self.loss_tokens = 0

    def add(self, ids: np.ndarray, text_bytes: int, mask: np.ndarray | None = None) -> None:
        if (mask is not None) != self.masked or (mask is not None and len(mask) != len(ids)):
            raise ValueError("a masked split needs one mask entry per token, and only it")
        self.pending.append(ids)
        if mask is not None:
            self.pending_masks.append(mask.astype(np.uint8))
            self.loss_tokens += int(mask.sum())
        self.pending_tokens += len(ids)
        self.documents += 1
        self.tokens += len(ids)
        self.text_bytes += text_bytes
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending_tokens:
            return
        data = np.concatenate(self.pending).astype(self.dtype).astype(self.dtype.newbyteorder("<"))
        name = f"{self.split}-{len(self.shards):05d}.bin"
        raw = data.tobytes()
        atomic_write_bytes(self.folder / name, raw)
        mask_sha256 = None
        if self.masked:
            mask = np.concatenate(self.pending_masks).tobytes()
            atomic_write_bytes(self.folder / mask_name(name), mask)
            mask_sha256 = sha256_bytes(mask)
        self.shards.append(ShardEntry(file=name, tokens=len(data), sha256=sha256_bytes(raw),
                                      mask_sha256=mask_sha256))
        self.pending, self.pending_masks, self.pending_tokens = [], [], 0

    def entry(self) -> SplitEntry:
        self.flush()
        return SplitEntry(documents=self.documents, tokens=self.tokens,
                          text_bytes=self.text_bytes, shards=self.shards,
                          loss_tokens=self.loss_tokens if self.masked else None)


def _windows(items: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    window: list[tuple[str, str]] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _encode_all(tokenizer: Tokenizer, docs: Iterable[tuple[str, str]], workers: int,
                total_chars: int) -> Iterator[tuple[str, str, list[int]]]:
    """Encode (text, split) documents in order, on `workers` processes when more than one
    and the corpus is large enough to repay starting them.

    Works a window at a time (Pool.imap would read its whole input ahead). The workers
    are `bpe.encoder_pool`'s: they hold the merges, not torch (a process importing
    torch costs ~150 MiB), and they end with this process.
    """
    from fragment_llm.tokenizer.bpe import MIN_PARALLEL_CHARS, encode_in_worker, encoder_pool
    from fragment_llm.tokenizer.pretokenize import SplitPattern

    if workers <= 1 or total_chars < MIN_PARALLEL_CHARS:
        for text, split in docs:
            yield text, split, tokenizer.encode(text)
        return
    spec = SplitPattern(tokenizer.pattern_name, tokenizer.pattern)
    with encoder_pool(spec, tokenizer.merges, workers) as pool:
        for window in _windows(docs, ENCODE_WINDOW_DOCS):
            encoded = pool.map(encode_in_worker, [text for text, _ in window],
                               chunksize=ENCODE_CHUNK_DOCS)
            for (text, split), ids in zip(window, encoded, strict=True):
                yield text, split, ids


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class TokenShards:
    folder: Path
    manifest: TokensManifest
    manifest_sha256: str
    train: TokenSplit
    val: TokenSplit

    @classmethod
    def open(cls, folder: Path, vocab_size: int | None = None) -> TokenShards:
        """Open and verify a shard folder: schema, hashes, sizes, token ids < vocab size."""
        if folder.is_symlink() or not folder.is_dir():
            raise DatasetError(f"not a token-shard folder: {folder}",
                               hint="run `fragment train`, which builds it from data/processed")
        raw = read_capped(folder / MANIFEST, MAX_MANIFEST_BYTES, DatasetError)
        manifest = _parse_manifest(raw, folder / MANIFEST)
        if vocab_size is not None and manifest.vocab_size != vocab_size:
            raise DatasetError(f"token shards were built for vocab size {manifest.vocab_size}, "
                               f"the tokenizer has {vocab_size}, in {folder}",
                               hint="delete the folder; it is rebuilt from data/processed")
        if manifest.eot_id >= manifest.vocab_size:
            raise DatasetError(f"eot_id {manifest.eot_id} is not below vocab_size, in {folder}")
        dtype = np.dtype(manifest.dtype).newbyteorder("<")
        splits = {name: _open_split(folder, getattr(manifest, name), dtype, manifest.vocab_size)
                  for name in ("train", "val")}
        return cls(folder, manifest, sha256_bytes(raw), splits["train"], splits["val"])

    def count_documents(self) -> str:
        """Every document (or conversation) holds exactly one <|endoftext|>, and encode
        never makes one: count them against the manifest (`fragment verify`)."""
        eot = self.manifest.eot_id
        for name in ("train", "val"):
            found = sum(int((shard == eot).sum()) for shard in getattr(self, name).shards)
            listed = getattr(self.manifest, name).documents
            if found != listed:
                raise DatasetError(f"{name} shards hold {found} end-of-text tokens, the "
                                   f"manifest lists {listed} documents, in {self.folder}")
        return "one <|endoftext|> per document in both splits"


def _open_split(folder: Path, split: SplitEntry, dtype: np.dtype, vocab_size: int
                ) -> TokenSplit:
    shards = tuple(_open_shard(folder, entry, dtype, vocab_size) for entry in split.shards)
    if split.loss_tokens is None:
        return TokenSplit(shards)
    masks = tuple(_open_mask(folder, entry) for entry in split.shards)
    if sum(int(mask.sum()) for mask in masks) != split.loss_tokens:
        raise DatasetError(f"the loss masks count other than loss_tokens "
                           f"({split.loss_tokens}), in {folder / MANIFEST}")
    return TokenSplit(shards, masks)


def _parse_manifest(raw: bytes, path: Path) -> TokensManifest:
    data = parse_json_guarded(raw, str(path), DatasetError)
    try:
        manifest = TokensManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # Key names come from the file: escaped, so the message stays one harmless line.
        where = escape_for_display(".".join(str(part) for part in first["loc"])) or "(top level)"
        raise DatasetError(f"invalid token manifest: {where}: {first['msg']}, in {path}") from None
    for split in (manifest.train, manifest.val):
        if sum(entry.tokens for entry in split.shards) != split.tokens:
            raise DatasetError(f"split token count disagrees with its shards, in {path}")
        masked = {entry.mask_sha256 is not None for entry in split.shards}
        if masked - {split.loss_tokens is not None} or (manifest.chat_format is None) != (
                split.loss_tokens is None):
            raise DatasetError(f"loss masks, loss_tokens and chat_format must come together, "
                               f"in {path}")
    return manifest


def _open_shard(folder: Path, entry: ShardEntry, dtype: np.dtype, vocab_size: int) -> np.ndarray:
    path = folder / entry.file  # the schema's name pattern allows no separators
    array = _map_verified(path, dtype, entry.tokens, entry.sha256)
    step = 1 << 24  # every id below the vocab size, 16M ids at a time
    for start in range(0, len(array), step):
        top = int(array[start:start + step].max(initial=0))
        if top >= vocab_size:
            raise DatasetError(f"token id {top} is not below the vocab size {vocab_size}, "
                               f"in {path}")
    return array


def _open_mask(folder: Path, entry: ShardEntry) -> np.ndarray:
    path = folder / entry.mask_file
    mask = _map_verified(path, np.dtype(np.uint8), entry.tokens, str(entry.mask_sha256))
    if int(mask.max(initial=0)) > 1:
        raise DatasetError(f"a loss mask holds a value other than 0 and 1, in {path}")
    return mask


def _map_verified(path: Path, dtype: np.dtype, count: int, sha256: str) -> np.ndarray:
    """`count` items of `dtype` memory-mapped from `path`, whose bytes hash to `sha256`."""
    fd = open_regular(path, DatasetError)
    with open(fd, "rb", closefd=True) as fh:
        size = fh.seek(0, 2)
        if size % dtype.itemsize or size // dtype.itemsize != count:
            raise DatasetError(f"shard size {size} bytes does not hold {count} "
                               f"{dtype.name} tokens, in {path}")
        array = np.memmap(fh, dtype=dtype, mode="r", shape=(count,))
    # Hash the mapping itself, not a read() of the file before mapping it: bytes rewritten
    # between the two would otherwise be used unchecked.
    raw = array.view(np.uint8)
    digest = hashlib.sha256()
    for start in range(0, raw.size, HASH_CHUNK):
        digest.update(raw[start:start + HASH_CHUNK])
    if digest.hexdigest() != sha256:
        raise DatasetError(f"sha256 mismatch (file changed or corrupted), in {path}")
    return array
