"""Writing a processed folder's shards: `shard-NNNNN.parquet`, bounded in size, a row
group every few MB, each fsynced in the background while the next is built.

`ShardWriter` is what `fragment preprocess` appends documents to; the manifest that
lists the shards is written by the stage (`processed.manifest_json`). The sizes it aims
at and the caps it refuses past are the reader's, from `processed.py`, so whatever the
reader would refuse is refused here first, with `OutputError`. It does not read, clean
or deduplicate anything.
"""

from __future__ import annotations

import os
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from fragment_llm.data.processed import (
    MAX_SHARD_FILE_BYTES,
    MAX_SHARDS,
    ROW_GROUP_BYTES,
    ROW_OVERHEAD_BYTES,
    SHARD_COLUMNS,
    ShardInfo,
    shard_name,
)
from fragment_llm.errors import OutputError
from fragment_llm.safety.files import sha256_file, translate_os_errors

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq


@dataclass(frozen=True)
class DocumentBatch:
    """Documents to append, in order: their texts as one Arrow array over the bytes they
    came in (no copy), with each one's sha256, UTF-8 size and character count."""

    texts: pa.LargeStringArray
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


class _Rows(NamedTuple):
    """Rows staged for the next row group: part of one batch, all from one source."""

    texts: pa.LargeStringArray
    digests: list[str]
    source: str


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
        self._staged: list[_Rows] = []
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None
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
            self._staged.append(_Rows(batch.texts.slice(start, stop - start),
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


def _schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([pa.field(name, pa.string(), nullable=False) for name in SHARD_COLUMNS])


def _table(staged: list[_Rows]) -> pa.Table:
    import pyarrow as pa

    texts = pa.concat_arrays([rows.texts for rows in staged]).cast(pa.string())
    digests = [digest for rows in staged for digest in rows.digests]
    sources = [rows.source for rows in staged for _ in rows.digests]
    return pa.Table.from_arrays([texts, pa.array(sources, pa.string()),
                                 pa.array(digests, pa.string())], schema=_schema())


def _parquet_writer(path: Path, zstd_level: int) -> pq.ParquetWriter:
    import pyarrow.parquet as pq

    # No statistics: min/max of whole documents would bloat the footer for nothing.
    return pq.ParquetWriter(path, _schema(), compression="zstd",
                            compression_level=zstd_level, use_dictionary=["source"],
                            write_statistics=False)
