"""The server as the official `openai` client sees it: a real server on a loopback port,
driven by the unmodified `openai.OpenAI` (no retries, so every refusal is seen as sent).

The scripted chat model answers every question with CHAT_ANSWER at once, and continues
anything else with "x"; a random tiny model babbles, for the seed. A test that needs a
generation to hold its slot slows every forward pass down (`slow_tokens`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT
from fragment_llm.model.gpt import GPT
from fragment_llm.tokenizer.chat_template import Conversation, Turn, render_prompt, template_for
from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.helpers import REPO
from tests.serve.conftest import API_KEY, CHAT_ANSWER, serve_model

openai = pytest.importorskip("openai")

HI = [{"role": "user", "content": "hi"}]
SLOW_TOKEN_S = 0.05  # per forward pass with `slow_tokens`: 100 tokens take 5 s


def client_for(url: str, api_key: str = "unused-on-loopback", **options) -> openai.OpenAI:
    """What docs/serve.md tells a user to write, with retries off."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0,
                         **{"timeout": 30, **options})


@pytest.fixture(scope="module")
def server(chat_checkpoint):
    with serve_model(chat_checkpoint, max_new_tokens=64) as running:
        yield running


@pytest.fixture
def client(server):
    with client_for(server.url) as made:
        yield made


@pytest.fixture(scope="module")
def tok(chat_tokenizer) -> Tokenizer:
    return Tokenizer.load(chat_tokenizer)


def chat_prompt_tokens(tok: Tokenizer, text: str, max_tokens: int) -> int:
    """What the server counts as the prompt: the conversation as `fragment chat` renders it."""
    conversation = Conversation(turns=[Turn("user", text)])
    window = 64  # the scripted model's block size
    budget = window - min(max_tokens, window // 2)
    return len(render_prompt(conversation, template_for(SPECIAL_TOKENS_CHAT_FORMAT), tok,
                             budget))


def pool_of(running):
    return running.app.state.routes.served.pool


def wait_until_idle(running, timeout_s: float = 3.0) -> None:
    """Until no slot is busy and nobody waits; fails past `timeout_s`."""
    pool, started = pool_of(running), time.monotonic()
    while pool.busy or pool.waiting:
        assert time.monotonic() - started < timeout_s, f"busy {pool.busy}, waiting {pool.waiting}"
        time.sleep(0.01)


# ------------------------------------------------------------------------ the docs


def test_the_snippet_in_the_docs_runs_as_written(server):
    """docs/serve.md's client example, run as a user would: only the port is ours."""
    docs = (REPO / "docs" / "serve.md").read_text(encoding="utf-8")
    section = docs.split("### Pointing the openai client at it", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert "http://127.0.0.1:8000/v1" in snippet
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", snippet.replace(
        "http://127.0.0.1:8000/v1", f"{server.url}/v1")], capture_output=True, text=True,
        env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{CHAT_ANSWER}\n{CHAT_ANSWER}"


# ------------------------------------------------------------------------ models


def test_the_models_list_names_the_one_model(client):
    models = client.models.list().data
    assert [(m.id, m.object, m.owned_by) for m in models] == [("chat", "model", "fragment")]
    assert client.models.retrieve("chat").id == "chat"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


# ------------------------------------------------------------------------ chat


