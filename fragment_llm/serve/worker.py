"""A generation worker: one slot's engine in a process of its own.

`fragment serve` starts one per slot (slots.py, `ProcessSlot`), so that two answers
decode on two cores without taking turns at one interpreter lock. The worker loads the
model through the verifying loader (`load_trained`) from a step folder the server wrote
to a private temporary folder (its merged weights and tokenizer), and runs the same code
as a slot's thread would: `Engine.generate`, then `TextStream` for safe text cut at the
stop strings.

Protocol: JSON lines, never pickle. On stdin, from the server:
    {"op": "generate", "id": 7, "ids": [...], "settings": {GenerateConfig}, "stop": [...]}
    {"op": "cancel", "id": 7}          (checked between tokens; an unknown id is ignored)
On stdout, to the server (and nothing else: `print` goes to stderr):
    {"ready": true, "window": 256}     once the model is loaded
    {"id": 7, "text": "..."}           each safe piece of the answer
    {"id": 7, "outcome": {...}} or {"id": 7, "error": {"status", "message", "code"}}, last.

It lives only as long as its server: end-of-file on stdin (the server closed the pipe,
or died and the kernel closed it) ends it at once. Ctrl-C is the server's to handle, so
the worker ignores SIGINT.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.config import GenerateConfig
from fragment_llm.errors import FragmentError
from fragment_llm.inference.engine import Engine
from fragment_llm.inference.text import TextStream, special_ids, stream_text
from fragment_llm.tokenizer.tokenizer import Tokenizer

MAX_LINE_BYTES = 8 << 20  # a request's ids and settings: far below this
PROTOCOL_EXIT = 2
log = logging.getLogger("fragment.serve.worker")


class Worker:
    """Runs generate messages one at a time; a reader thread takes cancels meanwhile."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer,
                 send: Callable[[dict], None]) -> None:
        self.engine, self.tokenizer, self.send = engine, tokenizer, send
        self.jobs: queue.Queue[dict] = queue.Queue()
        self.cancelled: set[int] = set()

    def read(self, source: IO[bytes]) -> None:
        """On a thread: queue generate messages, note cancels; end the process at EOF."""
        while line := source.readline(MAX_LINE_BYTES):
            try:
                message = json.loads(line)
                if message.get("op") == "cancel":
                    self.cancelled.add(int(message["id"]))
                elif message.get("op") == "generate":
                    self.jobs.put(message)
            except (ValueError, TypeError, KeyError, AttributeError):
                log.error("a message from the server is not the protocol: exiting")
                os._exit(PROTOCOL_EXIT)  # the server restarts this worker
        os._exit(0)  # the server is gone: nobody will read what this would generate

    def serve(self) -> None:
        while True:
            message = self.jobs.get()
            job_id = int(message["id"])
            try:
                self.send({"id": job_id, "outcome": self.generate(job_id, message)})
            except Exception as exc:  # noqa: BLE001  (reported, and the worker lives on)
                self.send({"id": job_id, "error": _error_document(exc)})
            finally:
                self.cancelled.discard(job_id)

    def generate(self, job_id: int, message: dict) -> dict[str, object]:
        settings = GenerateConfig.model_validate(message["settings"])
        run = self.engine.generate(message["ids"], settings,
                                   stop_ids=special_ids(self.tokenizer))
        text = TextStream(self.tokenizer, tuple(message["stop"]))
        tokens = itertools.takewhile(lambda _: job_id not in self.cancelled, run)
        for piece in stream_text(tokens, text):
            self.send({"id": job_id, "text": piece})
        stats = run.stats
        stopped = text.stopped or stats.stop_reason == "stop_id"
        return {"finish_reason": "stop" if stopped else "length",
                "stats": dataclasses.asdict(stats), "cancelled": job_id in self.cancelled}


def _error_document(exc: Exception) -> dict[str, object]:
    if isinstance(exc, FragmentError):  # e.g. a model whose output is not finite
        return {"status": 500, "message": f"the model failed: {exc.message}",
                "code": "model_error"}
    log.exception("generation failed")  # to stderr: the server's log
    return {"status": 500, "message": "internal error while generating",
            "code": "internal_error"}


def _protocol_stream() -> Callable[[dict], None]:
    """A writer of one JSON line per message on the real stdout; `sys.stdout` (and fd 1)
    become stderr, so a stray print cannot break the protocol."""
    out = os.fdopen(os.dup(1), "w", encoding="ascii", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def send(message: dict) -> None:
        line = json.dumps(message, allow_nan=False) + "\n"  # ASCII: one line per message
        with lock:
            out.write(line)
            out.flush()
    return send


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parser = argparse.ArgumentParser(description="one generation slot of fragment serve")
    parser.add_argument("step_folder", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    send = _protocol_stream()
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s worker: %(message)s")
    torch.set_num_threads(args.threads)
    trained = load_trained(args.step_folder)
    worker = Worker(Engine(trained.model), trained.tokenizer, send)
    threading.Thread(target=worker.read, args=(sys.stdin.buffer,), daemon=True,
                     name="fragment-worker-reader").start()
    send({"ready": True, "window": worker.engine.window})
    worker.serve()


if __name__ == "__main__":
    main()
