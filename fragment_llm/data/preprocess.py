"""`fragment preprocess`: raw files -> validated, cleaned, deduplicated Parquet shards.

This module runs the stage, in four steps, and owns the last two:

1. discovery   walk the inputs and decide which files to read (`discovery.py`);
2. reading     here and in helper processes (`read_pool.py`, `readers.py`): read each
               file once, reject hostile content, split it into documents, clean and
               hash them;
3. writing     in this process, in input order: drop duplicates and write the shards
               (`processed_writer.py`);
4. manifest    record every file, count and shard (`processed.py` owns the format).

The output is built inside `safeio.staged_dir`, so a failed or interrupted run leaves
the previous output untouched. Results come back in input order whatever the number
of workers, so two runs over the same input write identical bytes. Memory is bounded
by the per-file cap times the few files in flight, never by the corpus size.

It does not parse file formats (`readers.py`), define cleaning rules (`cleaning.py`) or
the folder format (`processed.py`), and it never prints: the CLI renders the returned
`PreprocessReport`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragment_llm import __version__
from fragment_llm.config import PreprocessConfig
from fragment_llm.data.cleaning import CleaningCounts
from fragment_llm.data.discovery import (
    Discovered,
    apply_caps,
    discover,
    entry_path,
    path_label,
    resolve,
)
from fragment_llm.data.processed import (
    FORMAT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    VERSION,
    CharsRemoved,
    Counts,
    InputFile,
    MalformedRecord,
    ProcessedManifest,
    ShardInfo,
    manifest_json,
)
from fragment_llm.data.processed_writer import DocumentBatch, ShardWriter
from fragment_llm.data.read_pool import result_stream, take_blob
from fragment_llm.data.readers import SUPPORTED, FileResult, FileTask
from fragment_llm.errors import InputDataError, OutputError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.safety.files import atomic_write_text, staged_dir
from fragment_llm.safety.workers import cap_workers, reader_bytes


@dataclass(frozen=True)
class PreprocessReport:
    """The stage's result: where it wrote, the manifest it wrote, and how long it took."""

    out: Path
    manifest: ProcessedManifest
    seconds: float
    note: str | None = None  # why fewer workers ran than were asked for

    def problem_rows(self) -> list[tuple[str, str, str]]:
        """(file, status, reason) for every file not used, or used with records skipped."""
        rows = []
        for item in self.manifest.files:
            if item.reason is not None:
                rows.append((item.location, item.status, _reason_text(item)))
            elif item.malformed:
                first = item.malformed_records[0]
                rows.append((item.location, "kept", f"{item.malformed} malformed records "
                             f"skipped (first: line {first.line}: {first.reason})"))
        return rows

    def as_json(self) -> dict[str, Any]:
        """`fragment preprocess --json`: the summary's figures, and every file not used."""
        return {"out": str(self.out), "counts": self.manifest.counts.model_dump(mode="json"),
                "shards": len(self.manifest.shards), "seconds": self.seconds,
                "problems": [{"file": file, "status": status, "reason": reason}
                             for file, status, reason in self.problem_rows()]}

    def summary_rows(self) -> list[tuple[str, str]]:
        counts = self.manifest.counts
        megabytes = counts.bytes_read / 1e6
        return [
            ("files kept / rejected / skipped",
             f"{counts.files_kept} / {counts.files_rejected} / {counts.files_skipped}"),
            ("documents written", f"{counts.documents:,}"),
            ("duplicates dropped", f"{counts.duplicates_dropped:,}"),
            ("too short / too long dropped",
             f"{counts.too_short_dropped:,} / {counts.too_long_dropped:,}"),
            ("malformed records skipped", f"{counts.malformed_records:,}"),
            ("input", f"{megabytes:,.1f} MB"),
            ("output shards", f"{len(self.manifest.shards)} in {self.out}"),
            ("speed", f"{megabytes / max(self.seconds, 1e-9):,.1f} MB/s"),
            ("time", f"{self.seconds:,.1f} s"),
            *([("note", self.note)] if self.note else []),
        ]