def test_a_chat_answer_with_its_usage(client, tok):
    reply = client.chat.completions.create(model="chat", messages=HI, max_tokens=16)
    choice = reply.choices[0]
    assert (choice.message.role, choice.message.content) == ("assistant", CHAT_ANSWER)
    assert choice.finish_reason == "stop" and choice.index == 0
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "chat" and abs(reply.created - time.time()) < 60
    assert reply.usage.completion_tokens == len(tok.encode(CHAT_ANSWER))  # <|end|> not counted
    assert reply.usage.prompt_tokens == chat_prompt_tokens(tok, "hi", 16)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_streamed_chat_is_the_same_answer_with_usage_last(client, tok):
    chunks = list(client.chat.completions.create(
        model="chat", messages=HI, max_tokens=16, stream=True,
        stream_options={"include_usage": True}))
    with_choices = [chunk for chunk in chunks if chunk.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == CHAT_ANSWER
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert sum(c.choices[0].finish_reason is not None for c in with_choices) == 1
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    *_, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == len(tok.encode(CHAT_ANSWER))
    assert last.usage.prompt_tokens == chat_prompt_tokens(tok, "hi", 16)
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_a_stream_without_include_usage_has_no_usage_and_ends_in_done(client):
    with client.chat.completions.with_streaming_response.create(
            model="chat", messages=HI, max_tokens=16, stream=True) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    assert all(line.startswith("data: {") for line in lines[:-1])
    assert not any('"usage"' in line for line in lines)
    assert response.headers["content-type"].startswith("text/event-stream")


@pytest.mark.parametrize("stop, answer", [(["well"], "I am "), ("am", "I "),
                                          (["<b>", "zzz"], "I am well ")])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences_end_the_answer_before_them(client, stop, answer, stream):
    reply = client.chat.completions.create(model="chat", messages=HI, max_tokens=16,
                                           stop=stop, stream=stream)
    if stream:
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert (text, finish) == (answer, "stop")


def test_openai_fields_we_ignore_are_accepted(client):
    """docs/serve.md lists them; a program that sends them works unchanged."""
    reply = client.chat.completions.create(
        model="chat", messages=[{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        max_completion_tokens=16, presence_penalty=1.5, frequency_penalty=-1.0,
        logit_bias={"5": 100}, user="user-1234", logprobs=False, store=False,
        metadata={"run": "test"}, response_format={"type": "text"}, n=1, temperature=0,
        top_p=1.0, parallel_tool_calls=False, service_tier="auto",
        extra_body={"top_k": 4, "repetition_penalty": 1.0})
    assert reply.choices[0].message.content == CHAT_ANSWER


# ------------------------------------------------------------------------ completions


def test_a_completion_whole_and_streamed(client, tok):
    whole = client.completions.create(model="chat", prompt="hello", max_tokens=5)
    choice = whole.choices[0]
    assert (choice.text, choice.finish_reason) == ("xxxxx", "length")
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.usage.prompt_tokens == 1 + len(tok.encode("hello"))  # after <|endoftext|>
    assert whole.usage.completion_tokens == 5
    chunks = list(client.completions.create(model="chat", prompt="hello", max_tokens=5,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "xxxxx"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    echoed = client.completions.create(model="chat", prompt=["hello"], max_tokens=2, echo=True)
    assert echoed.choices[0].text == "helloxx"


def test_the_same_seed_gives_the_same_text(checkpoint):
    with serve_model(checkpoint, max_new_tokens=32) as babbler, client_for(babbler.url) as client:
        model = client.models.list().data[0].id

        def text(seed: int, stream: bool = False) -> str:
            reply = client.completions.create(model=model, prompt="ROMEO:", max_tokens=24,
                                              temperature=1.0, seed=seed, stream=stream)
            if stream:
                return "".join(chunk.choices[0].text for chunk in reply)
            return reply.choices[0].text

        first = text(7)
        assert text(7) == first and text(7, stream=True) == first
        assert len({text(seed) for seed in range(4)}) > 1  # the seed does choose


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_that_writes_terminal_escapes_sends_none(hostile_checkpoint, stream):
    """A client may print what it gets: the model's `ok`, then a screen clear and an OSC
    title (`ESC[2J`, C1 `0;pwned` BEL), over and over: the sequences go, whole."""
    with serve_model(hostile_checkpoint, max_new_tokens=40) as running, \
            client_for(running.url) as client:
        reply = client.completions.create(model=client.models.list().data[0].id, prompt="hi",
                                          max_tokens=40, temperature=0, stream=stream)
        text = ("".join(chunk.choices[0].text for chunk in reply) if stream
                else reply.choices[0].text)
    assert text.startswith("okok") and text.replace("ok", "") == "", repr(text)


@pytest.fixture
def broken_model(monkeypatch):
    """Every forward pass of every model gives NaN logits, as a broken checkpoint would."""
    forward = GPT.forward

    def nan_forward(self, *args, **kwargs):
        return forward(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(GPT, "forward", nan_forward)


def test_a_model_that_fails_is_a_500_without_detail(chat_checkpoint, broken_model, capfd):
    with serve_model(chat_checkpoint, max_new_tokens=16) as running, \
            client_for(running.url) as client:
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="chat", messages=HI)
        assert failed.value.status_code == 500 and failed.value.code == "model_error"
        assert "not finite" in failed.value.body["message"]
        with pytest.raises(openai.APIError) as mid_stream:  # an error event, then [DONE]
            list(client.chat.completions.create(model="chat", messages=HI, stream=True))
        assert "not finite" in mid_stream.value.message
        wait_until_idle(running)
    output = capfd.readouterr()
    assert "Traceback" not in output.err + output.out


# ------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("options, param, words", [
    ({"temperature": 3.0}, "temperature", "less than or equal to 2"),
    ({"top_p": 0.0}, "top_p", "greater than 0"),
    ({"n": 2}, "n", "less than or equal to 1"),
    ({"max_tokens": 65}, "max_tokens", "over this server's cap of 64"),
    ({"max_completion_tokens": 1000}, "max_completion_tokens", "cap of 64"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"seed": -1}, "seed", "greater than or equal to 0"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "'system'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "must be the user's"),
    ({"extra_body": {"temprature": 0.5}}, "temprature", "unrecognized request argument"),
    ({"extra_body": {"temperature": "1"}}, "temperature", "valid number"),
])
def test_a_field_out_of_range_is_a_400_naming_it(client, options, param, words):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{"model": "chat", "messages": HI, **options})
    message = refused.value.body["message"]
    assert refused.value.status_code == 400 and refused.value.param == param
    assert message.startswith(param) and words in message



@pytest.mark.parametrize("stream", [False, True])
def test_a_single_stop_string_may_be_longer_than_four_characters(client, stream):
    reply = client.chat.completions.create(model="chat", messages=HI, max_tokens=16,
                                           stop="well <b>", stream=stream)
    text = ("".join(c.choices[0].delta.content or "" for c in reply) if stream
            else reply.choices[0].message.content)
    assert text == "I am "


@pytest.mark.parametrize("options, param", [
    ({"stop": [""]}, "stop.0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                 "image_url": {"url": "http://a"}}]}]},
     "messages.0.content.0.type"),
])
def test_a_wrong_item_of_a_list_field_is_named_by_its_index(client, options, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{"model": "chat", "messages": HI, **options})
    assert refused.value.param == param

def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert refused.value.param == "model" and "'chat'" in refused.value.body["message"]


def test_an_oversized_body_is_a_413(client):
    big = [{"role": "user", "content": "a" * (1024 * 1024)}]
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="chat", messages=big)
    assert refused.value.status_code == 413 and refused.value.code == "request_too_large"
    assert "over 1,048,576 bytes" in refused.value.body["message"]


@pytest.fixture(scope="module")
def keyed(chat_checkpoint):
    with serve_model(chat_checkpoint, api_key=API_KEY, max_new_tokens=16) as running:
        yield running


@pytest.mark.parametrize("key", ["wrong-key-0123456789abcdef", API_KEY[:-1], API_KEY + "x",
                                 API_KEY.upper()])
def test_a_wrong_key_is_a_401(keyed, key):
    with client_for(keyed.url, api_key=key) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            client.chat.completions.create(model="chat", messages=HI)
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
        assert refused.value.response.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_no_key_is_a_401_and_the_right_key_is_served(keyed):
    with client_for(keyed.url, api_key=API_KEY) as client:
        no_key = {"Authorization": openai.Omit()}
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="chat", messages=HI, extra_headers=no_key)
        with pytest.raises(openai.AuthenticationError):
            client.models.list(extra_headers=no_key)
        # The key is checked before the body is read: no key, no megabyte read.
        big = [{"role": "user", "content": "a" * (2 * 1024 * 1024)}]
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="chat", messages=big, extra_headers=no_key)
        reply = client.chat.completions.create(model="chat", messages=HI)
        assert reply.choices[0].message.content == CHAT_ANSWER
    with urllib.request.urlopen(f"{keyed.url}/health", timeout=10) as health:  # noqa: S310
        assert health.status == 200  # /health stays open


