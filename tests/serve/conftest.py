"""Servers for the serve tests: the real app on a real loopback port, in a thread.

`serve_model(checkpoint, **settings)` starts one (a context manager yielding `Running`,
with `.url` and `.app`); the fixtures below are the usual ones: a tiny base model that
babbles, and a scripted chat model that answers `<|assistant|>` with CHAT_ANSWER.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fragment_llm.checkpoint.trained import load_trained  # noqa: E402
from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, ServeConfig  # noqa: E402
from fragment_llm.serve.run import Running, ServeRequest, serving_in_thread  # noqa: E402
from fragment_llm.tokenizer.tokenizer import Tokenizer  # noqa: E402
from tests.helpers import save_scripted, scripted_answer  # noqa: E402

# What the scripted chat model answers, greedily: each token once (see scripted_answer).
CHAT_ANSWER = "I am well <b>"
API_KEY = "test-key-0123456789abcdef"


@contextlib.contextmanager
def serve_model(checkpoint: Path, api_key: str | None = None,
                **settings: object) -> Iterator[Running]:
    """The server for `checkpoint` on 127.0.0.1 at a free port, with `settings` over the
    [serve] defaults (no access log)."""
    trained = load_trained(checkpoint)
    config = ServeConfig.model_validate({"port": 0, "access_log": False, **settings})
    request = ServeRequest(trained.model, trained.tokenizer,
                           trained.checkpoint.config.chat_format, checkpoint, 0, config,
                           api_key.encode() if api_key else None)
    with serving_in_thread(request) as running:
        yield running


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory, chat_tokenizer) -> Path:
    """A chat model (special tokens) that answers every question with CHAT_ANSWER. Read only."""
    model = scripted_answer(Tokenizer.load(chat_tokenizer), CHAT_ANSWER)
    return save_scripted(tmp_path_factory.mktemp("served") / "chat", model, chat_tokenizer,
                         chat_format=SPECIAL_TOKENS_CHAT_FORMAT)
