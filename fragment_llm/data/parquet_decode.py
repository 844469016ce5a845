"""Bounded Parquet decoding: opening Parquet bytes with capped footers, and reading string
columns a few rows at a time within a budget of decoded bytes.

Shared by the two places that read Parquet: raw `.parquet` inputs (`readers.py`) and the
processed folder's shards (`processed.py`). Each passes a `DecodeLimit` carrying its own
budget and its own errors. This module decides nothing about what a file must hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

MAX_PARQUET_FOOTER_BYTES = 16 << 20
# Rows decoded at once: a batch of plain or delta-encoded values holds at most this many
# values, each no larger than its page; dictionary-encoded ones are measured first.
PARQUET_BATCH_ROWS = 64


def first_line(exc: BaseException) -> str:
    """An exception's message cut to one line of at most 200 characters, for a one-line
    error (Arrow's messages can span many lines)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def parquet_errors() -> tuple[type[BaseException], ...]:
    import pyarrow as pa

    # Arrow raises its own classes, some of which are also OSError, ValueError, etc.
    return (pa.ArrowException, OSError, ValueError, TypeError, IndexError, KeyError,
            NotImplementedError, EOFError)


def open_parquet_bytes(data: bytes | pa.BufferReader,
                       metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
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
                      if any(metadata.row_group(group).column(leaf).has_dictionary_page
                             for group in range(metadata.num_row_groups))]
    return pq.ParquetFile(source, metadata=metadata, read_dictionary=dictionary or None,
                          thrift_string_size_limit=MAX_PARQUET_FOOTER_BYTES,
                          thrift_container_size_limit=1_000_000)


@dataclass(frozen=True)
class DecodeLimit:
    """How much a file's string columns may decode to, and the errors for going past it
    (`too_large`) or failing to decode (`unreadable`); each takes a one-line message."""

    budget: int
    cap_name: str
    too_large: Callable[[str], Exception]
    unreadable: Callable[[str], Exception]


def decoded_batches(parquet: pq.ParquetFile, columns: list[str], limit: DecodeLimit,
                    row_groups: list[int] | None = None) -> Iterator[list[pa.Array]]:
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
            raise limit.unreadable(f"rows after {done:,} unreadable: {first_line(exc)}") \
                from None
        yield arrays
        done += batch.num_rows


def _decoded_bytes(array: pa.Array) -> int:
    """Bytes of string data `array` holds once expanded (a dictionary's without doing so)."""
    import pyarrow.compute as pc

    if hasattr(array, "indices"):
        lengths = pc.take(pc.binary_length(array.dictionary), array.indices)
    else:
        lengths = pc.binary_length(array)
    return int(pc.sum(lengths).as_py() or 0)