# ------------------------------------------------------------------------ slots


@pytest.fixture
def slow_tokens(monkeypatch):
    """Every forward pass of every model takes SLOW_TOKEN_S longer (on the slot's thread),
    so that a long answer holds its slot for seconds."""
    forward = GPT.forward

    def slow_forward(self, *args, **kwargs):
        time.sleep(SLOW_TOKEN_S)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", slow_forward)


def hold_the_slot(client: openai.OpenAI):
    """A streamed completion of 100 tokens (5 s): the slot is taken once it returns."""
    stream = client.completions.create(model="chat", prompt="hello", max_tokens=100,
                                       stream=True)
    assert next(iter(stream)).choices[0].text == "x"
    return stream


def test_a_full_queue_is_a_429_with_retry_after(chat_checkpoint, slow_tokens):
    with serve_model(chat_checkpoint, slots=1, queue=0, max_new_tokens=100) as running, \
            client_for(running.url) as client:
        stream = hold_the_slot(client)
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="chat", messages=HI)
        assert time.monotonic() - started < 3.0  # refused at once, not after the 5 s
        assert refused.value.status_code == 429 and refused.value.code == "server_busy"
        assert refused.value.response.headers["retry-after"] == "1"
        stream.close()
        wait_until_idle(running)


def test_a_request_in_the_queue_is_served_when_the_slot_frees(chat_checkpoint, slow_tokens):
    with serve_model(chat_checkpoint, slots=1, queue=1, max_new_tokens=100) as running, \
            client_for(running.url) as client:
        stream = hold_the_slot(client)
        answers: list[str] = []
        queued = threading.Thread(target=lambda: answers.append(
            client.chat.completions.create(model="chat", messages=HI).choices[0].message.content))
        queued.start()
        while pool_of(running).waiting == 0:  # the second request waits for the slot
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):  # a third has no room left
            client.chat.completions.create(model="chat", messages=HI)
        stream.close()  # the first leaves: the queued one gets its slot
        queued.join(timeout=10)
        assert answers == [CHAT_ANSWER]
        wait_until_idle(running)


