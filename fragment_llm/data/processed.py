"""The processed-folder format (`data/processed/`): its manifest schema, writer and reader.

This module owns the contract between `fragment preprocess`, which writes the folder,
and the tokenizer and training stages, which read it:

    DIR/manifest.json          ProcessedManifest (format "fragment-processed", version 1)
    DIR/shard-00000.parquet    zstd Parquet, one row per document, string columns
    DIR/shard-00001.parquet    `text`, `source` (path relative to its input root) and
    ...                        `sha256` (hex digest of the cleaned text's UTF-8 bytes)

`ShardWriter` writes the shards (bounded in size, a row group every few MB) and
`manifest_json` the manifest's bytes. `ProcessedCorpus.open(folder)` treats the folder
as hostile: the manifest is size-capped, parsed with guarded JSON and validated against
the schema below; every shard it names must be a regular file (no symlink) inside the
folder, with the recorded size and sha256 and the pinned Parquet schema. Any problem is
a `ProcessedDataError` naming the file and the rule. Reading streams a few rows at a
time, and a row group may decode to no more than the reader's cap, so memory stays
bounded whatever a footer claims (`decoded_batches`, which raw Parquet inputs use too).

It does not read raw inputs or clean text (see `readers.py`, `cleaning.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fragment_llm.config import PreprocessConfig
from fragment_llm.data.cleaning import CleaningCounts
from fragment_llm.errors import OutputError, ProcessedDataError
from fragment_llm.safety.files import (
    open_regular,
    parse_json_guarded,
    read_capped,
    sha256_file,
    translate_os_errors,
)
from fragment_llm.safety.text import escape_for_display

FORMAT = "fragment-processed"
VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_COLUMNS = ("text", "source", "sha256")
MAX_SHARDS = 100_000  # five digits in the name
MAX_MANIFEST_BYTES = 256 << 20  # ~1M input files listed at ~250 bytes each
MAX_MALFORMED_LISTED = 20  # per input file; the count is always exact
# A row group holds a few MB of text; a single document can be larger, but nothing
# legitimate comes near this, and a hostile footer must not make us allocate more.
MAX_ROW_GROUP_BYTES = 512 << 20
# A shard file is read whole to be hashed and parsed from the same bytes; preprocess
# writes at most 512 MiB of text (plus one document) per shard, compressed.
MAX_SHARD_FILE_BYTES = 1 << 30
MAX_PARQUET_FOOTER_BYTES = 16 << 20
ROW_GROUP_BYTES = 8 << 20  # text per row group the writer aims for: what a reader holds
# The longest document a shard may hold: its row group (with up to ROW_GROUP_BYTES of
# other rows) stays under the reader's MAX_ROW_GROUP_BYTES, and its shard (with up to
# 512 MiB of other text) under MAX_SHARD_FILE_BYTES. Longer ones are dropped as too long.
MAX_DOC_BYTES = MAX_ROW_GROUP_BYTES // 2
# What a row costs beyond its text: the sha256 hex digest and three Arrow offsets.
ROW_OVERHEAD_BYTES = 64 + 3 * 4
HINT_RUN_PREPROCESS = "run `fragment preprocess` first"
HINT_RERUN = "rebuild it with `fragment preprocess --overwrite`"

SHA256_HEX = r"^[0-9a-f]{64}$"
Status = Literal["kept", "rejected", "skipped"]


class Reason(StrEnum):
    """Why an input file was rejected or skipped (the manifest's reason codes)."""

    UNSUPPORTED_EXTENSION = "unsupported-extension"
    ALREADY_VISITED = "already-visited"
    SYMLINK_ESCAPES_ROOT = "symlink-escapes-root"
    SYMLINK_LOOP = "symlink-loop"
    BROKEN_SYMLINK = "broken-symlink"
    NOT_REGULAR_FILE = "not-regular-file"
    UNREADABLE = "unreadable"
    VANISHED = "vanished"
    CHANGED_WHILE_READ = "changed-while-read"
    TOO_LARGE = "too-large"
    TOTAL_CAP = "total-cap"
    TOO_MANY_FILES = "too-many-files"
    NUL_BYTES = "nul-bytes"
    BINARY = "binary"
    INVALID_UTF8 = "invalid-utf8"
    PARQUET_INVALID = "parquet-invalid"
    PARQUET_MISSING_COLUMN = "parquet-missing-column"
    PARQUET_WRONG_TYPE = "parquet-wrong-type"
    PARQUET_TOO_LARGE = "parquet-too-large"


SKIP_REASONS = frozenset({Reason.UNSUPPORTED_EXTENSION, Reason.ALREADY_VISITED})


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MalformedRecord(_Frozen):
    """One skipped JSONL line or Parquet row (1-based) and why it was skipped."""

    line: int = Field(ge=1)
    reason: str = Field(max_length=500)


class InputFile(_Frozen):
    """What happened to one discovered input file."""

    path: str = Field(description="path relative to its input root, '/'-separated")
    root: str = Field(description="the input root as given on the command line")
    size: int = Field(ge=0, description="bytes on disk when discovered or read")
    sha256: str | None = Field(None, pattern=SHA256_HEX, description="of the bytes read")
    status: Status
    reason: Reason | None = None
    detail: str = Field("", max_length=1000)
    documents: int = Field(0, ge=0, description="documents written from this file")
    malformed: int = Field(0, ge=0, description="JSONL lines / Parquet rows skipped")
    malformed_records: list[MalformedRecord] = Field(
        default_factory=list, max_length=MAX_MALFORMED_LISTED)

    @model_validator(mode="after")
    def _reason_matches_status(self) -> InputFile:
        if (self.status == "kept") != (self.reason is None):
            raise ValueError("a kept file has no reason; a rejected or skipped one has one")
        return self

    @property
    def location(self) -> str:
        """Root and path joined, for messages: `data/raw/plays/hamlet.txt`."""
        return (Path(self.root) / self.path).as_posix()


class CharsRemoved(_Frozen):
    """Characters removed by each cleaning rule (see `cleaning.py` for the rules)."""

    newlines: int = Field(ge=0)
    nfc: int = Field(description="net; NFC can, rarely, lengthen text")
    controls: int = Field(ge=0)
    bidi: int = Field(ge=0)
    zero_width: int = Field(ge=0)
    surrogates: int = Field(ge=0)
    trailing_whitespace: int = Field(ge=0)
    blank_lines: int = Field(ge=0)

    @classmethod
    def from_counts(cls, counts: CleaningCounts) -> CharsRemoved:
        return cls(**counts.as_dict())


class Counts(_Frozen):
    documents: int = Field(ge=0, description="documents written to the shards")
    chars: int = Field(ge=0, description="characters in the documents written")
    duplicates_dropped: int = Field(ge=0)
    too_short_dropped: int = Field(ge=0)
    too_long_dropped: int = Field(ge=0)
    malformed_records: int = Field(ge=0)
    bytes_read: int = Field(ge=0)
    files_kept: int = Field(ge=0)
    files_rejected: int = Field(ge=0)
    files_skipped: int = Field(ge=0)
    chars_removed: CharsRemoved


class ShardInfo(_Frozen):
    file: str = Field(pattern=r"^shard-\d{5}\.parquet$")
    sha256: str = Field(pattern=SHA256_HEX)
    size: int = Field(ge=1, le=MAX_SHARD_FILE_BYTES, description="bytes of the Parquet file")
    documents: int = Field(ge=1)
    chars: int = Field(ge=0)
    text_bytes: int = Field(ge=0, description="UTF-8 bytes of the documents' text")


class ProcessedManifest(_Frozen):
    """manifest.json of a processed folder. No timestamps: same input, same bytes."""

    format: Literal["fragment-processed"]
    version: Literal[1]
    fragment_llm_version: str
    config: PreprocessConfig
    inputs: list[str]
    files: list[InputFile]
    counts: Counts
    shards: list[ShardInfo] = Field(min_length=1, max_length=MAX_SHARDS)

    @model_validator(mode="after")
    def _consistent(self) -> ProcessedManifest:
        names = [shard.file for shard in self.shards]
        if names != [shard_name(i) for i in range(len(names))]:
            raise ValueError("shards must be named shard-00000.parquet, shard-00001... in order")
        if sum(shard.documents for shard in self.shards) != self.counts.documents:
            raise ValueError("counts.documents differs from the sum over shards")
        if sum(shard.chars for shard in self.shards) != self.counts.chars:
            raise ValueError("counts.chars differs from the sum over shards")
        return self


def manifest_json(manifest: ProcessedManifest) -> str:
    """The manifest's file text: sorted keys, ASCII, one top-level key and one input file
    per line, so it diffs well; the same input always gives the same bytes.

    Written with json's C encoder: `indent=` would switch to the pure-Python one, which
    takes minutes for a manifest listing a million files.
    """
    data = manifest.model_dump(mode="json")
    lines = []
    for key in sorted(data):
        if key == "files":
            files = ",\n".join("    " + _compact(item) for item in data[key])
            value = f"[\n{files}\n  ]" if files else "[]"
        else:
            value = _compact(data[key])
        lines.append(f"  {_compact(key)}: {value}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=True, allow_nan=False,
                      separators=(", ", ": "))


def shard_name(index: int) -> str:
    """`3 -> 'shard-00003.parquet'`."""
    return f"shard-{index:05d}.parquet"


class Document(NamedTuple):
    text: str
    source: str
    sha256: str


# ---------------------------------------------------------------------------- reader


class ProcessedCorpus:
    """A verified processed folder: its manifest, and its documents as a stream."""

    def __init__(self, folder: Path, manifest: ProcessedManifest, manifest_sha256: str) -> None:
        self.folder = folder
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256

    @classmethod
    def open(cls, folder: Path) -> ProcessedCorpus:
        """Load and verify `folder`: manifest schema, then every shard's bytes and schema."""
        manifest_path = _require_manifest(folder)
        raw = read_capped(manifest_path, MAX_MANIFEST_BYTES, ProcessedDataError)
        data = parse_json_guarded(raw, str(manifest_path), ProcessedDataError)
        corpus = cls(folder, _validate_manifest(data, manifest_path),
                     hashlib.sha256(raw).hexdigest())
        for shard in corpus.manifest.shards:
            with corpus._open_shard(shard):
                pass
        return corpus

    @property
    def documents(self) -> int:
        return self.manifest.counts.documents

    @property
    def total_chars(self) -> int:
        return self.manifest.counts.chars

    @property
    def shard_paths(self) -> list[Path]:
        return [self.folder / shard.file for shard in self.manifest.shards]

    def iter_texts(self) -> Iterator[str]:
        """Every document's text, in shard order, a few rows in memory at a time."""
        for columns in self._iter_row_groups(("text",)):
            yield from columns[0]

    def iter_documents(self) -> Iterator[Document]:
        """Every document as (text, source, sha256), in shard order."""
        for texts, sources, hashes in self._iter_row_groups(SHARD_COLUMNS):
            for row in zip(texts, sources, hashes, strict=True):
                yield Document(*row)

    def _iter_row_groups(self, columns: tuple[str, ...]) -> Iterator[list[list[str]]]:
        """The columns' values a few hundred rows at a time; a row group may decode to at
        most MAX_ROW_GROUP_BYTES, whatever its footer declares."""
        for shard in self.manifest.shards:
            path = self.folder / shard.file
            with self._open_shard(shard) as parquet:
                for index in range(parquet.num_row_groups):
                    limit = _row_group_limit(index, path)
                    for arrays in decoded_batches(parquet, list(columns), limit, [index]):
                        yield _checked_values(arrays, index, path)

    def _open_shard(self, shard: ShardInfo) -> _ShardHandle:
        return _ShardHandle(self.folder / shard.file, shard)


# ----------------------------------------------------------------- manifest checks


def _require_manifest(folder: Path) -> Path:
    if not folder.is_dir():
        raise ProcessedDataError(f"processed folder not found: {folder}", hint=HINT_RUN_PREPROCESS)
    manifest_path = folder / MANIFEST_NAME
    if not os.path.lexists(manifest_path):
        raise ProcessedDataError(f"no {MANIFEST_NAME} in {folder}", hint=HINT_RUN_PREPROCESS)
    return manifest_path


def _validate_manifest(data: Any, path: Path) -> ProcessedManifest:
    if isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") != VERSION:
        raise ProcessedDataError(
            f"unsupported processed format version {data.get('version')!r} "
            f"(this fragment-llm reads version {VERSION}), in {path}",
            hint="rerun `fragment preprocess --overwrite` with this version")
    try:
        return ProcessedManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        # Key names come from the file: escaped, so the message stays one harmless line.
        where = escape_for_display(".".join(str(part) for part in first["loc"])) or "(top level)"
        raise ProcessedDataError(f"invalid manifest field {where}: {first['msg']}, in {path}",
                                 hint=HINT_RERUN) from None


# -------------------------------------------------------------------- shard checks


class _ShardHandle:
    """A context manager opening one shard safely and verifying it.

    The shard's bytes are read once (opened without following symlinks, size-checked
    first), hashed, and parsed from memory: neither a file swapped after the check nor
    bytes rewritten in place can be what pyarrow reads. One compressed shard
    (`shard_max_bytes`, 128 MiB by default) is held at a time.
    """

    def __init__(self, path: Path, shard: ShardInfo) -> None:
        self.path = path
        self.shard = shard
        self._file: BinaryIO | None = None

    def __enter__(self) -> Any:
        import pyarrow as pa

        with os.fdopen(open_regular(self.path, ProcessedDataError), "rb") as fh:
            data = _verified_bytes(fh, self.path, self.shard)
        self._file = pa.BufferReader(data)
        try:
            return _open_parquet(self._file, self.path, self.shard)
        except BaseException:
            self._file.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        if self._file is not None:
            self._file.close()


def _verified_bytes(fh: BinaryIO, path: Path, shard: ShardInfo) -> bytes:
    info = os.fstat(fh.fileno())
    if not stat.S_ISREG(info.st_mode) or info.st_size != shard.size:
        raise ProcessedDataError(f"shard size {info.st_size} differs from the manifest's "
                                 f"{shard.size}, in {path}", hint=HINT_RUN_PREPROCESS)
    data = fh.read(shard.size + 1)  # one byte more: a file that grew is caught below
    if len(data) != shard.size or hashlib.sha256(data).hexdigest() != shard.sha256:
        raise ProcessedDataError(f"shard sha256 differs from the manifest (modified or "
                                 f"corrupted), in {path}", hint=HINT_RUN_PREPROCESS)
    return data


def _open_parquet(source: Any, path: Path, shard: ShardInfo) -> Any:
    import pyarrow as pa

    try:
        parquet = open_parquet_bytes(source)
        schema = parquet.schema_arrow
        rows = parquet.metadata.num_rows
        group_sizes = [parquet.metadata.row_group(i).total_byte_size
                       for i in range(parquet.num_row_groups)]
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ProcessedDataError(f"not a valid Parquet file ({_first_line(exc)}), in {path}") \
            from None
    _check_schema(schema, path)
    if rows != shard.documents:
        raise ProcessedDataError(f"shard has {rows} rows, the manifest says {shard.documents}, "
                                 f"in {path}")
    if any(size > MAX_ROW_GROUP_BYTES for size in group_sizes):
        raise ProcessedDataError(f"a row group exceeds {MAX_ROW_GROUP_BYTES} bytes, in {path}")
    try:  # again, reading dictionary-encoded columns as dictionaries: see decoded_batches
        return open_parquet_bytes(source, parquet.metadata)
    except parquet_errors() as exc:
        raise ProcessedDataError(f"not a valid Parquet file ({_first_line(exc)}), in {path}") \
            from None


def _check_schema(schema: Any, path: Path) -> None:
    import pyarrow as pa

    names = tuple(schema.names)
    if names != SHARD_COLUMNS:
        raise ProcessedDataError(f"shard columns are {list(names)}, expected "
                                 f"{list(SHARD_COLUMNS)}, in {path}")
    for field in schema:
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            raise ProcessedDataError(f"shard column {field.name!r} has type {field.type}, "
                                     f"expected string, in {path}")


def _row_group_limit(index: int, path: Path) -> DecodeLimit:
    def too_large(message: str) -> ProcessedDataError:
        return ProcessedDataError(f"row group {index}: {message}, in {path}",
                                  hint=HINT_RUN_PREPROCESS)

    def unreadable(message: str) -> ProcessedDataError:
        return ProcessedDataError(f"cannot read row group {index} ({message}), in {path}")

    return DecodeLimit(MAX_ROW_GROUP_BYTES, "the most a row group may hold", too_large,
                       unreadable)


def _checked_values(arrays: list[Any], index: int, path: Path) -> list[list[str]]:
    import pyarrow as pa

    try:
        for array in arrays:
            array.validate(full=True)  # UTF-8 checked in C++: to_pylist would raise mid-stream
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ProcessedDataError(f"cannot read row group {index} ({_first_line(exc)}), "
                                 f"in {path}") from None
    if any(array.null_count for array in arrays):
        raise ProcessedDataError(f"row group {index} holds null values, in {path}")
    return [array.to_pylist() for array in arrays]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# ------------------------------------------------- bounded decoding (readers.py too)

# Rows decoded at once: a batch of plain or delta-encoded values holds at most this many
# values, each no larger than its page; dictionary-encoded ones are measured first.
PARQUET_BATCH_ROWS = 64


def parquet_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    # Arrow raises its own classes, some of which are also OSError, ValueError, etc.
    return (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError,
            NotImplementedError, EOFError)


def open_parquet_bytes(data: bytes | Any, metadata: Any = None) -> Any:
    """A `ParquetFile` over bytes in memory, with thrift caps for a hostile footer. Given
    the `metadata` of a first open (reused, not parsed again), columns that hold
    dictionary pages are read as dictionaries (indices into the distinct values), which
    `decoded_batches` measures before expanding them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = data if isinstance(data, pa.BufferReader) else pa.BufferReader(data)
    dictionary = None
    if metadata is not None:
        dictionary = [metadata.schema.column(leaf).path for leaf in range(metadata.num_columns)
                      if _has_dictionary(metadata, leaf)]
    return pq.ParquetFile(source, metadata=metadata, read_dictionary=dictionary or None,
                          thrift_string_size_limit=MAX_PARQUET_FOOTER_BYTES,
                          thrift_container_size_limit=1_000_000)


def _has_dictionary(metadata: Any, leaf: int) -> bool:
    return any(metadata.row_group(group).column(leaf).has_dictionary_page
               for group in range(metadata.num_row_groups))


@dataclass(frozen=True)
class DecodeLimit:
    """How much a file's string columns may decode to, and the errors for going past it
    (`too_large`) or failing to decode (`unreadable`); each takes a one-line message."""

    budget: int
    cap_name: str
    too_large: Callable[[str], Exception]
    unreadable: Callable[[str], Exception]


def decoded_batches(parquet: Any, columns: list[str], limit: DecodeLimit,
                    row_groups: list[int] | None = None) -> Iterator[list[Any]]:
    """`columns` of a Parquet file as plain string arrays, `PARQUET_BATCH_ROWS` rows at a
    time, refused once they would decode to more than `limit.budget` bytes.

    The footer's sizes are only claims, and a small file can expand far past them: 15,000
    rows referring to one 200 KB dictionary value are 3 GB of text. A dictionary-encoded
    batch (see `open_parquet_bytes`) is measured from its indices and its distinct values
    before it is expanded; any other batch holds at most a batch of values.
    """
    decoded = done = 0  # bytes measured, rows yielded
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns,
                                   row_groups=row_groups, use_threads=False)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            arrays = [batch.column(i) for i in range(batch.num_columns)]
            decoded += sum(map(_decoded_bytes, arrays))
            if decoded > limit.budget:
                raise limit.too_large(
                    f"{', '.join(columns)[:60]} would decode to more than {limit.budget:,} "
                    f"bytes by row {done + batch.num_rows:,} (repeated or expanding "
                    f"values); {limit.cap_name} is {limit.budget:,}")
            arrays = [array.dictionary_decode() if hasattr(array, "indices") else array
                      for array in arrays]
        except parquet_errors() as exc:
            raise limit.unreadable(f"rows after {done:,} unreadable: {_first_line(exc)}") \
                from None
        yield arrays
        done += batch.num_rows


def _decoded_bytes(array: Any) -> int:
    """Bytes of string data `array` holds once expanded (a dictionary's without doing so)."""
    import pyarrow.compute as pc

    if hasattr(array, "indices"):
        lengths = pc.take(pc.binary_length(array.dictionary), array.indices)
    else:
        lengths = pc.binary_length(array)
    return int(pc.sum(lengths).as_py() or 0)


# ---------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class DocumentBatch:
    """Documents to append, in order: their texts as one Arrow array over the bytes they
    came in (no copy), with each one's sha256, UTF-8 size and character count."""

    texts: Any  # pa.LargeStringArray
    digests: list[str]
    sizes: list[int]
    chars: list[int]

    @classmethod
    def of(cls, blob: bytes, docs: list[tuple[str, int, int]], keep: list[bool]) -> DocumentBatch:
        import pyarrow as pa

        offsets = array("q", accumulate((size for _, size, _ in docs), initial=0))
        # Zero-copy: the array's data buffer is the blob itself.
        texts = pa.Array.from_buffers(pa.large_string(), len(docs),
                                      [None, pa.py_buffer(offsets), pa.py_buffer(blob)])
        if not all(keep):
            texts = texts.filter(pa.array(keep, pa.bool_()))
            docs = [doc for doc, wanted in zip(docs, keep, strict=True) if wanted]
        return cls(texts, [d[0] for d in docs], [d[1] for d in docs], [d[2] for d in docs])


class ShardWriter:
    """Writes documents to `shard-NNNNN.parquet` files, a row group every few MB.

    A shard is closed before a document would take it past `max_bytes`, so every shard
    holds at most `max_bytes` unless one document alone is larger. A document counts its
    text plus its row's sha256 and source: millions of short documents must not make a
    shard larger than the reader accepts. Whatever the reader refuses (too many shards,
    a shard file too large) is refused here first, with `OutputError`.
    """

    def __init__(self, folder: Path, max_bytes: int, zstd_level: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.zstd_level = zstd_level
        self.group_bytes = min(ROW_GROUP_BYTES, max_bytes)
        self.shards: list[ShardInfo] = []
        self._staged: list[tuple[Any, list[str], str]] = []  # (texts, digests, source)
        self._buffered = 0
        self._writer: Any = None
        self._docs = self._chars = self._text_bytes = self._shard_bytes = 0
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="fragment-fsync")
        self._synced: list[Future[None]] = []

    @property
    def _path(self) -> Path:
        return self.folder / shard_name(len(self.shards))

    def add(self, batch: DocumentBatch, source: str) -> None:
        """Append a batch, cutting it where a shard or a row group is full."""
        start = 0
        overhead = ROW_OVERHEAD_BYTES + len(source.encode("utf-8", "surrogateescape"))
        for index, size in enumerate(batch.sizes):
            cost = size + overhead
            if self._docs and self._shard_bytes + cost > self.max_bytes:
                self._stage(batch, source, start, index)
                start = index
                self._finish_shard()
            self._docs += 1
            self._chars += batch.chars[index]
            self._text_bytes += size
            self._shard_bytes += cost
            self._buffered += cost
            if self._buffered >= self.group_bytes:
                self._stage(batch, source, start, index + 1)
                start = index + 1
                self._flush()
        self._stage(batch, source, start, len(batch.sizes))

    def _stage(self, batch: DocumentBatch, source: str, start: int, stop: int) -> None:
        if stop > start:
            self._staged.append((batch.texts.slice(start, stop - start),
                                 batch.digests[start:stop], source))

    def close(self) -> list[ShardInfo]:
        if self._docs:
            self._finish_shard()
        self._syncer.shutdown(wait=True)
        for done in self._synced:
            done.result()
        return self.shards

    def abandon(self) -> None:
        """Stop the background fsync thread (a no-op after `close`)."""
        self._syncer.shutdown(wait=True, cancel_futures=True)

    def _flush(self) -> None:
        if not self._staged:
            return
        if len(self.shards) >= MAX_SHARDS:
            raise OutputError(f"the output would need more than {MAX_SHARDS:,} shards, the "
                              f"most a processed folder may hold, in {self.folder}",
                              hint="raise shard_max_bytes in [preprocess], or lower "
                                   "max_total_bytes")
        table = _table(self._staged)
        with translate_os_errors(self._path):
            if self._writer is None:
                self._writer = _parquet_writer(self._path, self.zstd_level)
            self._writer.write_table(table, row_group_size=table.num_rows)
        self._staged = []
        self._buffered = 0

    def _finish_shard(self) -> None:
        self._flush()
        path = self._path
        with translate_os_errors(path):
            self._writer.close()
            size = path.stat().st_size
        if size > MAX_SHARD_FILE_BYTES:
            raise OutputError(f"shard {path.name} is {size:,} bytes; readers refuse shards "
                              f"over {MAX_SHARD_FILE_BYTES:,}",
                              hint="lower shard_max_bytes in [preprocess]")
        self.shards.append(ShardInfo(
            file=path.name, sha256=sha256_file(path, OutputError), size=size,
            documents=self._docs, chars=self._chars, text_bytes=self._text_bytes))
        # Flush it to disk while the next shard is built: the final fsync then has
        # little left to wait for.
        self._synced.append(self._syncer.submit(_fsync, path))
        self._writer = None
        self._docs = self._chars = self._text_bytes = self._shard_bytes = 0


def _fsync(path: Path) -> None:
    with translate_os_errors(path):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([pa.field(name, pa.string(), nullable=False) for name in SHARD_COLUMNS])


def _table(staged: list[tuple[Any, list[str], str]]) -> Any:
    import pyarrow as pa

    texts = pa.concat_arrays([texts for texts, _, _ in staged]).cast(pa.string())
    digests = [digest for _, batch, _ in staged for digest in batch]
    sources = [source for _, batch, source in staged for _ in batch]
    return pa.Table.from_arrays([texts, pa.array(sources, pa.string()),
                                 pa.array(digests, pa.string())], schema=_schema())


def _parquet_writer(path: Path, zstd_level: int) -> Any:
    import pyarrow.parquet as pq

    # No statistics: min/max of whole documents would bloat the footer for nothing.
    return pq.ParquetWriter(path, _schema(), compression="zstd",
                            compression_level=zstd_level, use_dictionary=["source"],
                            write_statistics=False)