def _reason_text(item: InputFile) -> str:
    return f"{item.reason}: {item.detail}" if item.detail else str(item.reason)


# ------------------------------------------------------------------------ the stage


def run_preprocess(inputs: Sequence[Path], out: Path, config: PreprocessConfig, *,
                   overwrite: bool = False, progress: ProgressFn | None = None
                   ) -> PreprocessReport:
    """Validate, clean and shard `inputs` into `out`; see the module docstring.

    Raises `InputDataError` when an input is missing or nothing usable was found (then
    nothing is written), `OutputError` when `out` exists (without `overwrite`) or
    overlaps an input.
    """
    started = time.perf_counter()
    _check_paths(inputs, out)
    with staged_dir(out, overwrite) as staging:
        entries = apply_caps(discover(inputs, config), config)
        if not entries:
            raise _nothing_usable([], inputs)
        _check_listing_fits(_listing_floor(entries), out, len(entries), "at least ")
        # `workers` lowered to the cores there are and to what memory fits, reading
        # files up to the largest one to read here.
        largest = max((entry.size for entry in entries if isinstance(entry, FileTask)),
                      default=0)
        workers = cap_workers(config.workers, reader_bytes(largest))
        run_config = config.model_copy(update={"workers": workers.count})
        manifest = _build(entries, inputs, staging, run_config, progress or no_progress)
        # The manifest records the count asked for: the lowered one depends on the machine,
        # and the manifest's bytes (and every hash downstream) must not.
        manifest = manifest.model_copy(update={"config": config})
        text = manifest_json(manifest)
        _check_listing_fits(len(text), out, len(entries))
        atomic_write_text(staging / MANIFEST_NAME, text)
    return PreprocessReport(out, manifest, time.perf_counter() - started, workers.note)


def _check_paths(inputs: Sequence[Path], out: Path) -> None:
    """Refuse missing inputs and any overlap between the inputs and the output."""
    if not inputs:
        raise InputDataError("no inputs given", hint="pass files or folders, e.g. data/raw")
    out_real = resolve(out)
    for given in inputs:
        if not os.path.lexists(given):
            raise InputDataError(f"input not found: {given}",
                                 hint="check the path; the default input is data/raw")
        real = resolve(given)
        if not real.exists():
            raise InputDataError(f"input is a broken symlink: {given}")
        if real.is_dir() and out_real.is_relative_to(real):
            raise OutputError(f"output folder {out} is inside input folder {given}",
                              hint="choose an --out outside every input")
        if real.is_relative_to(out_real):
            raise OutputError(f"input {given} is inside the output folder {out}",
                              hint="choose an --out that holds none of the inputs")


def _build(entries: list[Discovered], inputs: Sequence[Path], staging: Path,
           config: PreprocessConfig, progress: ProgressFn) -> ProcessedManifest:
    tasks = [entry for entry in entries if isinstance(entry, FileTask)]
    total = sum(task.size for task in tasks)
    progress("reading", 0, total)
    with _Collector(staging, config) as collector, \
            result_stream(tasks, config, staging) as results:
        for entry in entries:
            collector.add(entry, next(results) if isinstance(entry, FileTask) else None)
            progress("reading", collector.bytes_done, total)
        shards = collector.close()
    if not shards:
        raise _nothing_usable(collector.files, inputs)
    return ProcessedManifest(
        format=FORMAT, version=VERSION, fragment_llm_version=__version__, config=config,
        inputs=[path_label(str(path)) for path in inputs], files=collector.files,
        counts=collector.counts(), shards=shards)


def _check_listing_fits(size: int, out: Path, files: int, bound: str = "") -> None:
    """The manifest lists every input file; `ProcessedCorpus.open` refuses one over
    MAX_MANIFEST_BYTES, so a manifest that large is refused here, never written."""
    if size > MAX_MANIFEST_BYTES:
        raise OutputError(
            f"the manifest listing {files:,} input files would be {bound}{size:,} bytes, "
            f"over the {MAX_MANIFEST_BYTES:,} that readers accept, in {out / MANIFEST_NAME}",
            hint="give preprocess only the files or folders holding text, or lower "
                 "max_files in [preprocess]")


