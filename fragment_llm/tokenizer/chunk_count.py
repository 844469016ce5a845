"""Counting pre-split chunks over a corpus, on this process and helper processes.

This module owns the first step of training: a stream of documents in, a Counter of
unique chunks (cut to `max_chunk_chars`) out, never holding more than a few blocks of
text. It also owns how worker processes are started (`worker_context`). It knows nothing
about merges (see `bpe.py`).

    >>> count_chunks(["the cat", "the hat"], Splitter.named("gpt4"), max_chunk_chars=8).counts
    Counter({'the': 2, ' cat': 1, ' hat': 1})
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import queue
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from multiprocessing.queues import Queue

from fragment_llm.errors import TokenizerError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.safety.signals import uninterrupted
from fragment_llm.safety.workers import die_with_parent
from fragment_llm.tokenizer.pretokenize import SplitPattern, Splitter

# Documents are counted in blocks of about this many characters, and longer documents are
# cut (at a newline where possible), so a process never holds more than a block's chunks.
BLOCK_CHARS = 1 << 19
# How much is counted here before helper processes start: forked helpers start in
# ~30 ms; a forkserver (a fresh interpreter, ~300 ms) is booted in the background while
# these characters are counted, and only for corpora of at least SLOW_START_CHARS.
INLINE_CHARS = 1 << 20
SLOW_START_CHARS = 4 << 20
HELPER_POLL_S = 0.5


@dataclass(frozen=True)
class ChunkCounts:
    """Unique pre-split chunks (cut to max_chunk_chars) with their frequencies."""

    counts: Counter[str]
    chars: int
    documents: int


def count_chunks(texts: Iterable[str], splitter: Splitter, *, max_chunk_chars: int,
                 max_chars: int | None = None, workers: int = 1, total: int | None = None,
                 progress: ProgressFn = no_progress) -> ChunkCounts:
    """Count the chunks of `texts`, stopping after `max_chars` characters.

    Counting starts here. Once `_inline_chars` characters are done, if more text follows
    and `workers` > 1, `workers - 1` helper processes join in: a block goes to a helper
    when one is free, else it is counted here, and each helper returns one Counter at the
    end. The counts are the same whichever way they were made. `total` (characters, if
    known) sizes the progress bar and decides whether helpers are worth starting.
    """
    feed = _BlockFeed(texts, max_chars)
    goal = total if max_chars is None else min(total or max_chars, max_chars)
    tally = _Tally(splitter, max_chunk_chars, progress, goal)
    context = worker_context() if workers > 1 else None
    inline = _inline_chars(context, goal)
    if inline is not None and _is_forkserver(context):
        multiprocessing.forkserver.ensure_running()  # boots while we count here
    for block in feed.blocks(stop_after=inline):
        tally.count(block)
    if context is not None:
        _count_with_helpers(feed.blocks(), tally, workers - 1, context)
    else:
        for block in feed.blocks():
            tally.count(block)
    return ChunkCounts(tally.counts, feed.chars, feed.documents)


def _inline_chars(context: multiprocessing.context.BaseContext | None,
                  goal: int | None) -> int | None:
    """Characters to count here before starting helpers (None: all, no helpers)."""
    if context is None:
        return None
    if _is_forkserver(context) and goal is not None and goal < SLOW_START_CHARS:
        return None
    return INLINE_CHARS


def _is_forkserver(context: multiprocessing.context.BaseContext | None) -> bool:
    return context is not None and context.get_start_method() == "forkserver"


def count_into(counts: Counter[str], splitter: Splitter, max_chunk_chars: int,
               texts: list[str]) -> None:
    """Add the chunks of `texts` to `counts`; chunks over `max_chunk_chars` are cut."""
    for text in texts:
        chunks = splitter.split(text)
        if chunks and max(map(len, chunks)) > max_chunk_chars:
            chunks = [piece for chunk in chunks for piece in _cut(chunk, max_chunk_chars)]
        counts.update(chunks)  # C-level counting


def count_block(splitter: Splitter, max_chunk_chars: int, texts: list[str]) -> Counter[str]:
    """`count_into` a fresh Counter."""
    counts: Counter[str] = Counter()
    count_into(counts, splitter, max_chunk_chars, texts)
    return counts


def _cut(chunk: str, size: int) -> list[str]:
    return [chunk[start:start + size] for start in range(0, len(chunk), size)]


class _Tally:
    """The running chunk counts and characters done (reported as "counting")."""

    def __init__(self, splitter: Splitter, max_chunk_chars: int, progress: ProgressFn,
                 goal: int | None) -> None:
        self.splitter = splitter
        self.max_chunk_chars = max_chunk_chars
        self.counts: Counter[str] = Counter()
        self.done = 0
        self._progress = progress
        self._goal = goal

    def count(self, block: list[str]) -> None:
        count_into(self.counts, self.splitter, self.max_chunk_chars, block)
        self.advance(sum(map(len, block)))

    def advance(self, chars: int) -> None:
        self.done += chars
        self._progress("counting", self.done, self._goal)


class _BlockFeed:
    """Documents grouped into blocks of ~BLOCK_CHARS, cut to respect `max_chars`."""

    def __init__(self, texts: Iterable[str], max_chars: int | None) -> None:
        self._texts = iter(texts)
        self._budget = max_chars
        self._pieces = self._cut_pieces()  # one generator, shared by successive blocks()
        self.chars = 0
        self.documents = 0

    def blocks(self, stop_after: int | None = None) -> Iterator[list[str]]:
        """Blocks of pieces; with `stop_after`, return once that many characters went by."""
        block: list[str] = []
        size = 0
        start = self.chars
        for piece in self._pieces:
            block.append(piece)
            size += len(piece)
            if size >= BLOCK_CHARS:
                yield block
                block, size = [], 0
                if stop_after is not None and self.chars - start >= stop_after:
                    return
        if block:
            yield block

    def _cut_pieces(self) -> Iterator[str]:
        for text in self._texts:
            if self._budget is not None and self.chars + len(text) > self._budget:
                text = text[:self._budget - self.chars]
            self.chars += len(text)
            self.documents += 1
            yield from cut_text(text, BLOCK_CHARS)
            if self._budget is not None and self.chars >= self._budget:
                return


def cut_text(text: str, size: int) -> Iterator[str]:
    """Pieces of at most `size` characters, cut after a newline where one is near the end.

    `cut_text("ab\\ncd\\nef", 4) -> "ab\\n", "cd\\n", "ef"`
    """
    start = 0
    while len(text) - start > size:
        end = text.rfind("\n", start + size // 2, start + size) + 1 or start + size
        yield text[start:end]
        start = end
    if start < len(text) or not text:
        yield text[start:]


# ---------------------------------------------------------------- helper processes


def worker_context() -> multiprocessing.context.BaseContext:
    """`fork` when this process has a single OS thread (fast: ~30 ms for a pool), else
    `forkserver` (~300 ms for the first pool).

    Forking a threaded process is unsafe (a lock held by another thread stays locked in
    the child): the CLI's progress bar runs a thread, torch runs native thread pools.
    /proc/self/task counts native threads too; elsewhere we never fork.
    """
    try:
        single_threaded = len(os.listdir("/proc/self/task")) == 1
    except OSError:
        single_threaded = False
    if single_threaded and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fragment_llm.tokenizer.chunk_count",
                                    "fragment_llm.tokenizer.bpe"])
    return context


def _count_with_helpers(blocks: Iterator[list[str]], tally: _Tally, helpers: int,
                        context: multiprocessing.context.BaseContext) -> None:
    """Count `blocks` here and on `helpers` processes (started only if blocks remain)."""
    first = next(blocks, None)
    if first is None:
        return
    with _Helpers(tally, helpers, context) as pool:
        for block in chain([first], blocks):
            if not pool.submit(block):
                tally.count(block)  # every helper is busy: count it here
            pool.drain(wait=False)
        pool.finish()


class _Helpers:
    """Helper processes fed through a bounded queue; each sends one Counter at the end.

    Messages back: ("done", chars) per block, ("counts", Counter) once, or ("error",
    (message, hint)). A helper that dies without reporting is an error, not a hang.
    """

    def __init__(self, tally: _Tally, helpers: int,
                 context: multiprocessing.context.BaseContext) -> None:
        self.tally = tally
        with uninterrupted():  # multiprocessing's constructors must not be split by a signal
            # Bounded, so the corpus is never read ahead of the helpers.
            self.tasks: Queue[list[str] | None] = context.Queue(maxsize=2 * helpers)
            self.results: Queue[tuple[str, object]] = context.Queue()
        args = (tally.splitter.spec, tally.max_chunk_chars, self.tasks, self.results)
        self.procs = [context.Process(target=_helper_main, args=args, daemon=True)
                      for _ in range(helpers)]
        self.finished = 0

    def __enter__(self) -> _Helpers:
        with uninterrupted():  # a helper started but not yet tracked would outlive us
            for proc in self.procs:
                proc.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # After an error, blocks may sit unsent in the queue: never wait to flush them.
        self.tasks.cancel_join_thread()
        self.tasks.close()
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        self.results.close()

    def submit(self, block: list[str]) -> bool:
        try:
            self.tasks.put_nowait(block)
        except queue.Full:
            return False
        return True

    def finish(self) -> None:
        """Tell every helper to stop, then merge their counts."""
        for _ in self.procs:
            while True:
                try:
                    self.tasks.put(None, timeout=HELPER_POLL_S)
                    break
                except queue.Full:  # a full queue: keep merging while helpers catch up
                    self.drain(wait=False)
                    self._check_alive()
        self.drain(wait=True)

    def drain(self, wait: bool) -> None:
        """Apply waiting messages; with `wait`, until every helper has sent its counts."""
        while not (wait and self.finished == len(self.procs)):
            if self._poll(HELPER_POLL_S if wait else None):
                continue
            if not wait:
                return
            self._check_alive()

    def _poll(self, timeout: float | None) -> bool:
        """Apply one message, if one arrives in time."""
        try:
            kind, payload = (self.results.get(timeout=timeout) if timeout
                             else self.results.get_nowait())
        except queue.Empty:
            return False
        if kind == "error":
            raise TokenizerError(payload[0], hint=payload[1])
        if kind == "done":
            self.tally.advance(payload)
        else:
            self.tally.counts.update(payload)
            self.finished += 1
        return True

    def _check_alive(self) -> None:
        """A helper that exited without sending its counts died (killed, out of memory)."""
        dead = sum(not proc.is_alive() for proc in self.procs)
        if dead > self.finished and not self._poll(HELPER_POLL_S):
            raise TokenizerError("a counting worker process died (out of memory?)",
                                 hint="retry with --workers 1")


def _helper_main(spec: SplitPattern, max_chunk_chars: int, tasks: Queue[list[str] | None],
                 results: Queue[tuple[str, object]]) -> None:
    """A helper process: count blocks until told to stop, then send its Counter once."""
    die_with_parent()
    try:
        splitter = Splitter(spec)  # the parent validated the pattern
        counts: Counter[str] = Counter()
        while (block := tasks.get()) is not None:
            count_into(counts, splitter, max_chunk_chars, block)
            results.put(("done", sum(map(len, block))))
        results.put(("counts", counts))
    except Exception as exc:  # sent to the parent, which raises it
        results.put(("error", (getattr(exc, "message", str(exc)), getattr(exc, "hint", None))))
