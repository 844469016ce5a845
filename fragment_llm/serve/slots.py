"""Generation slots: N answers at once, a bounded queue, and a way to stop each one.

A slot is an `Engine` (its own KV cache; all share the model's weights) and a thread to
run it on. torch releases the GIL inside its kernels, so two slots decode at once on two
cores. A request takes a free slot, or waits in a queue of at most `queue` requests;
past that it is refused at once (`Busy`, 429 with Retry-After) rather than piling up.
Waiting counts against the request's deadline.

The tokens are produced on the slot's thread and handed to the event loop one safe piece
of text at a time (`Job.events`). A job stops when its answer ends, its deadline passes,
or `Job.cancel()` is called (a client that went away); its slot is free again only when
its thread has actually stopped, so a slot is never shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fragment_llm.config import GenerateConfig
from fragment_llm.errors import FragmentError
from fragment_llm.inference.engine import Engine, GenerationStats
from fragment_llm.inference.text import TextStream, special_ids, stream_text
from fragment_llm.model.gpt import GPT
from fragment_llm.serve.errors import ApiError
from fragment_llm.tokenizer.tokenizer import Tokenizer

log = logging.getLogger("fragment.serve")


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

    def cancel(self) -> None:
        self._cancelled.set()

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


class SlotPool:
    """`slots` engines over one model, handed out one request at a time.

    Use from the event loop only: `async with pool.slot(deadline) as engine`, then
    `pool.start(job, engine, ...)`. The engine returns to the pool when the job's thread
    finishes, not when the request handler leaves.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, slots: int, queue: int,
                 retry_after_s: int = 1) -> None:
        self.tokenizer = tokenizer
        self.size, self.queue_limit, self.retry_after_s = slots, queue, retry_after_s
        self._engines = [Engine(model) for _ in range(slots)]
        self._free: asyncio.Queue[Engine] | None = None  # made on the loop, on first use
        self._threads = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="slot")
        self.waiting = 0
        self.busy = 0

    @property
    def window(self) -> int:
        return self._engines[0].window

    def _queue(self) -> asyncio.Queue[Engine]:
        if self._free is None:
            self._free = asyncio.Queue()
            for engine in self._engines:
                self._free.put_nowait(engine)
        return self._free

    async def acquire(self, deadline: float) -> Engine:
        """A free engine; Busy if none is free and the queue is full, ApiError 503 if
        none came free before `deadline` (time.monotonic())."""
        free = self._queue()
        if free.empty() and self.waiting >= self.queue_limit:
            raise Busy(self.retry_after_s)
        self.waiting += 1
        try:
            engine = await asyncio.wait_for(free.get(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ApiError(503, "no generation slot came free before the request's time "
                                "limit; retry later", code="timeout",
                           headers={"Retry-After": str(self.retry_after_s)}) from None
        finally:
            self.waiting -= 1
        self.busy += 1
        return engine

    def start(self, job: Job, engine: Engine, prompt: Prompt) -> None:
        """Run `job` on `engine`'s thread; the engine is freed when the thread is done."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._threads, job.run, engine, self.tokenizer, prompt)
        future.add_done_callback(lambda _: self._release(engine))

    def release_unused(self, engine: Engine) -> None:
        """Give back an engine that no job was started on."""
        self._release(engine)

    def _release(self, engine: Engine) -> None:
        self.busy -= 1
        self._queue().put_nowait(engine)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
