"""Reading one raw input file for `fragment preprocess`: the hostile-content boundary.

`read_input_file(task, config)` reads a file once (capped; refused if it changes while
read), rejects binary content and invalid UTF-8, splits it into documents by format:

- `.txt`, `.md`   the whole file is one document;
- `.jsonl`        one JSON object per line, text under `config.text_field`; a line is
                  length-checked before parsing, and a bad line is skipped and counted;
- `.parquet`      column `config.text_field`, after the footer's declared sizes were
                  checked against the caps, 64 rows at a time within a decoded-bytes
                  budget (`parquet_decode.decoded_batches`);

then cleans (`cleaning.py`), filters by length and hashes each document. Whatever the
file holds, it returns a `FileResult` (kept, or rejected with a `Reason`): nothing a
file can contain makes it raise. It runs in this process or in a helper process, so
it only takes and returns plain picklable data.

It does not walk folders (`discovery.py`), deduplicate or write anything
(`preprocess.py`).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fragment_llm.config import PreprocessConfig
from fragment_llm.data.cleaning import CleaningCounts, clean_text
from fragment_llm.data.parquet_decode import (
    MAX_PARQUET_FOOTER_BYTES,
    DecodeLimit,
    decoded_batches,
    first_line,
    open_parquet_bytes,
    parquet_errors,
)
from fragment_llm.data.processed import MAX_DOC_BYTES, MAX_MALFORMED_LISTED, Reason, Status
from fragment_llm.errors import InputDataError
from fragment_llm.safety.files import (
    open_regular,
    refuse_duplicate_keys,
    refuse_json_constant,
    translate_os_errors,
)

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

KINDS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
SUPPORTED = ", ".join(KINDS)
BINARY_RATIO = 0.05  # more control bytes (or U+FFFD) than this: not text
PARQUET_ROW_BYTES = 8  # rows cost at least an offset each, even when null
MAX_DETAIL_CHARS = 200

# Control bytes that text does not hold: C0 except NUL (checked on its own), \t \n \v
# \f \r, plus DEL. A few (an ANSI escape) are cleaned; many mean a binary file.
_BINARY_BYTES = bytes([*range(0x01, 0x09), *range(0x0E, 0x20), 0x7F])
_NOT_BINARY_BYTES = bytes(b for b in range(256) if b not in _BINARY_BYTES)
# One decoder for every JSONL line: refuses duplicate keys and NaN/Infinity like
# `safeio.parse_json_guarded`, without re-creating a decoder per line.
_JSON = json.JSONDecoder(object_pairs_hook=refuse_duplicate_keys,
                         parse_constant=refuse_json_constant)


@dataclass(frozen=True, slots=True)
class FileTask:
    """One input file to read, as discovery found it."""

    path: str  # the real path to open: symlinks inside the root are already resolved
    root: str  # the input root as given, for the manifest
    source: str  # path relative to the root, '/'-separated
    kind: str  # "text" | "jsonl" | "parquet"
    size: int  # bytes at discovery


@dataclass(slots=True)
class FileResult:
    """What reading made of one file: its cleaned documents and everything it counted."""

    status: Status = "kept"
    reason: Reason | None = None
    detail: str = ""
    bytes_read: int = 0
    sha256: str | None = None
    # Kept documents: their UTF-8 texts concatenated in `blob` (or, from a helper process,
    # in the file `spool`), and per document (sha256 hex, UTF-8 bytes, characters).
    blob: bytes = b""
    spool: str | None = None
    docs: list[tuple[str, int, int]] = field(default_factory=list)
    cleaning: CleaningCounts = field(default_factory=CleaningCounts)
    too_short: int = 0
    too_long: int = 0
    malformed: int = 0
    malformed_records: list[tuple[int, str]] = field(default_factory=list)


class _Rejected(Exception):
    """Internal: this file is rejected for `reason`. Never leaves `read_input_file`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail[:MAX_DETAIL_CHARS]


def read_input_file(task: FileTask, config: PreprocessConfig) -> FileResult:
    """Read, validate, clean and hash one file, here or in a helper process. Never
    raises for anything the file's content or its disappearance can cause."""
    result = FileResult()
    try:
        data = _read_stable(Path(task.path), config.max_file_bytes, result)
        result.sha256 = hashlib.sha256(data).hexdigest()
        documents = _Documents(config, result)
        READERS[task.kind](data, documents, config)
    except _Rejected as rejected:
        return FileResult(status="rejected", reason=rejected.reason, detail=rejected.detail,
                          bytes_read=result.bytes_read, sha256=result.sha256)
    result.blob = documents.texts[0] if len(documents.texts) == 1 else b"".join(documents.texts)
    return result


