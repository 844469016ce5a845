"""`fragment serve` against hostile HTTP, sent as raw bytes so nothing normalises it.

One keyed server (with one CORS origin and a 64 KiB body cap) answers most tests; every
reply is checked for the security headers and for anything a response must never
carry (a traceback, a file path, an exception's text). Slow clients are cut off after
deadlines shortened for the test (the defaults are 10 s).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from fragment_llm.model.gpt import GPT
from fragment_llm.serve import app as app_module
from fragment_llm.serve import connection as connection_module
from fragment_llm.serve import guard
from fragment_llm.serve.connection import GuardedH11Protocol
from fragment_llm.serve.protocol import IGNORED_FIELDS
from tests.serve.conftest import API_KEY, CHAT_ANSWER, serve_model

BODY_CAP = 64 * 1024
ORIGIN = "https://app.example"
MODEL = "chat"
USER = [{"role": "user", "content": "hi"}]
SECRET = "zq-SECRET-71"  # request text that must never reach a log or an error
# What no response body may contain: a traceback, a source file, a path on this machine.
LEAKS = ("Traceback", 'File "', ".py", "/tmp", "/work", "/home", "RuntimeError", SECRET)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict:
        """The OpenAI error object, checked for its shape."""
        error = json.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and "\n" not in error["message"]
        return error


@dataclass
class Server:
    host: str
    port: int

    @property
    def host_header(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)


def server_of(url: str) -> Server:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return Server(host, int(port))


@pytest.fixture(scope="module")
def server(chat_checkpoint) -> Iterator[Server]:
    with serve_model(chat_checkpoint, api_key=API_KEY, cors_origins=[ORIGIN],
                     max_body_bytes=BODY_CAP) as running:
        yield server_of(running.url)


@pytest.fixture(scope="module")
def open_server(chat_checkpoint) -> Iterator[Server]:
    """No key, no CORS origin, the access log on (the default)."""
    with serve_model(chat_checkpoint, access_log=True) as running:
        yield server_of(running.url)


def request_bytes(server: Server, method: str, path: str, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request: Host, the key, JSON, its length, then `headers` over those
    (a value None leaves that header out)."""
    fields: dict[str, str | None] = {
        "Host": server.host_header, "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/json", "Content-Length": str(len(body)),
        "Connection": "close"}
    fields.update(headers or {})
    lines = [f"{method} {path} HTTP/1.1"] + [f"{name}: {value}" for name, value
                                              in fields.items() if value is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Replies:
    """Responses read one after another from one connection (http.client buffers what
    it reads, so each response must come from the same buffered file)."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = KeptOpen(socket.SocketIO(sock, "rb"))

    def makefile(self, mode: str) -> io.BufferedReader:
        return self.file


class KeptOpen(io.BufferedReader):
    def close(self) -> None:  # each response closes its file when it is read
        pass


def read_reply(sock: socket.socket | Replies) -> Reply:
    response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
    response.begin()
    reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                  response.read())
    assert_hardened(reply)
    return reply


def exchange(server: Server, data: bytes) -> Reply:
    with server.connect() as sock:
        sock.sendall(data)
        return read_reply(sock)


def send(server: Server, method: str, path: str, body: bytes = b"", **headers: str) -> Reply:
    return exchange(server, request_bytes(server, method, path, body,
                                          {k.replace("_", "-"): v for k, v in headers.items()}))


def post(server: Server, path: str, payload: object, **headers: str) -> Reply:
    return send(server, "POST", path, json.dumps(payload).encode(), **headers)


def chat(server: Server, headers: dict[str, str | None] | None = None, **fields: object) -> Reply:
    """A chat request with `fields` over a valid one."""
    body = json.dumps({"model": MODEL, "messages": USER, **fields}).encode()
    return exchange(server, request_bytes(server, "POST", "/v1/chat/completions", body, headers))


def assert_hardened(reply: Reply) -> None:
    """The security headers, no server banner, and nothing leaked in the body."""
    for name, value in guard.COMMON_HEADERS.items():
        assert reply.headers.get(name) == value, name
    assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
    assert "server" not in reply.headers
    text = reply.body.decode("utf-8", "replace")
    for leak in LEAKS:
        assert leak not in text, leak


def assert_refused(reply: Reply, status: int, param: str | None, words: str = "") -> None:
    assert reply.status == status, reply.body
    error = reply.error()
    assert error["param"] == param
    assert words in error["message"]


# ----------------------------------------------------------------------- the body


def test_a_body_over_the_cap_is_refused_from_its_content_length_unread(server):
    with server.connect() as sock:
        sock.sendall(request_bytes(server, "POST", "/v1/chat/completions",
                                   headers={"Content-Length": str(BODY_CAP + 1)}))
        reply = read_reply(sock)  # sent before a byte of the body
    assert_refused(reply, 413, None, f"over {BODY_CAP:,} bytes")
    assert reply.error()["code"] == "request_too_large"


@pytest.mark.parametrize("connection", [None, "close"])
def test_the_413_reaches_a_client_that_sends_its_whole_body_first(server, connection):
    # As urllib does (with `Connection: close`): the whole 4 MiB body, then read. Closing
    # with the body unread sends a reset, which destroyed the 413 before it was read.
    body = b"x" * (4 << 20)
    with server.connect() as sock:
        sock.sendall(request_bytes(server, "POST", "/v1/chat/completions", body,
                                   {"Connection": connection}))
        assert_refused(read_reply(sock), 413, None, "over")


def test_a_body_that_ends_after_an_early_answer_leaves_the_connection_usable(server):
    # A 401 sent before the body arrives (as the openai client's requests can be): the
    # body is read and dropped, and the kept-alive connection serves the next request.
    body = json.dumps({"model": MODEL, "messages": USER}).encode()
    with server.connect() as sock:
        replies = Replies(sock)
        sock.sendall(request_bytes(server, "POST", "/v1/chat/completions", body,
                                   {"Authorization": "Bearer wrong", "Connection": None})
                     [:-len(body)])
        assert_refused(read_reply(replies), 401, None, "API key")
        sock.sendall(body + request_bytes(server, "POST", "/v1/chat/completions", body,
                                          {"Connection": None}))
        assert read_reply(replies).status == 200


@pytest.mark.parametrize("connection", [None, "close"])
def test_a_chunked_body_without_end_is_cut_at_the_cap(server, connection, monkeypatch):
    monkeypatch.setattr(connection_module, "LINGER_S", 0.3)
    chunk = b"[" * 4096
    sent = 0
    with server.connect() as sock:
        sock.sendall(request_bytes(server, "POST", "/v1/chat/completions",
                                   headers={"Content-Length": None, "Connection": connection,
                                            "Transfer-Encoding": "chunked"}))
        # Send chunks (2 MB/s) until the server answers (it never gets a last chunk).
        while not select.select([sock], [], [], 0.002)[0]:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            assert sent < 16 * BODY_CAP, "no answer after 16 caps"
        reply = read_reply(sock)
        assert_refused(reply, 413, None, "over")
        # The rest is read and dropped for a moment (LINGER_S), then the connection
        # ends, however much more the client sends.
        started = time.monotonic()
        with pytest.raises(OSError):
            while time.monotonic() - started < 10:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                time.sleep(0.001)
    assert time.monotonic() - started < 5


def test_a_content_length_that_lies_short_leaves_garbage_refused_as_not_http(server):
    body = json.dumps({"model": MODEL, "messages": USER}).encode()
    with server.connect() as sock:
        sock.sendall(request_bytes(server, "POST", "/v1/chat/completions", body + b"\r\n\r\n",
                                   {"Content-Length": "10", "Connection": "keep-alive"}))
        replies = Replies(sock)
        assert_refused(read_reply(replies), 400, None, "not valid JSON")
        rest = read_reply(replies)  # the body's tail, read as the next request
    assert_refused(rest, 400, None, "not valid HTTP/1.1")


def test_a_content_length_that_is_not_a_number_is_refused(server):
    reply = exchange(server, request_bytes(server, "POST", "/v1/chat/completions", b"{}",
                                           {"Content-Length": "2, 2"}))
    assert reply.status == 400


@pytest.mark.parametrize("body, words", [
    (b"", "empty"),
    (b'{"model": "\xff\xfe"}', "not valid UTF-8"),
    (b'{"model": "chat", "temperature": NaN}', "non-standard JSON constant NaN"),
    (b'{"model": "chat", "temperature": Infinity}', "non-standard JSON constant Infinity"),
    (b'{"model": "chat", "model": "other"}', "duplicate key 'model'"),
    (b'[{"model": "chat"}]', "must be a JSON object"),
    (b'"chat"', "must be a JSON object"),
    (b'{"model": "chat", ', "not valid JSON"),
    (b'{"model": "chat", "x": ' + b"[" * 17 + b"]" * 17 + b"}", "18 levels deep; the limit is 16"),
    (b"[" * 60_000, "60,000 levels deep; the limit is 16 (max_json_depth)"),
])
def test_bodies_that_are_not_one_json_object_are_400s(server, body, words):
    assert_refused(send(server, "POST", "/v1/chat/completions", body), 400, None, words)


def test_a_megabyte_of_escaped_quotes_is_refused_by_size_not_by_scanning(server):
    # Under the cap: the depth scan is linear (it was quadratic: hours for a megabyte).
    body = b'{"model": "' + b'\\"' * (BODY_CAP // 2 - 8)
    started = time.monotonic()
    assert_refused(send(server, "POST", "/v1/chat/completions", body), 400, None,
                   "not valid JSON")
    assert time.monotonic() - started < 10  # generous: ~0.01 s here, minutes before


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_a_body_that_is_not_declared_json_is_415(server, content_type):
    body = json.dumps({"model": MODEL, "messages": USER}).encode()
    reply = send(server, "POST", "/v1/chat/completions", body, Content_Type=content_type)
    assert_refused(reply, 415, None, "Content-Type: application/json")


def test_a_huge_string_is_refused_naming_its_field(server):
    reply = chat(server, messages=[{"role": "user", "content": "x" * 20_000}])
    assert_refused(reply, 400, "messages.0.content", "20,000 characters; the limit is 16,000")
    assert_refused(chat(server, model="m" * 300), 400, "model", "at most 256")


# --------------------------------------------------------------------- the fields

TOO_MANY_MESSAGES = [{"role": "user", "content": "hi"}] * 257


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 257}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 2.0}, "max_tokens"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": 3}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"n": 2}, "n"), ({"n": 0}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"),
    ({"stop": "s" * 65}, "stop"), ({"stop": ["ok", ""]}, "stop.1"),
    ({"stop": ["s" * 65]}, "stop.0"),
    ({"stop": 5}, "stop"),
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"),
    ({"top_k": 0}, "top_k"), ({"repetition_penalty": 0.5}, "repetition_penalty"),
    ({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": 1}},
                                    "stream_options.include_usage"),
    ({"messages": []}, "messages"), ({"messages": TOO_MANY_MESSAGES}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [*USER, {"role": "robot", "content": "x"}]}, "messages.1.role"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [*USER, {"role": "assistant", "content": "ok"}]}, "messages"),
    ({"temprature": 0.5}, "temprature"), ({"str": 1}, "str"), ({"model": ""}, "model"),
])
def test_each_chat_field_out_of_range_is_400_naming_it(server, fields, param):
    reply = chat(server, **fields)
    assert_refused(reply, 400, param, param.partition(".")[0])
    assert reply.error()["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields, param", [
    ({"prompt": ["one", "two"]}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2]}, "prompt.0"), ({"prompt": "\x1b[2J"}, "prompt"),
    ({"best_of": 2}, "best_of"), ({"echo": "yes"}, "echo"),
])
def test_each_completion_field_out_of_range_is_400_naming_it(server, fields, param):
    reply = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", **fields})
    assert_refused(reply, 400, param, param.partition(".")[0])


@pytest.mark.parametrize("stop", ["\n\nUser:", "s" * 64, ["\n\nUser:", "s" * 64, "a", "b"]])
def test_stop_strings_up_to_their_limits_are_accepted(server, stop):
    # Four strings of up to 64 characters each, or one string alone: the count limit
    # sat on the whole field and refused a single string of more than 4 characters.
    reply = chat(server, stop=stop)
    assert reply.status == 200, reply.body
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "hi", "stop": stop,
                                            "max_tokens": 2}).status == 200


def test_an_unknown_model_is_404_naming_the_field(server):
    reply = chat(server, model="gpt-4o")
    assert_refused(reply, 404, "model", "'gpt-4o' does not exist")
    assert reply.error()["code"] == "model_not_found"


def test_the_openai_fields_we_ignore_are_accepted(server):
    ignored = {"frequency_penalty": 0.5, "presence_penalty": -0.5, "logit_bias": {"50": 10},
               "logprobs": False, "user": "someone", "response_format": {"type": "text"},
               "tools": [], "metadata": {"a": "b"}, "store": False, "service_tier": "auto",
               "parallel_tool_calls": False, "reasoning_effort": "low"}
    assert set(ignored) <= IGNORED_FIELDS
    reply = chat(server, **ignored)
    assert reply.status == 200, reply.body
    assert json.loads(reply.body)["choices"][0]["message"]["content"] == CHAT_ANSWER


def test_a_completion_echoes_the_prompt_as_sanitised_not_as_sent(server):
    reply = post(server, "/v1/completions", {"model": MODEL, "prompt": "hi\x1b[2J\x07 there",
                                              "echo": True, "max_tokens": 2})
    assert reply.status == 200, reply.body
    text = json.loads(reply.body)["choices"][0]["text"]
    assert text.startswith("hi there") and "\x1b" not in text and "\x07" not in text


# ------------------------------------------------------------------- who may ask


def test_a_wrong_or_missing_key_is_401_and_health_stays_open(server):
    for authorization in (None, "Bearer wrong-key-0123456789abcdef", f"Basic {API_KEY}",
                          f"Bearer {API_KEY}x", "Bearer", f"Bearer {API_KEY[:-1]}"):
        reply = send(server, "GET", "/v1/models", Authorization=authorization)
        assert_refused(reply, 401, None, "API key")
        assert reply.headers["www-authenticate"] == "Bearer"
        assert_refused(chat(server, {"Authorization": authorization}), 401, None, "API key")
    assert send(server, "GET", "/health", Authorization=None).status == 200
    assert send(server, "GET", "/v1/models").status == 200


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:{port}", "localhost.evil.com:{port}", "127.0.0.1.nip.io:{port}",
    "10.0.0.5:{port}", "", "localhost:{port}@evil.example", "::1", "[::1]x", "localhost:port"])
def test_a_host_header_not_naming_loopback_is_refused(server, host):
    # DNS rebinding: a page on evil.example re-points its name at 127.0.0.1.
    for path in ("/v1/models", "/health", "/"):
        reply = send(server, "GET", path, Host=host.format(port=server.port))
        assert_refused(reply, 403, None, "Host header")
        assert reply.error()["code"] == "forbidden_host"


@pytest.mark.parametrize("host", ["localhost:{port}", "LOCALHOST:{port}", "127.0.0.1",
                                  "127.0.0.2:{port}", "[::1]:{port}", "localhost.:{port}"])
def test_a_host_header_naming_loopback_is_answered(server, host):
    assert send(server, "GET", "/health", Host=host.format(port=server.port)).status == 200


def test_cors_only_for_the_named_origin(server, open_server):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = send(server, "OPTIONS", "/v1/chat/completions", **preflight)
    assert allowed.status == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    refused = send(server, "OPTIONS", "/v1/chat/completions",
                   **{**preflight, "Origin": "https://evil.example"})
    assert refused.status == 400 and "access-control-allow-origin" not in refused.headers
    answered = chat(server, {"Origin": "https://evil.example"})
    assert answered.status == 200 and "access-control-allow-origin" not in answered.headers
    assert chat(server, {"Origin": ORIGIN}).headers["access-control-allow-origin"] == ORIGIN
    # Without --cors-origin there is no CORS at all: the preflight fails, no header.
    none = send(open_server, "OPTIONS", "/v1/chat/completions", Authorization=None, **preflight)
    assert none.status == 405 and "access-control-allow-origin" not in none.headers
    plain = chat(open_server, {"Origin": ORIGIN})
    assert plain.status == 200 and "access-control-allow-origin" not in plain.headers


# --------------------------------------------------------------- every response


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/", 200), ("GET", "/chat.js", 200), ("GET", "/health", 200),
    ("GET", "/v1/models", 200), ("GET", "/v1/models/chat", 200), ("GET", "/v1/models/x", 404),
    ("GET", "/nowhere", 404), ("GET", "/../../etc/passwd", 404), ("DELETE", "/v1/models", 405),
    ("GET", "/v1/chat/completions", 405), ("POST", "/health", 405)])
def test_every_response_carries_the_security_headers(server, method, path, status):
    reply = send(server, method, path)  # read_reply checks the headers and the body
    assert reply.status == status
    if status >= 400:
        reply.error()


def test_the_page_has_its_own_content_security_policy(server):
    reply = send(server, "GET", "/")
    assert reply.headers["content-security-policy"] == guard.PAGE_POLICY
    assert "script-src 'self'" in guard.PAGE_POLICY and "unsafe" not in guard.PAGE_POLICY


def test_bytes_that_are_not_http_get_an_openai_error_with_the_headers(server):
    for garbage in (b"GET / HTTP/1.1\r\nHost: a\r\nbad header\r\n\r\n",
                    b"\x16\x03\x01\x02\x00\r\n\r\n",  # a TLS hello
                    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n"):
        assert_refused(exchange(server, garbage), 400, None, "not valid HTTP/1.1")


def test_an_internal_error_is_a_bare_500_with_the_headers_and_one_log_line(
        server, monkeypatch, caplog):
    def broken(*args: object) -> None:
        raise RuntimeError(f"failed in /work/secret/file.py on {SECRET}")

    monkeypatch.setattr(app_module, "chat_prompt", broken)
    caplog.set_level(logging.INFO, logger="fragment.serve")
    for stream in (False, True):
        reply = chat(server, messages=[{"role": "user", "content": SECRET}], stream=stream)
        assert_refused(reply, 500, None, "internal server error")
        assert reply.error() == {"message": "internal server error", "type": "server_error",
                                 "param": None, "code": "internal_error"}
    assert "internal error: RuntimeError" in caplog.text
    assert SECRET not in caplog.text and "/work/secret" not in caplog.text


def test_the_log_never_holds_the_request_text(open_server, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    asked = [{"role": "system", "content": SECRET}, {"role": "user", "content": SECRET}]
    assert chat(open_server, messages=asked).status == 200
    assert chat(open_server, messages=asked, stream=True).status == 200
    assert post(open_server, "/v1/completions", {"model": MODEL, "prompt": SECRET}).status == 200
    assert chat(open_server, messages=asked, temprature=1).status == 400
    assert chat(open_server, messages=asked, model="unknown-model").status == 404
    exchange(open_server, SECRET.encode() + b"\r\n\r\n")
    captured = capfd.readouterr()
    assert "POST /v1/chat/completions 200" in caplog.text  # the access log is on
    for text in (caplog.text, captured.out, captured.err):
        assert SECRET not in text


# ------------------------------------------------------------------ slow clients


def test_a_client_that_leaves_the_queue_gives_its_place_back(chat_checkpoint, monkeypatch):
    forward = GPT.forward

    def slow_forward(self, *args, **kwargs):  # 100 tokens: 5 s on the slot
        time.sleep(0.05)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", slow_forward)
    with serve_model(chat_checkpoint, slots=1, queue=1, max_new_tokens=100) as running:
        server, pool = server_of(running.url), running.app.state.routes.served.pool
        holder = {"model": MODEL, "prompt": "hello", "max_tokens": 100, "stream": True}
        with server.connect() as first:
            first.sendall(request_bytes(server, "POST", "/v1/completions",
                                        json.dumps(holder).encode()))
            assert read_reply_head(first) == 200  # streaming: the slot is taken
            with server.connect() as second:
                second.sendall(request_bytes(server, "POST", "/v1/chat/completions",
                                             json.dumps({"model": MODEL, "messages": USER})
                                             .encode()))
                wait_for(lambda: pool.waiting == 1)
            # The second client hung up: its place is free while the first still runs.
            wait_for(lambda: pool.waiting == 0, seconds=1.5)
            assert pool.busy == 1
        wait_for(lambda: pool.busy == 0)


def read_reply_head(sock: socket.socket) -> int:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, "never happened"
        time.sleep(0.01)


@pytest.fixture
def short_deadlines(monkeypatch):
    monkeypatch.setattr(GuardedH11Protocol, "header_timeout_s", 1.0)
    monkeypatch.setattr(app_module, "MAX_BODY_SECONDS", 1.0)


def trickle(sock: socket.socket, data: bytes, seconds: float) -> float:
    """Send `data` a byte every 0.1 s until the server answers or closes, at most
    `seconds`; how long it took."""
    started = time.monotonic()
    for byte in data:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.1)
        assert time.monotonic() - started < seconds, "never cut off"
    return time.monotonic() - started


def test_headers_sent_a_byte_at_a_time_are_cut_off_with_408(server, short_deadlines):
    endless = request_bytes(server, "GET", "/v1/models") + b"X" * 1000
    headers = endless.replace(b"\r\n\r\n", b"\r\nX-Slow: ")  # never ends
    with server.connect() as sock:
        took = trickle(sock, headers, seconds=8)
        reply = read_reply(sock)
        assert sock.recv(1) == b""  # and closed
    assert_refused(reply, 408, None, "headers did not arrive within 1 s")
    assert 0.9 < took < 4


def test_the_next_request_on_a_kept_alive_connection_has_the_same_deadline(
        server, short_deadlines):
    with server.connect() as sock:
        sock.sendall(request_bytes(server, "GET", "/health", headers={"Connection": None}))
        assert read_reply(sock).status == 200
        took = trickle(sock, b"GET /health HTTP/1.1\r\nX-Slow: " + b"x" * 1000, seconds=8)
        assert_refused(read_reply(sock), 408, None, "headers did not arrive")
    assert took < 4


def test_a_body_that_trickles_is_cut_off_with_408(server, short_deadlines):
    body = json.dumps({"model": MODEL, "messages": USER}).encode()
    with server.connect() as sock:
        sock.sendall(request_bytes(server, "POST", "/v1/chat/completions"
                                   , headers={"Content-Length": str(len(body))}))
        took = trickle(sock, body, seconds=8)
        reply = read_reply(sock)
    assert_refused(reply, 408, None, "request body did not arrive within 1 s")
    assert reply.error()["code"] == "request_timeout"
    assert 0.9 < took < 4


def test_a_content_length_that_lies_long_is_cut_off_with_408(server, short_deadlines):
    body = json.dumps({"model": MODEL, "messages": USER}).encode()
    with server.connect() as sock:
        sock.sendall(request_bytes(server, "POST", "/v1/chat/completions", body,
                                   {"Content-Length": str(len(body) + 100)}))
        started = time.monotonic()
        reply = read_reply(sock)
    assert_refused(reply, 408, None, "request body did not arrive")
    assert time.monotonic() - started < 4
