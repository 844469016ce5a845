"""`fragment preprocess`: raw files -> validated, cleaned, deduplicated Parquet shards.

This module owns the stage's work, in four steps:

1. discovery   walk the inputs in sorted order without leaving an input root, keeping
               only regular files with a supported extension (`.txt`, `.md`, `.jsonl`,
               `.parquet`) and recording why every other path was rejected or skipped;
2. reading     here and in helper processes (`readers.py`): read each file once,
               reject hostile content, split it into documents, clean and hash them;
3. writing     in this process, in input order: drop duplicates and write the shards;
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

import contextlib
import errno
import functools
import json
import multiprocessing
import os
import shutil
import signal
import stat
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fragment_llm import __version__
from fragment_llm.config import PreprocessConfig
from fragment_llm.data.cleaning import CleaningCounts
from fragment_llm.data.processed import (
    FORMAT,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SKIP_REASONS,
    VERSION,
    CharsRemoved,
    Counts,
    DocumentBatch,
    InputFile,
    MalformedRecord,
    ProcessedManifest,
    Reason,
    ShardInfo,
    ShardWriter,
    Status,
    manifest_json,
)
from fragment_llm.data.readers import (
    KINDS,
    SUPPORTED,
    FileResult,
    FileTask,
    file_type,
    read_batch_in_helper,
    read_input_file,
)
from fragment_llm.errors import InputDataError, OutputError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.safety.files import atomic_write_text, read_capped, staged_dir
from fragment_llm.safety.signals import uninterrupted
from fragment_llm.safety.workers import WorkerCap, cap_workers, die_with_parent, reader_bytes

MiB = 1 << 20
# Below this many input bytes, starting worker processes costs more than it saves.
POOL_MIN_BYTES = 16 * MiB
# Files go to helpers in batches; a few batches are queued per helper, and results held
# here stay under BYTES_IN_FLIGHT (beyond one batch).
BATCH_BYTES = 4 * MiB
BATCH_FILES = 256
BATCHES_IN_FLIGHT_PER_HELPER = 4
BYTES_IN_FLIGHT = 64 * MiB
SPOOL_NAME = ".spool"  # helpers' results, inside the staging folder, removed before the end

Discovered = FileTask | InputFile  # a file to read, or one already rejected/skipped


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
        entries = _apply_caps(discover(inputs, config), config)
        if not entries:
            raise _nothing_usable([], inputs)
        _check_listing_fits(_listing_floor(entries), out, len(entries), "at least ")
        workers = _cap_workers(config, entries)
        run_config = config.model_copy(update={"workers": workers.count})
        manifest = _build(entries, inputs, staging, run_config, progress or no_progress)
        # The manifest records the count asked for: the lowered one depends on the machine,
        # and the manifest's bytes (and every hash downstream) must not.
        manifest = manifest.model_copy(update={"config": config})
        text = manifest_json(manifest)
        _check_listing_fits(len(text), out, len(entries))
        atomic_write_text(staging / MANIFEST_NAME, text)
    return PreprocessReport(out, manifest, time.perf_counter() - started, workers.note)


def _cap_workers(config: PreprocessConfig, entries: list[Discovered]) -> WorkerCap:
    """`workers` lowered to the cores there are and to what memory fits, reading files
    up to the largest one to read here."""
    largest = max((entry.size for entry in entries if isinstance(entry, FileTask)), default=0)
    return cap_workers(config.workers, reader_bytes(largest))


def _check_paths(inputs: Sequence[Path], out: Path) -> None:
    """Refuse missing inputs and any overlap between the inputs and the output."""
    if not inputs:
        raise InputDataError("no inputs given", hint="pass files or folders, e.g. data/raw")
    out_real = _resolve(out)
    for given in inputs:
        if not os.path.lexists(given):
            raise InputDataError(f"input not found: {given}",
                                 hint="check the path; the default input is data/raw")
        real = _resolve(given)
        if not real.exists():
            raise InputDataError(f"input is a broken symlink: {given}")
        if real.is_dir() and out_real.is_relative_to(real):
            raise OutputError(f"output folder {out} is inside input folder {given}",
                              hint="choose an --out outside every input")
        if real.is_relative_to(out_real):
            raise OutputError(f"input {given} is inside the output folder {out}",
                              hint="choose an --out that holds none of the inputs")


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise InputDataError(f"cannot resolve {path}: {exc}") from None


def _build(entries: list[Discovered], inputs: Sequence[Path], staging: Path,
           config: PreprocessConfig, progress: ProgressFn) -> ProcessedManifest:
    tasks = [entry for entry in entries if isinstance(entry, FileTask)]
    total = sum(task.size for task in tasks)
    progress("reading", 0, total)
    with _Collector(staging, config) as collector, \
            _result_stream(tasks, config, staging) as results:
        for entry in entries:
            collector.add(entry, next(results) if isinstance(entry, FileTask) else None)
            progress("reading", collector.bytes_done, total)
        shards = collector.close()
    if not shards:
        raise _nothing_usable(collector.files, inputs)
    return ProcessedManifest(
        format=FORMAT, version=VERSION, fragment_llm_version=__version__, config=config,
        inputs=[_label(str(path)) for path in inputs], files=collector.files,
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


@functools.cache
def _entry_floor() -> int:
    """Bytes of the shortest manifest line for one file (empty path, root and detail)."""
    empty = InputFile(path="", root="", size=0, status="kept")
    return len(json.dumps(empty.model_dump(mode="json"), separators=(", ", ": "))) + 6


def _listing_floor(entries: list[Discovered]) -> int:
    """A lower bound of the manifest's size, from its list of files alone: a listing too
    large for the reader is refused before any file is read."""
    return sum(_entry_floor() + len(entry.root) + len(_entry_path(entry))
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


# ------------------------------------------------------------------------- discovery


@dataclass(frozen=True, slots=True)
class _Descend:
    real: Path  # a folder to walk next


def discover(inputs: Sequence[Path], config: PreprocessConfig) -> list[Discovered]:
    """Every path below `inputs`, in a fixed order, as a task or as a rejection.

    Stops after `max_files` entries, recording one `too-many-files` rejection.
    """
    found: list[Discovered] = []
    seen_files: set[tuple[int, int]] = set()
    for given in inputs:
        for entry in _entries_of(given, seen_files):
            if len(found) >= config.max_files:
                found.append(_record(entry.root, _entry_path(entry), 0, Reason.TOO_MANY_FILES,
                                     f"discovery stopped after max_files={config.max_files}"))
                return found
            found.append(entry)
    return found


def _entry_path(entry: Discovered) -> str:
    return entry.source if isinstance(entry, FileTask) else entry.path


def _entries_of(given: Path, seen_files: set[tuple[int, int]]) -> Iterator[Discovered]:
    """An explicit input is followed even if it is a symlink: the user named it."""
    real = _resolve(given)
    if real.is_dir():
        yield from _walk(real, _label(str(given)), seen_files)
        return
    root = _label(str(given.parent))
    try:
        info = os.stat(real)
    except OSError:
        yield _record(root, _label(given.name), 0, Reason.VANISHED, "disappeared")
        return
    item = _classify(real, info, _label(given.name), root, set(), seen_files)
    assert not isinstance(item, _Descend)  # real is not a folder
    yield item


def _walk(root: Path, label: str, seen_files: set[tuple[int, int]]) -> Iterator[Discovered]:
    """Depth-first, names sorted, with an explicit stack (no recursion limit to hit)."""
    visited = {_key(os.stat(root))}
    stack: list[tuple[Path, str, list[str]]] = []
    unlistable = _push_folder(stack, root, "", label)
    if unlistable:
        yield unlistable
    while stack:
        folder, prefix, names = stack[-1]
        if not names:
            stack.pop()
            continue
        name = names.pop()
        item = _examine(folder, name, prefix + name, root, label, visited, seen_files)
        if not isinstance(item, _Descend):
            yield item
        elif unlistable := _push_folder(stack, item.real, prefix + name, label):
            yield unlistable


def _push_folder(stack: list[tuple[Path, str, list[str]]], folder: Path, rel: str,
                 label: str) -> InputFile | None:
    """Put a folder's names on the walk's stack, reversed so `pop()` gives sorted order."""
    try:
        names = sorted(os.listdir(folder), reverse=True)
    except OSError:
        return _record(label, _label(rel or "."), 0, Reason.UNREADABLE, "folder cannot be listed")
    stack.append((folder, rel + "/" if rel else "", names))
    return None


def _examine(folder: Path, name: str, rel: str, root: Path, label: str,
             visited: set[tuple[int, int]], seen_files: set[tuple[int, int]]
             ) -> Discovered | _Descend:
    path = folder / name
    try:
        info = os.lstat(path)
    except OSError:
        return _record(label, _label(rel), 0, Reason.VANISHED, "disappeared during discovery")
    if not stat.S_ISLNK(info.st_mode):
        return _classify(path, info, _label(rel), label, visited, seen_files)
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(root):
        return _record(label, _label(rel), 0, Reason.SYMLINK_ESCAPES_ROOT,
                       "symlink points outside the input folder; not followed")
    try:
        info = os.stat(target)
    except OSError as exc:
        reason = Reason.SYMLINK_LOOP if exc.errno == errno.ELOOP else Reason.BROKEN_SYMLINK
        return _record(label, _label(rel), 0, reason, "symlink cannot be resolved")
    if stat.S_ISDIR(info.st_mode) and folder.is_relative_to(target):
        return _record(label, _label(rel), 0, Reason.SYMLINK_LOOP,
                       "symlink points to a folder that contains it; not followed")
    return _classify(target, info, _label(rel), label, visited, seen_files)


def _classify(real: Path, info: os.stat_result, rel: str, label: str,
              visited: set[tuple[int, int]], seen_files: set[tuple[int, int]]
              ) -> Discovered | _Descend:
    if stat.S_ISDIR(info.st_mode):
        if _key(info) in visited:
            return _record(label, rel, 0, Reason.ALREADY_VISITED, "folder already walked")
        visited.add(_key(info))
        return _Descend(real)
    if not stat.S_ISREG(info.st_mode):
        return _record(label, rel, 0, Reason.NOT_REGULAR_FILE,
                       f"{file_type(info.st_mode)}: only regular files are read")
    kind = KINDS.get(real.suffix.lower())
    if kind is None:
        return _record(label, rel, info.st_size, Reason.UNSUPPORTED_EXTENSION,
                       f"not one of {SUPPORTED}")
    if _key(info) in seen_files:
        return _record(label, rel, info.st_size, Reason.ALREADY_VISITED,
                       "same file as an earlier input")
    seen_files.add(_key(info))
    return FileTask(str(real), label, rel, kind, info.st_size)


def _key(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)


def _label(text: str) -> str:
    """A path as valid UTF-8 text: undecodable bytes in names become `\\xNN`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _record(root: str, path: str, size: int, reason: Reason, detail: str) -> InputFile:
    status: Status = "skipped" if reason in SKIP_REASONS else "rejected"
    return InputFile(path=path, root=root, size=size, status=status, reason=reason,
                     detail=detail)