def _listing_floor(entries: list[Discovered]) -> int:
    """A lower bound of the manifest's size, from its list of files alone: a listing too
    large for the reader is refused before any file is read."""
    # Bytes of the shortest manifest line for one file (empty path, root and detail).
    empty = InputFile(path="", root="", size=0, status="kept")
    floor = len(json.dumps(empty.model_dump(mode="json"), separators=(", ", ": "))) + 6
    return sum(floor + len(entry.root) + len(entry_path(entry))
               + (len(entry.detail) if isinstance(entry, InputFile) else 0)
               for entry in entries)


def _nothing_usable(files: list[InputFile], inputs: Sequence[Path]) -> InputDataError:
    where = ", ".join(str(path) for path in inputs)
    if not files:
        return InputDataError(f"no input files found in {where}",
                              hint=f"put {SUPPORTED} files there")
    problems = [item for item in files if item.reason is not None]
    first = f"; first: {problems[0].location}: {_reason_text(problems[0])}" if problems else ""
    return InputDataError(
        f"no usable documents in {len(files)} input files under {where} "
        f"({len(problems)} rejected or skipped{first})",
        hint="documents shorter than --min-doc-chars and duplicates are dropped too")


# ------------------------------------------------------------- writing (this process)


class _Collector:
    """Takes results in input order: drops duplicates, writes shards, keeps the records."""

    def __init__(self, staging: Path, config: PreprocessConfig) -> None:
        self.writer = ShardWriter(staging, config.shard_max_bytes, config.zstd_level)
        self.seen: set[str] = set()  # sha256 of every document written: 64 chars each
        self.files: list[InputFile] = []
        self.cleaning = CleaningCounts()
        self.duplicates = self.too_short = self.too_long = self.malformed = 0
        self.bytes_read = self.bytes_done = 0

    def __enter__(self) -> _Collector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.writer.abandon()

    def add(self, entry: Discovered, result: FileResult | None) -> None:
        if isinstance(entry, InputFile):
            self.files.append(entry)
            return
        assert result is not None  # a task always has a result
        kept = self._write(entry.source, result)
        self.cleaning.add(result.cleaning)
        self.too_short += result.too_short
        self.too_long += result.too_long
        self.malformed += result.malformed
        self.bytes_read += result.bytes_read
        self.bytes_done += entry.size
        self.files.append(InputFile(
            path=entry.source, root=entry.root, size=result.bytes_read or entry.size,
            sha256=result.sha256, status=result.status, reason=result.reason,
            detail=result.detail, documents=kept, malformed=result.malformed,
            malformed_records=[MalformedRecord(line=line, reason=reason)
                               for line, reason in result.malformed_records]))

    def _write(self, source: str, result: FileResult) -> int:
        blob = take_blob(result)
        keep = []
        for digest, _, _ in result.docs:
            keep.append(digest not in self.seen)
            self.seen.add(digest)
        kept = sum(keep)
        self.duplicates += len(keep) - kept
        if kept:
            self.writer.add(DocumentBatch.of(blob, result.docs, keep), source)
        return kept

    def close(self) -> list[ShardInfo]:
        return self.writer.close()

    def counts(self) -> Counts:
        statuses = [item.status for item in self.files]
        return Counts(
            documents=sum(s.documents for s in self.writer.shards),
            chars=sum(s.chars for s in self.writer.shards),
            duplicates_dropped=self.duplicates, too_short_dropped=self.too_short,
            too_long_dropped=self.too_long, malformed_records=self.malformed,
            bytes_read=self.bytes_read, files_kept=statuses.count("kept"),
            files_rejected=statuses.count("rejected"), files_skipped=statuses.count("skipped"),
            chars_removed=CharsRemoved.from_counts(self.cleaning))
