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

import pytest
import torch

from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.config import GenerateConfig, ServeConfig
from fragment_llm.finetune.adapters import merge_adapters
from fragment_llm.finetune.artifact import load_tuned
from fragment_llm.inference.text import complete
from fragment_llm.serve import slots
from fragment_llm.serve.errors import ApiError
from fragment_llm.serve.run import ServeRequest, serving_in_thread
from fragment_llm.serve.slots import Job, Outcome, ProcessSlot, Prompt, SlotPool, WorkerError
from tests.helpers import save_untrained_adapter

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


def test_worker_dies_with_a_killed_server(checkpoint, tmp_path):
    # TMPDIR: a killed server cannot remove its copy of the weights; let it land here.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
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


# ------------------------------------------------------- workers that misbehave

# A stand-in worker (no torch: it starts in milliseconds) that says it is ready, then
# answers each generate message as `mode` says: "hang" sends one piece of text and then
# ignores everything, cancels included; "garble" writes a line that is not JSON; "once"
# exits, and never starts again (it leaves a mark in the folder given after the mode).
_FAKE_WORKER = """
import json, os, sys, time
mode = sys.argv[1]
if mode == "never-ready":
    time.sleep(60)
if mode == "exit" or mode == "once" and os.path.exists(sys.argv[2] + "/started"):
    sys.exit(3)
if mode == "once":
    open(sys.argv[2] + "/started", "w").close()
print(json.dumps({"ready": True, "window": 64}), flush=True)
for line in sys.stdin:
    message = json.loads(line)
    if message["op"] != "generate":
        continue
    if mode == "hang":
        print(json.dumps({"id": message["id"], "text": "a"}), flush=True)
        time.sleep(60)
    if mode == "garble":
        print("Traceback (most recent call last):", flush=True)
    if mode == "once":
        sys.exit(3)
"""


def fake_slot(mode: str, *args: str) -> ProcessSlot:
    return ProcessSlot([sys.executable, "-c", _FAKE_WORKER, mode, *args])


async def run_on(slot: ProcessSlot, prompt: Prompt, act=None) -> tuple[list, Exception | None]:
    """Start a job on `slot`, `act(job)` after its first event; its events and error."""
    released = asyncio.Event()
    job = Job(asyncio.get_running_loop())
    slot.start(job, prompt, on_done=released.set)
    events: list[str | Outcome] = []
    try:
        async for event in job.events():
            if act and not events:
                act(job)
            events.append(event)
    except ApiError as exc:
        await asyncio.wait_for(released.wait(), 10)  # the slot comes back, restarted
        return events, exc
    return events, None


def fake_prompt(max_time_s: float = 30.0) -> Prompt:
    return Prompt([1, 2, 3], settings(max_new_tokens=8, max_time_s=max_time_s), ())


@pytest.fixture
def short_graces(monkeypatch):
    monkeypatch.setattr(slots, "CANCEL_GRACE_S", 0.2)
    monkeypatch.setattr(slots, "OVERDUE_GRACE_S", 0.2)


def test_a_worker_that_ignores_a_cancel_is_killed_and_restarted(short_graces):
    slot = fake_slot("hang")
    slot.wait_ready(time.monotonic() + 10)
    first = slot.process.pid
    try:
        events, error = asyncio.run(asyncio.wait_for(run_on(slot, fake_prompt(), Job.cancel),
                                                     20))
        assert events == ["a"] and isinstance(error, ApiError)
        assert error.body()["error"]["code"] == "cancelled"
        assert slot.process.pid != first and not alive(first) and not slot.dead
    finally:
        slot.close()


def test_a_worker_past_the_deadline_is_killed_and_the_request_gets_503(short_graces):
    slot = fake_slot("hang")
    slot.wait_ready(time.monotonic() + 10)
    try:
        events, error = asyncio.run(asyncio.wait_for(run_on(slot, fake_prompt(0.3)), 20))
        assert events == ["a"] and isinstance(error, ApiError) and error.status == 503
        assert error.body()["error"]["code"] == "timeout"
    finally:
        slot.close()


def test_a_worker_that_breaks_the_protocol_is_restarted_and_its_request_fails():
    slot = fake_slot("garble")
    slot.wait_ready(time.monotonic() + 10)
    first = slot.process.pid
    try:
        events, error = asyncio.run(asyncio.wait_for(run_on(slot, fake_prompt()), 20))
        assert events == [] and isinstance(error, ApiError) and error.status == 500
        assert error.body()["error"]["code"] == "worker_crashed"
        assert "Traceback" not in error.body()["error"]["message"]
        assert slot.process.pid != first
    finally:
        slot.close()


@pytest.mark.parametrize("mode", ["exit", "never-ready"])
def test_a_worker_that_does_not_start_is_one_line(mode):
    slot = fake_slot(mode)
    with pytest.raises(WorkerError, match="a generation worker did not start") as caught:
        slot.wait_ready(time.monotonic() + 1)
    slot.close()
    assert "\n" not in str(caught.value.message) and not alive(slot.process.pid)


def test_a_worker_that_cannot_restart_leaves_a_slot_that_fails_at_once(tmp_path):
    slot = fake_slot("once", str(tmp_path))
    slot.wait_ready(time.monotonic() + 10)
    try:
        async def scenario() -> tuple[Exception | None, Exception | None]:
            _, crashed = await run_on(slot, fake_prompt())
            _, refused = await asyncio.wait_for(run_on(slot, fake_prompt()), 1)
            return crashed, refused

        crashed, refused = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        slot.close()
    assert isinstance(crashed, ApiError) and crashed.body()["error"]["code"] == "worker_crashed"
    assert slot.dead
    assert isinstance(refused, ApiError) and refused.status == 503
    assert refused.body()["error"]["code"] == "worker_unavailable"


def test_a_merged_adapter_is_what_the_workers_serve(checkpoint, tmp_path):
    """`fragment serve --adapter`: the base with the adapter folded in, written for the
    workers, gives the text the merged model gives in this process (not the base's)."""
    adapter = save_untrained_adapter(tmp_path / "adapter", checkpoint)
    tuned = load_tuned(checkpoint, adapter)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B no longer zero, so merged != base
        for name, param in tuned.model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.5)
    merge_adapters(tuned.model)
    tuned.model.eval()
    sampling = settings(temperature=1.0, seed=3, max_new_tokens=12)
    expected = complete(tuned.model, tuned.tokenizer, PROMPT, sampling).text
    pool = SlotPool(tuned.model, tuned.tokenizer, slots=1, queue=1, processes=True)
    ids = [tuned.tokenizer.eot_id, *tuned.tokenizer.encode(PROMPT)]

    async def answer() -> str:
        slot = await pool.acquire(time.monotonic() + 60)
        job = Job(asyncio.get_running_loop())
        pool.start(job, slot, Prompt(ids, sampling, ()))
        return "".join([event async for event in job.events() if isinstance(event, str)])

    try:
        text = asyncio.run(asyncio.wait_for(answer(), 60))
    finally:
        pool.close()
    base = load_trained(checkpoint)
    assert expected != complete(base.model, base.tokenizer, PROMPT, sampling).text
    assert expected and text == expected