def _apply_caps(entries: list[Discovered], config: PreprocessConfig) -> list[Discovered]:
    """Reject files over `max_file_bytes`, and every file once `max_total_bytes` is reached.

    Decided here, from the sizes discovery saw, so the outcome does not depend on timing.
    """
    capped: list[Discovered] = []
    total, stopped = 0, False
    for entry in entries:
        if isinstance(entry, FileTask):
            if entry.size > config.max_file_bytes:
                entry = _record(entry.root, entry.source, entry.size, Reason.TOO_LARGE,
                                f"{entry.size} bytes; max_file_bytes is {config.max_file_bytes}")
            elif stopped or total + entry.size > config.max_total_bytes:
                stopped = True
                entry = _record(entry.root, entry.source, entry.size, Reason.TOTAL_CAP,
                                f"max_total_bytes={config.max_total_bytes} reached; not read")
            else:
                total += entry.size
        capped.append(entry)
    return capped


# -------------------------------------------------------------- workers and ordering


@contextlib.contextmanager
def _result_stream(tasks: list[FileTask], config: PreprocessConfig, staging: Path
                   ) -> Iterator[Iterator[FileResult]]:
    """Yield an iterator of results in task order.

    `config.workers` counts this process: it reads files too whenever the oldest result
    is not ready, so `workers=2` means one helper process. On two cores that keeps both
    busy while shipping only the helper's share of the text between processes.
    """
    helpers = min(config.workers, len(tasks)) - 1
    if helpers < 1 or sum(task.size for task in tasks) < POOL_MIN_BYTES:
        yield (read_input_file(task, config) for task in tasks)
        return
    # forkserver: helpers start from a clean process, not a fork of one running threads
    # (rich's refresher, Arrow's pools), and import this module once, before forking.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fragment_llm.data.readers"])
    spool = staging / SPOOL_NAME
    spool.mkdir()
    with uninterrupted():  # multiprocessing's constructors must not be split by a signal
        pool = ProcessPoolExecutor(helpers, mp_context=context, initializer=_start_helper)
    with pool:
        try:
            yield _Scheduler(pool, tasks, config, helpers, spool).results()
        except BaseException:  # an error, Ctrl-C or SIGTERM: stop the helpers' batches too
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()  # ProcessPoolExecutor has no public way before 3.14
            raise
        finally:  # on an error or Ctrl-C, do not let queued files run to completion
            pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(spool, ignore_errors=True)


