"""The processed-folder format (`data/processed/`): its manifest schema and its reader.

This module owns the contract between `fragment preprocess`, which writes the folder,
and the tokenizer and training stages, which read it:

    DIR/manifest.json          ProcessedManifest (format "fragment-processed", version 1)
    DIR/shard-00000.parquet    zstd Parquet, one row per document, string columns
    DIR/shard-00001.parquet    `text`, `source` (path relative to its input root) and
    ...                        `sha256` (hex digest of the cleaned text's UTF-8 bytes)

It owns the caps both sides keep (shard and row-group sizes, the manifest's size) and
`manifest_json`, the manifest's bytes; `processed_writer.py` writes the shards within
those caps. `ProcessedCorpus.open(folder)` treats the folder as hostile: the manifest
is size-capped, parsed with guarded JSON and validated against the schema below; every
shard it names must be a regular file (no symlink) inside the folder, with the recorded
size and sha256 and the pinned Parquet schema. Any problem is a `ProcessedDataError`
naming the file and the rule. Reading streams a few rows at a time, and a row group may
decode to no more than the reader's cap, so memory stays bounded whatever a footer
claims (`parquet_decode.decoded_batches`, which raw Parquet inputs use too).

It does not read raw inputs or clean text (see `readers.py`, `cleaning.py`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fragment_llm.config import PreprocessConfig
from fragment_llm.data.cleaning import CleaningCounts
from fragment_llm.data.parquet_decode import (
    DecodeLimit,
    decoded_batches,
    first_line,
    open_parquet_bytes,
    parquet_errors,
)
from fragment_llm.errors import ProcessedDataError
from fragment_llm.safety.files import open_regular, parse_json_guarded, read_capped
from fragment_llm.safety.text import escape_for_display

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

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


def _compact(value: object) -> str:
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
        if not folder.is_dir():
            raise ProcessedDataError(f"processed folder not found: {folder}",
                                     hint=HINT_RUN_PREPROCESS)
        manifest_path = folder / MANIFEST_NAME
        if not os.path.lexists(manifest_path):
            raise ProcessedDataError(f"no {MANIFEST_NAME} in {folder}", hint=HINT_RUN_PREPROCESS)
        raw = read_capped(manifest_path, MAX_MANIFEST_BYTES, ProcessedDataError)
        data = parse_json_guarded(raw, str(manifest_path), ProcessedDataError)
        corpus = cls(folder, _validate_manifest(data, manifest_path),
                     hashlib.sha256(raw).hexdigest())
        for shard in corpus.manifest.shards:
            with _ShardHandle(folder / shard.file, shard):
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
            with _ShardHandle(path, shard) as parquet:
                for index in range(parquet.num_row_groups):
                    limit = _row_group_limit(index, path)
                    for arrays in decoded_batches(parquet, list(columns), limit, [index]):
                        yield _checked_values(arrays, index, path)


# ----------------------------------------------------------------- manifest checks


def _validate_manifest(data: object, path: Path) -> ProcessedManifest:
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

    def __enter__(self) -> pq.ParquetFile:
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


def _open_parquet(source: pa.BufferReader, path: Path, shard: ShardInfo) -> pq.ParquetFile:
    import pyarrow as pa

    try:
        parquet = open_parquet_bytes(source)
        schema = parquet.schema_arrow
        rows = parquet.metadata.num_rows
        group_sizes = [parquet.metadata.row_group(i).total_byte_size
                       for i in range(parquet.num_row_groups)]
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ProcessedDataError(f"not a valid Parquet file ({first_line(exc)}), in {path}") \
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
        raise ProcessedDataError(f"not a valid Parquet file ({first_line(exc)}), in {path}") \
            from None


def _check_schema(schema: pa.Schema, path: Path) -> None:
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


def _checked_values(arrays: list[pa.Array], index: int, path: Path) -> list[list[str]]:
    import pyarrow as pa

    try:
        for array in arrays:
            array.validate(full=True)  # UTF-8 checked in C++: to_pylist would raise mid-stream
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ProcessedDataError(f"cannot read row group {index} ({first_line(exc)}), "
                                 f"in {path}") from None
    if any(array.null_count for array in arrays):
        raise ProcessedDataError(f"row group {index} holds null values, in {path}")
    return [array.to_pylist() for array in arrays]
