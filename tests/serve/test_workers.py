"""Slots as worker processes (serve/slots.py `ProcessSlot`, serve/worker.py): the same
text as `fragment generate`, a cancel that frees the slot, a killed worker restarted
with its request failing cleanly, and no worker left behind by a closed pool or a
killed server.

Each worker imports torch (about 2 s on a busy 2-core machine), so these tests start
one worker where one will do.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.config import GenerateConfig, ServeConfig
from fragment_llm.inference.text import complete
from fragment_llm.serve.errors import ApiError
from fragment_llm.serve.run import ServeRequest, serving_in_thread
from fragment_llm.serve.slots import Job, Outcome, Prompt, SlotPool

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The quick brown fox"


def settings(**values: object) -> GenerateConfig:
    """The sampling a completion request with `values` gets from a default server."""
    defaults = ServeConfig().model_dump(include=set(GenerateConfig.model_fields))
    return GenerateConfig.model_validate({**defaults, "stop": (), **values})


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (loopback)
        return json.load(response)


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def long_prompt(pool: SlotPool) -> Prompt:
    """A generation that runs for seconds unless stopped: the most tokens allowed, from
    a model that never samples a stop token greedily (`hostile_model`)."""
    ids = [pool.tokenizer.eot_id, *pool.tokenizer.encode(PROMPT)]
    return Prompt(ids, settings(temperature=0.0, max_new_tokens=4096, max_time_s=60.0), ())


def test_worker_answers_as_generate_would(checkpoint):
    """The same seed gives the text `fragment generate --raw` gives, whole or streamed."""
    trained = load_trained(checkpoint)
    expected = complete(trained.model, trained.tokenizer, PROMPT,
                        settings(temperature=1.0, seed=7, max_new_tokens=24)).text
    config = ServeConfig.model_validate({"port": 0, "access_log": False, "slots": 1})
    request = ServeRequest(trained.model, trained.tokenizer, None, checkpoint, 0, config,
                           None, worker_processes=True)
    body = {"model": "run", "prompt": PROMPT, "temperature": 1.0, "seed": 7, "max_tokens": 24}
    with serving_in_thread(request, ready_timeout_s=120) as server:
        assert len(server.app.state.routes.served.pool.worker_pids) == 1
        whole = post(f"{server.url}/v1/completions", body)
        streamed = urllib.request.Request(
            f"{server.url}/v1/completions", json.dumps({**body, "stream": True}).encode(),
            {"content-type": "application/json"})
        with urllib.request.urlopen(streamed, timeout=60) as response:  # noqa: S310
            chunks = [json.loads(line[6:]) for line in response
                      if line.startswith(b"data: {")]
    assert expected
    assert whole["choices"][0]["text"] == expected
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected


async def first_piece_then(pool: SlotPool, act) -> tuple[list[str | Outcome], Exception | None]:
    """Start a long job on the pool's one slot, call `act(job)` after its first piece of
    text, and collect what follows (and the error it ends with, if any)."""
    slot = await pool.acquire(time.monotonic() + 60)
    job = Job(asyncio.get_running_loop())
    pool.start(job, slot, long_prompt(pool))
    events: list[str | Outcome] = []
    try:
        async for event in job.events():
            if not events:
                act(job)
            events.append(event)
    except ApiError as exc:
        return events, exc
    return events, None


def one_worker_pool(checkpoint: Path) -> SlotPool:
    trained = load_trained(checkpoint)
    return SlotPool(trained.model, trained.tokenizer, slots=1, queue=1, processes=True)


async def answer_short(pool: SlotPool) -> Outcome:
    slot = await asyncio.wait_for(pool.acquire(time.monotonic() + 60), 60)
    job = Job(asyncio.get_running_loop())
    ids = [pool.tokenizer.eot_id, *pool.tokenizer.encode(PROMPT)]
    pool.start(job, slot, Prompt(ids, settings(temperature=0.0, max_new_tokens=5), ()))
    events = [event async for event in job.events()]
    assert isinstance(events[-1], Outcome)
    return events[-1]


def test_cancel_stops_the_worker_and_frees_the_slot(hostile_checkpoint):
    pool = one_worker_pool(hostile_checkpoint)
    try:
        pid = pool.worker_pids[0]

        async def scenario() -> tuple[list[str | Outcome], Exception | None, Outcome]:
            events, error = await first_piece_then(pool, Job.cancel)
            return events, error, await answer_short(pool)

        events, error, after = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        pool.close()
    assert error is None
    outcome = events[-1]
    assert isinstance(outcome, Outcome) and outcome.cancelled
    assert outcome.stats.new_tokens < 4096  # stopped early, between tokens
    assert after.stats.new_tokens >= 1  # the slot came free for the next request
    assert pool.worker_pids == [pid]  # it answered the cancel: nobody had to kill it


def test_killed_worker_is_restarted_and_its_request_fails_cleanly(hostile_checkpoint):
    pool = one_worker_pool(hostile_checkpoint)
    try:
        pid = pool.worker_pids[0]

        async def scenario() -> tuple[Exception | None, Outcome]:
            _, error = await first_piece_then(pool, lambda _: os.kill(pid, signal.SIGKILL))
            return error, await answer_short(pool)

        error, after = asyncio.run(asyncio.wait_for(scenario(), 90))
        restarted = pool.worker_pids
    finally:
        pool.close()
    assert isinstance(error, ApiError) and error.status == 500
    assert error.body()["error"]["code"] == "worker_crashed"
    assert restarted != [pid] and not alive(pid)
    assert after.stats.new_tokens >= 1  # the new worker answers


def test_close_leaves_no_worker(trained):
    pool = SlotPool(trained.model, trained.tokenizer, slots=2, queue=0, processes=True)
    pids = pool.worker_pids
    assert len(pids) == 2 and all(map(alive, pids))
    pool.close()
    assert not any(map(alive, pids))
    assert pool._folder is None  # the private copy of the weights is gone too


# A server process that starts a one-worker pool, says its worker's pid, then waits to
# be killed.
_SERVER = """
import sys, time
from pathlib import Path
from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.serve.slots import SlotPool
trained = load_trained(Path(sys.argv[1]))
pool = SlotPool(trained.model, trained.tokenizer, slots=1, queue=0, processes=True)
print(pool.worker_pids[0], flush=True)
time.sleep(120)
"""


def test_worker_dies_with_a_killed_server(checkpoint):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(checkpoint)],
                              stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        worker = int(server.stdout.readline())
        assert alive(worker)
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 10
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(worker)
