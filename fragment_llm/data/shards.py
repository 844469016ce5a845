"""Token shards: processed documents -> binary token files + manifest; streaming batches.

Owns the token-shard format (`tokens/<key>/manifest.json`, `train-00000.bin`, ...),
its validating loader, and the deterministic, resumable batch order. Knows nothing of
models or optimisers: batches are plain int64 tensors.

Format: each shard is a flat little-endian array of token ids (uint16 when the
vocabulary fits, else uint32); every document is followed by `<|endoftext|>`.
Documents go to the train or validation split by their content hash, so the split
is deterministic and does not depend on file order.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fragment_llm import __version__
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

TOKENS_FORMAT = "fragment-tokens"
TOKENS_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
SHARD_NAME = re.compile(r"(train|val)-\d{5}\.bin")
DEFAULT_SHARD_TOKENS = 1 << 24  # 32 MB of uint16 per shard: small enough to fsync often
ENCODE_CHUNK_DOCS = 16


# --------------------------------------------------------------------------- manifest


class ShardEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    file: str = Field(pattern=f"^{SHARD_NAME.pattern}$")
    tokens: int = Field(ge=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SplitEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    documents: int = Field(ge=0)
    tokens: int = Field(ge=0)
    text_bytes: int = Field(ge=0, description="UTF-8 bytes of the documents, for bits/byte")
    shards: list[ShardEntry]


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


def cache_key(processed_sha256: str, tokenizer_sha256: str, val_fraction: float) -> str:
    """Name of the cache folder: changes whenever an input of the shards changes."""
    text = f"{TOKENS_VERSION}:{processed_sha256}:{tokenizer_sha256}:{val_fraction!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_validation(doc_sha256: str, val_fraction: float) -> bool:
    """Deterministic split by content: the first 8 hex digits as a number in [0, 1)."""
    return int(doc_sha256[:8], 16) / 0x1_0000_0000 < val_fraction


# ----------------------------------------------------------------------------- writing


class _ShardWriter:
    """Accumulates token arrays for one split and writes fixed-size shards into `folder`."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shard_tokens = shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[ShardEntry] = []
        self.documents = self.tokens = self.text_bytes = 0

    def add(self, ids: np.ndarray, text_bytes: int) -> None:
        self.pending.append(ids)
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
        self.shards.append(ShardEntry(file=name, tokens=len(data), sha256=sha256_bytes(raw)))
        self.pending, self.pending_tokens = [], 0

    def entry(self) -> SplitEntry:
        self.flush()
        return SplitEntry(documents=self.documents, tokens=self.tokens,
                          text_bytes=self.text_bytes, shards=self.shards)


ENCODE_WINDOW_DOCS = 256  # documents in flight at once: bounds memory whatever the corpus


