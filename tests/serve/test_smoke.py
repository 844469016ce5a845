"""The server answers through a real socket: models, a chat answer, a stream."""

from __future__ import annotations

import json
import urllib.request

from tests.serve.conftest import CHAT_ANSWER, serve_model


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (loopback)
        return json.load(response)


def test_chat_answer_through_a_socket(chat_checkpoint):
    with serve_model(chat_checkpoint) as server:
        body = post(f"{server.url}/v1/chat/completions",
                    {"model": "chat", "messages": [{"role": "user", "content": "hi"}]})
    assert body["choices"][0]["message"]["content"] == CHAT_ANSWER
    assert body["choices"][0]["finish_reason"] == "stop"
