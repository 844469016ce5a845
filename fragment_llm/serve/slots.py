"""Generation slots: N answers at once, a bounded queue, and a way to stop each one.

A request takes a free slot, or waits in a queue of at most `queue` requests; past that
it is refused at once (`Busy`, 429 with Retry-After) rather than piling up. Waiting
counts against the request's deadline. A job stops when its answer ends, its deadline
passes, or `Job.cancel()` is called (a client that went away); its slot is free again
only when its generation has actually stopped, so a slot is never shared. The answer
reaches the event loop one safe piece of text at a time (`Job.events`).

A slot is one of two kinds:
- a thread (`processes=False`): an `Engine` (its own KV cache; all share the model's
  weights) run on a thread of this process. Cheap to start, but two decoding threads
  take turns at the interpreter lock between torch's kernels: 2 slots gave 1.1-1.2x one
  slot's tokens/s (docs/benchmarks.md). Tests use it; so can anything that patches the
  model in-process.
- a process (`processes=True`, what `fragment serve` runs): a `ProcessSlot`, a child
  `python -m fragment_llm.serve.worker` with its own interpreter, loading the model the
  pool wrote to a private temporary folder (through the verifying loader), talking JSON
  lines over its pipes (worker.py). Two slots decode on two cores at once. A cancel is
  a message the worker checks between tokens; a worker that does not answer one within
  `CANCEL_GRACE_S`, or runs past its deadline, is killed; a worker that dies is started
  again, and the request it was answering gets a 500 (503 past its deadline), never a
  hang. Workers end with the pool (`close`) and with this process (their stdin closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fragment_llm.config import GenerateConfig
from fragment_llm.errors import FragmentError
from fragment_llm.inference.engine import Engine, GenerationStats
from fragment_llm.inference.text import TextStream, special_ids, stream_text
from fragment_llm.model.gpt import GPT
from fragment_llm.serve.errors import ApiError
from fragment_llm.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("fragment.serve")

WORKER_READY_S = 120.0  # a worker imports torch and loads the model: seconds on a laptop
CANCEL_GRACE_S = 2.0  # a cancelled worker answers within a token; past this it is killed
OVERDUE_GRACE_S = 5.0  # past its deadline plus this, a worker's job is killed
CLOSE_GRACE_S = 2.0  # after its stdin closes, a worker exits; past this it is killed
RESTARTS = 3  # tries at starting a worker again before its slot is given up


@dataclass(frozen=True)
class Outcome:
    """How a finished job ended: `finish_reason` as OpenAI names it, and its counts."""

    finish_reason: str  # "stop" (a stop token or string) or "length" (a limit)
    stats: GenerationStats
    cancelled: bool


@dataclass(frozen=True)
class Prompt:
    """What a job generates from: ids, sampling settings (with the deadline in
    `max_time_s`), and the text that ends an answer."""

    ids: Sequence[int]
    settings: GenerateConfig
    stop_strings: tuple[str, ...]


class Job:
    """One answer being generated on a slot's thread; `events()` yields its text, then
    its `Outcome`. Stops early on `cancel()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[str | Outcome | ApiError] = asyncio.Queue()
        self._cancelled = threading.Event()
        self.on_cancel: Callable[[], None] | None = None  # a process slot's: tell the worker

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self._cancelled.set()
            if self.on_cancel is not None:
                self.on_cancel()

    async def events(self) -> AsyncIterator[str | Outcome]:
        """Text pieces as they are generated, then the Outcome; re-raises a failure."""
        while True:
            item = await self._queue.get()
            if isinstance(item, ApiError):
                raise item
            yield item
            if isinstance(item, Outcome):
                return

    # ------------------------------------------------------------ on the slot's thread

    def run(self, engine: Engine, tokenizer: Tokenizer, prompt: Prompt) -> None:
        try:
            outcome = self._generate(engine, tokenizer, prompt)
        except FragmentError as exc:  # e.g. a model whose output is not finite
            self._send(ApiError(500, f"the model failed: {exc.message}", code="model_error"))
        except Exception:  # a bug: logged here, and the client hears only that it failed
            log.exception("generation failed")
            self._send(ApiError(500, "internal error while generating", code="internal_error"))
        else:
            self._send(outcome)

    def _generate(self, engine: Engine, tokenizer: Tokenizer, prompt: Prompt) -> Outcome:
        run = engine.generate(prompt.ids, prompt.settings, stop_ids=special_ids(tokenizer))
        text = TextStream(tokenizer, prompt.stop_strings)
        tokens = itertools.takewhile(lambda _: not self._cancelled.is_set(), run)
        for piece in stream_text(tokens, text):
            self._send(piece)
        stats = run.stats
        stopped = text.stopped or stats.stop_reason == "stop_id"
        return Outcome("stop" if stopped else "length", stats, self._cancelled.is_set())

    def _send(self, item: str | Outcome | ApiError) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)


class Busy(ApiError):
    """Every slot is taken and the queue is full."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(429, "the server is busy: every generation slot is taken and the "
                              "queue is full; retry later", code="server_busy",
                         headers={"Retry-After": str(retry_after_s)})


class WorkerError(FragmentError):
    """A generation worker process did not start."""


def _unavailable() -> ApiError:
    return ApiError(503, "no generation worker is running; retry later",
                    code="worker_unavailable")


class ProcessSlot:
    """One slot whose engine runs in a worker process (worker.py), restarted if it dies.

    The event loop calls `start` and the job's cancel; a reader thread per worker turns
    its stdout lines into the job's events (through the loop) and notices its end.
    """

    def __init__(self, command: list[str]) -> None:
        self._command = command
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._job_id = 0
        self._on_done: Callable[[], None] | None = None
        self._failure: ApiError | None = None  # what the job hears if the worker is killed
        self._closing = False
        self.dead = False  # the worker could not be started again: every job fails at once
        self.window = 0
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        # Our own interpreter and module, with a path this pool made: no user input.
        return subprocess.Popen(self._command, stdin=subprocess.PIPE,  # noqa: S603
                                stdout=subprocess.PIPE, close_fds=True)

    def wait_ready(self, deadline: float) -> None:
        """Block until the worker has loaded the model (its first line), then read it on a
        thread. WorkerError if it exits or takes past `deadline` (time.monotonic())."""
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [],
                                    max(0.0, deadline - time.monotonic()))
        line = self.process.stdout.readline() if ready else b""
        try:
            self.window = int(json.loads(line)["window"])
        except (ValueError, KeyError, TypeError):
            if line:
                log.error("a generation worker's first line is not its ready message: %.200r",
                          line)
            self.process.kill()
            status = self.process.wait()
            raise WorkerError("a generation worker did not start ("
                              f"{'exit status ' + str(status) if ready else 'timed out'})",
                              hint="its error is above, in the server's log; --slots 1 "
                                   "starts fewer") from None
        threading.Thread(target=self._read, args=(self.process,), daemon=True,
                         name="fragment-slot-reader").start()

    # ------------------------------------------------------------ on the event loop

    def start(self, job: Job, prompt: Prompt, on_done: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._job_id += 1
            job_id = self._job_id
            self._job, self._on_done, self._failure = job, on_done, None
            if self.dead:
                self._finish(_unavailable())
                return
            self._write({"op": "generate", "id": job_id, "ids": list(prompt.ids),
                         "settings": prompt.settings.model_dump(mode="json"),
                         "stop": list(prompt.stop_strings)})
        job.on_cancel = lambda: self._cancel(job_id, loop)
        overdue = ApiError(503, "the answer ran past the request's time limit",
                           code="timeout")
        loop.call_later(prompt.settings.max_time_s + OVERDUE_GRACE_S, self._kill, job_id,
                        overdue)

    def _cancel(self, job_id: int, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._job_id != job_id or self._job is None:
                return
            self._write({"op": "cancel", "id": job_id})
        gone = ApiError(499, "the request was cancelled", code="cancelled")
        loop.call_later(CANCEL_GRACE_S, self._kill, job_id, gone)

    def _kill(self, job_id: int, failure: ApiError) -> None:
        """End the worker if it is still on `job_id`; the reader restarts it."""
        with self._lock:
            if self._job_id != job_id or self._job is None:
                return
            self._failure = failure
            log.warning("generation worker %d did not stop in time: killed", self.process.pid)
            self.process.kill()

    def _write(self, message: dict[str, object]) -> None:
        """One line to the worker (under the lock). A worker that died meanwhile is noticed
        by its reader, which fails the job."""
        assert self.process.stdin is not None
        with contextlib.suppress(OSError):
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            self.process.stdin.flush()

    # ------------------------------------------------------------ on the reader thread

    def _read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:  # not the protocol: a broken worker, treated as a crash
                log.error("generation worker %d wrote a line that is not JSON", process.pid)
                process.kill()
                continue
            self._dispatch(message)
        process.wait()
        self._worker_gone(process)

    def _dispatch(self, message: dict[str, object]) -> None:
        with self._lock:
            job = self._job if message.get("id") == self._job_id else None
            if job is None:  # a cancelled job's last words, or an unknown id
                return
            if "text" in message:
                job._send(str(message["text"]))
            elif "outcome" in message:
                self._finish(_outcome(message["outcome"]))
            elif "error" in message:
                error = message["error"]
                assert isinstance(error, dict)
                self._finish(ApiError(int(error["status"]), str(error["message"]),
                                      code=str(error["code"])))

    def _finish(self, last: Outcome | ApiError) -> None:
        """The job's last event, and its slot back to the pool (under the lock)."""
        job, on_done = self._job, self._on_done
        self._job, self._on_done = None, None
        if job is not None and on_done is not None:
            job._send(last)
            with contextlib.suppress(RuntimeError):  # the loop closed
                job._loop.call_soon_threadsafe(on_done)

    def _worker_gone(self, process: subprocess.Popen[bytes]) -> None:
        """The worker exited: fail its job, start another, and only then free the slot."""
        with self._lock:
            if self._closing:
                return
            job, on_done = self._job, self._on_done
            failure = self._failure or ApiError(
                500, "the generation worker stopped unexpectedly; it has been restarted",
                code="worker_crashed")
            if self._failure is None:
                log.error("generation worker %d exited with status %s; restarting it",
                          process.pid, process.returncode)
            self._job, self._on_done = None, None
            if job is not None:
                job._send(failure)
        self._restart()
        if job is not None and on_done is not None:
            with contextlib.suppress(RuntimeError):
                job._loop.call_soon_threadsafe(on_done)

    def _restart(self) -> None:
        """A new worker, tried RESTARTS times. A job started meanwhile waits for it; if
        none starts, that job fails and the slot is `dead`: every later job fails at once."""
        for attempt in range(1, RESTARTS + 1):
            with self._lock:
                if self._closing:
                    return
                self.process = self._spawn()
            try:
                self.wait_ready(time.monotonic() + WORKER_READY_S)
                return
            except WorkerError as exc:
                if attempt == RESTARTS and not self._closing:
                    log.error("%s, %d times: this slot is out of service", exc.message,
                              RESTARTS)
        with self._lock:
            self.dead = True
            self._finish(_unavailable())

    # ------------------------------------------------------------------------ ending

    def close(self) -> None:
        """Close the worker's stdin (it exits at once), then kill it if it has not."""
        with self._lock:
            self._closing = True
            with contextlib.suppress(OSError):
                assert self.process.stdin is not None
                self.process.stdin.close()
        try:
            self.process.wait(CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _outcome(document: object) -> Outcome:
    assert isinstance(document, dict)
    return Outcome(str(document["finish_reason"]), GenerationStats(**document["stats"]),
                   bool(document["cancelled"]))


def _write_served_model(model: GPT, tokenizer: Tokenizer) -> tuple[Path, Path]:
    """The model as this process holds it (adapters merged) as a step folder in a new
    private temporary folder, for the workers to load: (the folder, the step)."""
    from fragment_llm.checkpoint.save import save_checkpoint

    folder = Path(tempfile.mkdtemp(prefix="fragment-serve-"))  # mode 0700
    try:
        tokenizer.save(folder / "tokenizer.json")
        step = save_checkpoint(folder / "run", 1, model=model, optimizer=None,
                               trainer_state={"step": 1},
                               config={"model": model.config.model_dump(mode="json")},
                               tokenizer_file=folder / "tokenizer.json")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, step


Slot = Engine | ProcessSlot


class SlotPool:
    """`slots` engines over one model, handed out one request at a time: threads of this
    process, or (`processes=True`) worker processes, all started and ready on return.

    Use from the event loop only: `slot = await pool.acquire(deadline)`, then
    `pool.start(job, slot, prompt)` (or `pool.release_unused(slot)`). The slot returns to
    the pool when the job's generation has stopped, not when the request handler leaves.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, slots: int, queue: int,
                 retry_after_s: int = 1, processes: bool = False, threads: int = 1) -> None:
        self.tokenizer = tokenizer
        self.size, self.queue_limit, self.retry_after_s = slots, queue, retry_after_s
        self._folder: Path | None = None
        self._slots: list[Slot] = (self._start_workers(model, tokenizer, slots, threads)
                                   if processes else [Engine(model) for _ in range(slots)])
        self._free: asyncio.Queue[Slot] | None = None  # made on the loop, on first use
        self._threads = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="slot")
        self.waiting = 0
        self.busy = 0

    def _start_workers(self, model: GPT, tokenizer: Tokenizer, slots: int,
                       threads: int) -> list[Slot]:
        """Start every worker at once (each imports torch: they load in parallel), and
        return when all are ready."""
        self._folder, step = _write_served_model(model, tokenizer)
        command = [sys.executable, "-m", "fragment_llm.serve.worker", str(step),
                   "--threads", str(threads)]
        workers: list[ProcessSlot] = []
        try:
            workers += [ProcessSlot(command) for _ in range(slots)]
            deadline = time.monotonic() + WORKER_READY_S
            for worker in workers:
                worker.wait_ready(deadline)
        except BaseException:
            self._stop(workers)
            raise
        return list(workers)

    @property
    def window(self) -> int:
        slot = self._slots[0]
        return slot.window

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids (none for thread slots): for tests and the benchmark."""
        return [slot.process.pid for slot in self._slots if isinstance(slot, ProcessSlot)]

    def _queue(self) -> asyncio.Queue[Slot]:
        if self._free is None:
            self._free = asyncio.Queue()
            for slot in self._slots:
                self._free.put_nowait(slot)
        return self._free

    async def acquire(self, deadline: float) -> Slot:
        """A free slot; Busy if none is free and the queue is full, ApiError 503 if
        none came free before `deadline` (time.monotonic())."""
        free = self._queue()
        if free.empty() and self.waiting >= self.queue_limit:
            raise Busy(self.retry_after_s)
        self.waiting += 1
        try:
            slot = await asyncio.wait_for(free.get(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ApiError(503, "no generation slot came free before the request's time "
                                "limit; retry later", code="timeout",
                           headers={"Retry-After": str(self.retry_after_s)}) from None
        finally:
            self.waiting -= 1
        self.busy += 1
        return slot

    def start(self, job: Job, slot: Slot, prompt: Prompt) -> None:
        """Run `job` on `slot`; the slot is freed when its generation is done."""
        if isinstance(slot, ProcessSlot):
            slot.start(job, prompt, on_done=lambda: self._release(slot))
            return
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._threads, job.run, slot, self.tokenizer, prompt)
        future.add_done_callback(lambda _: self._release(slot))

    def release_unused(self, slot: Slot) -> None:
        """Give back a slot that no job was started on."""
        self._release(slot)

    def _release(self, slot: Slot) -> None:
        self.busy -= 1
        self._queue().put_nowait(slot)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._stop([slot for slot in self._slots if isinstance(slot, ProcessSlot)])

    def _stop(self, workers: list[ProcessSlot]) -> None:
        for worker in workers:
            worker.close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