def _start_helper() -> None:
    """A helper ends with this process (even one SIGKILLed), and ignores Ctrl-C: that is
    handled once, by this process, which then stops the pool."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Scheduler:
    """Hands batches of files to helper processes and to this one, and yields the
    results in file order.

    Files go out in batches of a few MB, since each hand-off costs a few hundred
    microseconds of inter-process traffic. At most a few batches per helper are queued,
    and results held here (ready or not) stay under `BYTES_IN_FLIGHT` (beyond one
    batch): memory is bounded however slow the writer or however large one file.
    """

    def __init__(self, pool: ProcessPoolExecutor, tasks: list[FileTask],
                 config: PreprocessConfig, helpers: int, spool: Path) -> None:
        self.pool, self.config, self.spool = pool, config, spool
        self.batches = _batches(tasks)
        self.window = BATCHES_IN_FLIGHT_PER_HELPER * helpers
        self.pending: deque[tuple[Future[list[FileResult]] | list[FileResult], int]] = deque()
        self.submitted = self.next = self.held = 0

    def results(self) -> Iterator[FileResult]:
        while self.next < len(self.batches) or self.pending:
            while self.next < len(self.batches) and self.submitted < self.window \
                    and self._room():
                self._take(self._submit(self.batches[self.next]))
                self.submitted += 1
            head = self.pending[0][0] if self.pending else None
            if isinstance(head, Future) and not head.done() and self.next < len(self.batches) \
                    and self._room():
                self._take([read_input_file(task, self.config) for task in self.batches[self.next]])
                continue
            yield from self._pop()

    def _submit(self, batch: list[FileTask]) -> Future[list[FileResult]]:
        spools = [str(self.spool / f"{self.next:08d}-{i:04d}.bin") for i in range(len(batch))]
        # The first submit starts the pool's processes and thread; split by a signal,
        # the pool cannot shut down ("cannot join thread before it is started").
        with uninterrupted():
            return self.pool.submit(read_batch_in_helper, batch, self.config, spools)

    def _room(self) -> bool:
        return not self.pending or self.held + _size(self.batches[self.next]) <= BYTES_IN_FLIGHT

    def _take(self, item: Future[list[FileResult]] | list[FileResult]) -> None:
        size = _size(self.batches[self.next])
        self.pending.append((item, size))
        self.held += size
        self.next += 1

    def _pop(self) -> list[FileResult]:
        item, size = self.pending.popleft()
        self.held -= size
        if isinstance(item, Future):
            self.submitted -= 1
            return item.result()
        return item


def _batches(tasks: list[FileTask]) -> list[list[FileTask]]:
    """Consecutive files grouped into batches of about `BATCH_BYTES` (or `BATCH_FILES`)."""
    batches: list[list[FileTask]] = [[]]
    for task in tasks:
        if batches[-1] and (_size(batches[-1]) + task.size > BATCH_BYTES
                            or len(batches[-1]) >= BATCH_FILES):
            batches.append([])
        batches[-1].append(task)
    return batches


def _size(batch: list[FileTask]) -> int:
    return sum(task.size for task in batch)


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
        self.files.append(_input_file(entry, result, kept))

    def _write(self, source: str, result: FileResult) -> int:
        blob = _take_blob(result)
        keep = [self._first_time(digest) for digest, _, _ in result.docs]
        kept = sum(keep)
        self.duplicates += len(keep) - kept
        if kept:
            self.writer.add(DocumentBatch.of(blob, result.docs, keep), source)
        return kept

    def _first_time(self, digest: str) -> bool:
        if digest in self.seen:
            return False
        self.seen.add(digest)
        return True

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


def _input_file(task: FileTask, result: FileResult, kept: int) -> InputFile:
    return InputFile(
        path=task.source, root=task.root, size=result.bytes_read or task.size,
        sha256=result.sha256, status=result.status, reason=result.reason,
        detail=result.detail, documents=kept, malformed=result.malformed,
        malformed_records=[MalformedRecord(line=line, reason=reason)
                           for line, reason in result.malformed_records])


def _take_blob(result: FileResult) -> bytes:
    """The result's text, reading (then deleting) the spool file a helper left."""
    if result.spool is None:
        return result.blob
    expected = sum(size for _, size, _ in result.docs)
    blob = read_capped(Path(result.spool), expected, OutputError)
    os.unlink(result.spool)
    if len(blob) != expected:
        raise OutputError(f"spool file {result.spool} is {len(blob)} bytes, expected {expected}")
    return blob