def _windows(items: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    window: list[tuple[str, str]] = []
    for item in items:
        window.append(item)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _encode_all(tokenizer, docs: Iterable[tuple[str, str]], workers: int,
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


def _write_shards(tmp: Path, corpus, tokenizer, request: BuildRequest,
                  progress: ProgressFn) -> TokensManifest:
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {split: _ShardWriter(tmp, split, dtype, request.shard_tokens)
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


def _document_splits(corpus, val_fraction: float) -> Iterator[tuple[str, str]]:
    forced = _forced_validation_doc(corpus, val_fraction)
    for text, _source, doc_sha in corpus.iter_documents():
        held_out = doc_sha == forced or is_validation(doc_sha, val_fraction)
        yield text, ("val" if held_out else "train")


def _forced_validation_doc(corpus, val_fraction: float) -> str | None:
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


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class TokenSplit:
    """One split as memory-mapped shards, addressed as non-overlapping blocks.

    Block k of size T is tokens [k*T, k*T + T + 1) of one shard: T inputs plus the
    shifted targets. Blocks never straddle shards.
    """

    shards: tuple[np.ndarray, ...]

    def block_counts(self, block_size: int) -> list[int]:
        return [max(0, (len(s) - 1) // block_size) for s in self.shards]

    def num_blocks(self, block_size: int) -> int:
        return sum(self.block_counts(block_size))

    def block(self, index: int, block_size: int, starts: list[int]) -> np.ndarray:
        """Block `index`, given `starts` = cumulative block counts (see `block_starts`)."""
        shard = bisect.bisect_right(starts, index) - 1
        offset = (index - starts[shard]) * block_size
        return self.shards[shard][offset:offset + block_size + 1]

    def block_starts(self, block_size: int) -> list[int]:
        starts, total = [], 0
        for count in self.block_counts(block_size):
            starts.append(total)
            total += count
        return starts


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
        raw = load_json_bytes(folder / MANIFEST)
        manifest = _parse_manifest(raw, folder / MANIFEST)
        if vocab_size is not None and manifest.vocab_size != vocab_size:
            raise DatasetError(f"token shards were built for vocab size {manifest.vocab_size}, "
                               f"the tokenizer has {vocab_size}, in {folder}",
                               hint="delete the folder; it is rebuilt from data/processed")
        if manifest.eot_id >= manifest.vocab_size:
            raise DatasetError(f"eot_id {manifest.eot_id} is not below vocab_size, in {folder}")
        dtype = np.dtype(manifest.dtype).newbyteorder("<")
        splits = {name: TokenSplit(tuple(_open_shard(folder, entry, dtype, manifest.vocab_size)
                                         for entry in getattr(manifest, name).shards))
                  for name in ("train", "val")}
        return cls(folder, manifest, sha256_bytes(raw), splits["train"], splits["val"])


def load_json_bytes(path: Path) -> bytes:
    return read_capped(path, MAX_MANIFEST_BYTES, DatasetError)


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
    return manifest


def _open_shard(folder: Path, entry: ShardEntry, dtype: np.dtype, vocab_size: int) -> np.ndarray:
    path = folder / entry.file  # the schema's name pattern allows no separators
    fd = open_regular(path, DatasetError)
    with open(fd, "rb", closefd=True) as fh:
        size = fh.seek(0, 2)
        if size % dtype.itemsize or size // dtype.itemsize != entry.tokens:
            raise DatasetError(f"shard size {size} bytes does not hold {entry.tokens} "
                               f"{dtype.name} tokens, in {path}")
        array = np.memmap(fh, dtype=dtype, mode="r", shape=(entry.tokens,))
    # Hash the mapping itself, not a read() of the file before mapping it: bytes rewritten
    # between the two would otherwise be used unchecked.
    raw = array.view(np.uint8)
    digest = hashlib.sha256()
    for start in range(0, raw.size, HASH_CHUNK):
        digest.update(raw[start:start + HASH_CHUNK])
    if digest.hexdigest() != entry.sha256:
        raise DatasetError(f"sha256 mismatch (file changed or corrupted), in {path}")
    _check_ids(array, vocab_size, path)
    return array


def _check_ids(array: np.ndarray, vocab_size: int, path: Path) -> None:
    step = 1 << 24
    for start in range(0, len(array), step):
        top = int(array[start:start + step].max(initial=0))
        if top >= vocab_size:
            raise DatasetError(f"token id {top} is not below the vocab size {vocab_size}, "
                               f"in {path}")


# --------------------------------------------------------------------- batch ordering

_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def permuted_index(index: int, size: int, seed: int, epoch: int) -> int:
    """Position `index` of a seeded pseudo-random permutation of range(size).

    A 4-round Feistel network over the next even power of two, cycle-walking until
    the result lands inside the range: a bijection with O(1) memory, so the order of
    any corpus is reproducible from (seed, epoch) alone.
    """
    half_bits = max(1, math.ceil(max(1, (size - 1).bit_length()) / 2))
    half_mask = (1 << half_bits) - 1
    key = _mix64(seed * 1_000_003 + epoch)
    while True:
        left, right = index >> half_bits, index & half_mask
        for round_no in range(4):
            left, right = right, left ^ (_mix64(key + round_no * 7919 + right) & half_mask)
        index = (left << half_bits) | right
        if index < size:
            return index


class TokenStream:
    """Deterministic, resumable batches of training blocks for one rank.

    Global item k is block `permuted_index(k % n, n, seed, k // n)`: every epoch a new
    permutation. Each `next_batch(B)` call takes items [cursor + rank*B, ... + B) and
    advances the shared cursor by world*B, so all ranks stay in lock step and the
    whole position is one integer.
    """

    def __init__(self, split: TokenSplit, block_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.split, self.block_size, self.seed = split, block_size, seed
        self.rank, self.world = rank, world
        self.starts = split.block_starts(block_size)
        self.num_blocks = split.num_blocks(block_size)
        if self.num_blocks == 0:
            raise DatasetError(f"not enough tokens for one block of {block_size}",
                               hint="add text, or lower block_size")
        self.cursor = 0

    def item(self, k: int) -> np.ndarray:
        index = permuted_index(k % self.num_blocks, self.num_blocks, self.seed,
                               k // self.num_blocks)
        return self.split.block(index, self.block_size, self.starts)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.cursor + self.rank * batch_size
        rows = np.stack([self.item(first + j) for j in range(batch_size)]).astype(np.int64)
        self.cursor += self.world * batch_size
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]  # inputs (B, T), targets (B, T)

    @property
    def epoch(self) -> float:
        return self.cursor / self.num_blocks

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "seed": self.seed, "block_size": self.block_size,
                "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state.get("seed"), state.get("block_size")) != (self.seed, self.block_size):
            raise DatasetError("data position was saved with another seed or block size",
                               hint="resume with the same --seed and model block_size")
        cursor = state.get("cursor")
        if not isinstance(cursor, int) or cursor < 0:
            raise DatasetError(f"invalid data cursor {cursor!r} in the saved trainer state")
        self.cursor = cursor


class TokenBlockDataset(torch.utils.data.IterableDataset):
    """The same global order as `TokenStream`, split over DDP ranks and DataLoader workers.

    Worker w of rank r yields items k = start + r*W + w, start + (R*W) + r*W + w, ...
    (R ranks, W workers each), so no item is seen twice and none is skipped.
    """

    def __init__(self, split: TokenSplit, block_size: int, seed: int, rank: int = 0,
                 world: int = 1, start: int = 0, limit: int | None = None) -> None:
        super().__init__()
        self.stream = TokenStream(split, block_size, seed)
        self.rank, self.world, self.start, self.limit = rank, world, start, limit

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stride = self.world * workers
        k = self.start + self.rank * workers + worker
        while self.limit is None or k < self.start + self.limit:
            row = torch.from_numpy(self.stream.item(k).astype(np.int64))
            yield row[:-1], row[1:]
            k += stride


def spread_indices(total: int, count: int) -> list[int]:
    """`count` of the indices 0..total-1, evenly spaced, in order (all when count >= total).

    Evaluation samples blocks this way rather than taking the first ones: those all come
    from the first held-out document, and one document is not the held-out set.
    """
    count = min(total, count)
    return [k * total // count for k in range(count)]


def eval_batches(split: TokenSplit, block_size: int, batch_size: int, max_blocks: int,
                 rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`max_blocks` blocks spread evenly over the split (all of it when they fit), this
    rank's share, in batches."""
    starts = split.block_starts(block_size)
    mine = spread_indices(split.num_blocks(block_size), max_blocks)[rank::world]
    for first in range(0, len(mine), batch_size):
        rows = np.stack([split.block(k, block_size, starts)
                         for k in mine[first:first + batch_size]]).astype(np.int64)
        data = torch.from_numpy(rows)
        yield data[:, :-1], data[:, 1:]


def dump_manifest(manifest: TokensManifest) -> str:
    return dump_json(manifest.model_dump(mode="json"))