def test_a_client_that_leaves_mid_stream_frees_its_slot(chat_checkpoint, slow_tokens):
    with serve_model(chat_checkpoint, slots=1, queue=0, max_new_tokens=100) as running, \
            client_for(running.url) as client:
        stream = hold_the_slot(client)
        stream.close()  # after the first chunk: 99 tokens (about 5 s) were still to come
        wait_until_idle(running, timeout_s=2.5)
        started = time.monotonic()
        reply = client.chat.completions.create(model="chat", messages=HI)  # not a 429
        assert reply.choices[0].message.content == CHAT_ANSWER
        assert time.monotonic() - started < 2.5
        wait_until_idle(running)


def test_a_client_that_gives_up_waiting_frees_its_slot(chat_checkpoint, slow_tokens):
    """The same for a whole (unstreamed) answer: the client's own timeout hangs up."""
    with serve_model(chat_checkpoint, slots=1, queue=0, max_new_tokens=100) as running:
        with client_for(running.url, timeout=0.5) as impatient:
            with pytest.raises(openai.APITimeoutError):
                impatient.completions.create(model="chat", prompt="hello", max_tokens=100)
        wait_until_idle(running, timeout_s=2.5)
        with client_for(running.url) as client:
            reply = client.chat.completions.create(model="chat", messages=HI)
        assert reply.choices[0].message.content == CHAT_ANSWER


def test_back_to_back_requests_are_never_refused(chat_checkpoint):
    """One slot, no queue: a request sent as soon as the previous answer arrived finds
    the slot free: a slot is given back as soon as its generation ends."""
    with serve_model(chat_checkpoint, slots=1, queue=0, max_new_tokens=16) as running, \
            client_for(running.url) as client:
        for turn in range(30):
            if turn % 2:
                reply = client.chat.completions.create(model="chat", messages=HI)
                assert reply.choices[0].message.content == CHAT_ANSWER
            else:
                chunks = client.chat.completions.create(model="chat", messages=HI, stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in chunks) == CHAT_ANSWER
        wait_until_idle(running)


def test_a_client_that_leaves_the_queue_frees_its_place(chat_checkpoint, slow_tokens):
    """A request waiting for a slot whose client hangs up must not keep its place in the
    queue (nor take the slot when it frees) for the rest of its time limit."""
    with serve_model(chat_checkpoint, slots=1, queue=1, max_new_tokens=100) as running, \
            client_for(running.url) as client:
        stream = hold_the_slot(client)
        with client_for(running.url, timeout=0.5) as impatient:
            with pytest.raises(openai.APITimeoutError):
                impatient.chat.completions.create(model="chat", messages=HI)
        started = time.monotonic()
        while pool_of(running).waiting and time.monotonic() - started < 1.5:
            time.sleep(0.01)
        assert pool_of(running).waiting == 0  # its place is free again, while A still runs
        stream.close()
        wait_until_idle(running)


def test_the_time_limit_cuts_an_answer_with_finish_reason_length(chat_checkpoint, slow_tokens):
    with serve_model(chat_checkpoint, max_new_tokens=100, max_time_s=0.5) as running, \
            client_for(running.url) as client:
        started = time.monotonic()
        reply = client.completions.create(model="chat", prompt="hello", max_tokens=100)
        assert time.monotonic() - started < 3.0  # not the 5 s that 100 tokens take
        assert reply.choices[0].finish_reason == "length"
        assert 0 < reply.usage.completion_tokens < 100


def test_stopping_the_server_ends_answers_in_progress_cleanly(chat_checkpoint, slow_tokens,
                                                              capfd):
    """Ctrl-C while a client reads a long answer: the answer ends at once (its last chunk,
    then [DONE]) and the server exits, rather than waiting out uvicorn's grace period
    and cancelling the request with a traceback on the terminal."""
    with serve_model(chat_checkpoint, max_new_tokens=100) as running:
        client = client_for(running.url)
        stream = hold_the_slot(client)
        stopping = time.monotonic()
    stopped_in = time.monotonic() - stopping
    rest = list(stream)  # the client reads to the end: no connection error
    assert rest[-1].choices[0].finish_reason == "length" and len(rest) < 99
    client.close()
    assert stopped_in < 5.0  # (the answer ran another 5 s; a hang would never end)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "graceful shutdown exceeded" not in err, err
