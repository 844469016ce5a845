"""Reading the input files of `fragment preprocess` on helper processes, in input order.

`result_stream(tasks, config, staging)` yields one `FileResult` per task, in task order,
whatever the number of workers. Files go to helper processes in batches of a few MB,
this process reads files too whenever the oldest result is not ready, and what is held
here stays bounded (`BYTES_IN_FLIGHT`). A helper returns a file's text through a spool
file in the staging folder; `take_blob` reads it back and removes it.

It does not read a file itself (`readers.read_input_file` does) nor decide what is kept
(`preprocess.py`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from fragment_llm.config import PreprocessConfig
from fragment_llm.data.readers import (
    FileResult,
    FileTask,
    read_batch_in_helper,
    read_input_file,
)
from fragment_llm.errors import OutputError
from fragment_llm.safety.files import read_capped
from fragment_llm.safety.signals import uninterrupted
from fragment_llm.safety.workers import die_with_parent

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


@contextlib.contextmanager
def result_stream(tasks: list[FileTask], config: PreprocessConfig, staging: Path
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
            item, size = self.pending.popleft()
            self.held -= size
            if isinstance(item, Future):
                self.submitted -= 1
                item = item.result()
            yield from item

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


def take_blob(result: FileResult) -> bytes:
    """The result's text, reading (then deleting) the spool file a helper left."""
    if result.spool is None:
        return result.blob
    expected = sum(size for _, size, _ in result.docs)
    blob = read_capped(Path(result.spool), expected, OutputError)
    os.unlink(result.spool)
    if len(blob) != expected:
        raise OutputError(f"spool file {result.spool} is {len(blob)} bytes, expected {expected}")
    return blob