def read_batch_in_helper(tasks: list[FileTask], config: PreprocessConfig,
                         spools: list[str]) -> list[FileResult]:
    """`read_input_file` on each file, in a helper process. Each file's text goes back
    through its own file in the staging folder (`spools`): one write and one read,
    instead of being pickled through a pipe."""
    results = []
    for task, spool in zip(tasks, spools, strict=True):
        result = read_input_file(task, config)
        if result.blob:
            with translate_os_errors(Path(spool)):
                fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(result.blob)
            result.blob, result.spool = b"", spool
        results.append(result)
    return results


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why `read_whole_file` did not return a file's bytes."""

    reason: Reason
    detail: str


def read_whole_file(path: Path, max_bytes: int) -> bytes | Refusal:
    """The exact bytes of the regular file `path`, read once and at most `max_bytes`,
    or why not (gone, replaced by a symlink, too large, changed while read): the first
    step of `read_input_file`, for another boundary that parses its own formats."""
    try:
        return _read_stable(path, max_bytes, FileResult())
    except _Rejected as rejected:
        return Refusal(rejected.reason, rejected.detail)


def _signature(fd: int) -> tuple[int, int, int, int]:
    info = os.fstat(fd)
    return (info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


def _read_stable(path: Path, max_bytes: int, result: FileResult) -> bytes:
    """The whole file, read once, and the proof it did not change while being read."""
    fd = _open_input(path)
    with os.fdopen(fd, "rb") as fh:
        before = _signature(fd)
        if before[0] > max_bytes:
            raise _Rejected(Reason.TOO_LARGE, f"{before[0]} bytes; max_file_bytes is {max_bytes}")
        try:
            data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise _Rejected(Reason.UNREADABLE, f"read failed: {exc.strerror}") from None
        after = _signature(fd)
    result.bytes_read = len(data)
    if len(data) > max_bytes:
        raise _Rejected(Reason.TOO_LARGE, f"grew past max_file_bytes={max_bytes} while read")
    if after != before or len(data) != before[0]:
        raise _Rejected(Reason.CHANGED_WHILE_READ, "size or modification time changed while "
                        "it was read; rerun when it is stable")
    return data


def _open_input(path: Path) -> int:
    try:
        return open_regular(path, InputDataError)
    except InputDataError:
        pass
    try:  # say why, from what is there now
        info = os.lstat(path)
    except OSError:
        raise _Rejected(Reason.VANISHED, "disappeared before it was read") from None
    if stat.S_ISLNK(info.st_mode):
        raise _Rejected(Reason.CHANGED_WHILE_READ, "replaced by a symlink; not followed")
    if not stat.S_ISREG(info.st_mode):
        raise _Rejected(Reason.NOT_REGULAR_FILE, f"{file_type(info.st_mode)}: not read")
    raise _Rejected(Reason.UNREADABLE, "cannot be opened for reading (permissions?)")


class _Documents:
    """Cleans, filters and hashes one file's documents into its `FileResult`."""

    def __init__(self, config: PreprocessConfig, result: FileResult) -> None:
        self.max_chars = config.max_doc_chars
        self.min_chars = config.min_doc_chars
        self.result = result
        self.texts: list[bytes] = []

    def add(self, text: str) -> None:
        if len(text) > self.max_chars:
            self.result.too_long += 1
            return
        cleaned, counts = clean_text(text)
        self.result.cleaning.add(counts)
        if len(cleaned) < self.min_chars:
            self.result.too_short += 1
            return
        data = cleaned.encode("utf-8")
        if len(data) > MAX_DOC_BYTES:
            self.result.too_long += 1
            return
        self.texts.append(data)
        self.result.docs.append((hashlib.sha256(data).hexdigest(), len(data), len(cleaned)))

    def malformed(self, line: int, reason: str) -> None:
        self.result.malformed += 1
        if len(self.result.malformed_records) < MAX_MALFORMED_LISTED:
            self.result.malformed_records.append((line, reason[:MAX_DETAIL_CHARS]))


def _check_not_binary(data: bytes) -> None:
    nul = data.find(b"\0")
    if nul >= 0:
        raise _Rejected(Reason.NUL_BYTES, f"NUL byte at offset {nul}: binary, not text")
    # translate() deletes every non-binary byte at C speed; what is left is the count.
    binary = len(data.translate(None, _NOT_BINARY_BYTES))
    if binary > BINARY_RATIO * len(data):
        raise _Rejected(Reason.BINARY, f"{100 * binary / len(data):.0f}% control bytes: "
                        "binary, not text")


def _decode(data: bytes, policy: str, offset: int = 0, where: str = "") -> str:
    """UTF-8 bytes as text: rejected with the byte offset, or with U+FFFD replacements."""
    try:
        return data.decode("utf-8", "strict" if policy == "reject" else "replace")
    except UnicodeDecodeError as exc:
        raise _Rejected(Reason.INVALID_UTF8, f"invalid UTF-8 at byte {offset + exc.start}"
                        f"{where}; use --invalid-utf8 replace to keep it") from None


def _read_text(data: bytes, docs: _Documents, config: PreprocessConfig) -> None:
    """A .txt or .md file is one document."""
    _check_not_binary(data)
    text = _decode(data, config.invalid_utf8)
    if config.invalid_utf8 == "replace" and text.count("\ufffd") > BINARY_RATIO * len(text):
        raise _Rejected(Reason.BINARY, "mostly invalid UTF-8: binary, not text")
    docs.add(text)


def _read_jsonl(data: bytes, docs: _Documents, config: PreprocessConfig) -> None:
    """One JSON object per line; a bad line is skipped and counted, never fatal."""
    _check_not_binary(data)
    offset = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    lines = (data[offset:] if offset else data).split(b"\n")
    for number, line in enumerate(lines, start=1):
        _read_jsonl_line(line, number, offset, docs, config)
        offset += len(line) + 1


def _read_jsonl_line(line: bytes, number: int, offset: int, docs: _Documents,
                     config: PreprocessConfig) -> None:
    if len(line) > config.max_line_bytes:  # before decoding or parsing anything
        docs.malformed(number, f"line of {len(line)} bytes; max_line_bytes is "
                       f"{config.max_line_bytes}")
        return
    text = _decode(line, config.invalid_utf8, offset)
    if not text or text.isspace():  # blank lines are allowed (and strip() would copy)
        return
    try:
        record = _parse_record(text, config.max_json_depth)
    except ValueError as exc:
        docs.malformed(number, str(exc))
        return
    value = _text_field(record, config.text_field)
    if isinstance(value, str):
        docs.add(value)
    else:
        docs.malformed(number, value.problem)


def _parse_record(text: str, max_depth: int) -> object:
    try:  # the C parser stops at Python's recursion limit: no crash, a RecursionError
        record = _JSON.decode(text)
    except RecursionError:
        raise ValueError(f"JSON nested deeper than max_json_depth={max_depth}") from None
    except ValueError as exc:  # JSONDecodeError, duplicate key, NaN
        raise ValueError(f"invalid JSON: {first_line(exc)}") from None
    # Walking the parsed record visits only its containers: a flat record costs ~1 us.
    if isinstance(record, dict | list) and json_value_depth(record) > max_depth:
        raise ValueError(f"JSON nested deeper than max_json_depth={max_depth}")
    return record


def json_value_depth(value: object) -> int:
    """Nesting depth of parsed JSON, iteratively: `{"a": [1, [2]]} -> 3`, `"[[["` -> 0."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, dict | list))
    return deepest


@dataclass(frozen=True, slots=True)
class _Problem:
    problem: str


def _text_field(record: object, name: str) -> str | _Problem:
    if not isinstance(record, dict):
        return _Problem(f"a JSON {type(record).__name__}, not an object")
    if name not in record:
        return _Problem(f"no {name!r} field")
    value = record[name]
    if not isinstance(value, str):
        return _Problem(f"field {name!r} is a JSON {type(value).__name__}, not a string")
    return value


def _read_parquet(data: bytes, docs: _Documents, config: PreprocessConfig) -> None:
    """Column `text_field` of a Parquet file, a few rows at a time, sizes checked first."""
    parquet = _open_parquet(data, config)
    row = 0
    limit = DecodeLimit(config.max_file_bytes, "max_file_bytes",
                        lambda message: _Rejected(Reason.PARQUET_TOO_LARGE, message),
                        lambda message: _Rejected(Reason.PARQUET_INVALID, message))
    for column in decoded_batches(parquet, [config.text_field], limit):
        for value in _batch_texts(column[0], row, config):
            row += 1
            if value is None:
                docs.malformed(row, "null text")
            else:
                docs.add(value)


def _open_parquet(data: bytes, config: PreprocessConfig) -> pq.ParquetFile:
    _check_parquet_footer(data)
    try:
        parquet = open_parquet_bytes(data)
        leaf = _text_leaf(parquet, config.text_field)
        _check_declared_sizes(parquet.metadata, leaf, config)
        return open_parquet_bytes(data, parquet.metadata)
    except parquet_errors() as exc:
        raise _Rejected(Reason.PARQUET_INVALID, f"unreadable Parquet: {first_line(exc)}") \
            from None


def _check_parquet_footer(data: bytes) -> None:
    if len(data) < 12 or data[:4] != b"PAR1" or data[-4:] != b"PAR1":
        raise _Rejected(Reason.PARQUET_INVALID, "no Parquet magic bytes at both ends "
                        "(truncated, encrypted or not Parquet)")
    footer = int.from_bytes(data[-8:-4], "little")
    if footer > min(len(data) - 12, MAX_PARQUET_FOOTER_BYTES):
        raise _Rejected(Reason.PARQUET_INVALID, f"footer length {footer} is impossible "
                        f"for a {len(data)}-byte file (truncated?)")


def _text_leaf(parquet: pq.ParquetFile, name: str) -> int:
    """The Parquet column index of top-level string column `name`."""
    import pyarrow as pa

    schema = parquet.schema_arrow
    matches = schema.get_all_field_indices(name)
    if not matches:
        raise _Rejected(Reason.PARQUET_MISSING_COLUMN, f"no column {name!r} (columns: "
                        f"{', '.join(schema.names)[:100]}); set --text-field")
    if len(matches) > 1:
        raise _Rejected(Reason.PARQUET_INVALID, f"{len(matches)} columns named {name!r}: "
                        "ambiguous")
    kind = schema.field(matches[0]).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise _Rejected(Reason.PARQUET_WRONG_TYPE, f"column {name!r} has type {kind}, "
                        "expected string")
    paths = [parquet.metadata.schema.column(i).path for i in range(parquet.metadata.num_columns)]
    return paths.index(name)


def _check_declared_sizes(metadata: pq.FileMetaData, leaf: int,
                          config: PreprocessConfig) -> None:
    """Refuse, before decompressing anything, what the footer says would exceed the caps:
    a few KB of Parquet can declare a column of hundreds of MB."""
    cap = config.max_file_bytes
    if metadata.num_rows * PARQUET_ROW_BYTES > cap:
        raise _Rejected(Reason.PARQUET_TOO_LARGE, f"{metadata.num_rows} rows declared; "
                        f"max_file_bytes={cap} allows {cap // PARQUET_ROW_BYTES}")
    declared = 0
    for index in range(metadata.num_row_groups):
        size = metadata.row_group(index).column(leaf).total_uncompressed_size
        declared += max(size, 0)
        if size < 0 or declared > cap:
            raise _Rejected(Reason.PARQUET_TOO_LARGE, f"text column declares {declared} "
                            f"uncompressed bytes by row group {index}; max_file_bytes is {cap}")


def _batch_texts(column: pa.Array, first_row: int,
                 config: PreprocessConfig) -> list[str | None]:
    import pyarrow as pa

    try:
        try:
            column.validate(full=True)  # checks the UTF-8 in C++, much faster than Python
            return column.to_pylist()
        except pa.ArrowInvalid:  # find the bad row, or apply --invalid-utf8 replace
            raw = column.cast(pa.large_binary()).to_pylist()
    except parquet_errors() as exc:
        raise _Rejected(Reason.PARQUET_INVALID, f"rows after {first_row} unreadable: "
                        f"{first_line(exc)}") from None
    return [None if value is None else
            _decode(value, config.invalid_utf8, where=f" in row {first_row + row}")
            for row, value in enumerate(raw, start=1)]


READERS: dict[str, Callable[[bytes, _Documents, PreprocessConfig], None]] = {
    "text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}


def file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"
