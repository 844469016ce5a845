"""The OpenAI wire format: requests validated field by field, responses built with the
fields the official `openai` client reads.

Requests are strict: a number must be a number (`"temperature": "1"` is refused), every
range is checked, and a key that is neither implemented nor one of OpenAI's documented
fields we accept and ignore (`IGNORED_FIELDS`, listed in docs/serve.md) is refused, so a
typo (`"temprature"`) is a 400 naming it, not a silently different answer. A refusal
names the field as a dotted path in the error's `param` (`messages.2.role`).

Responses: `chat.completion` / `chat.completion.chunk` and `text_completion`, with `id`,
`object`, `created`, `model`, `choices[].message|delta|text`, `finish_reason` and `usage`.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from fragment_llm.serve.errors import ApiError

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_ID_CHARS = 256

# OpenAI request fields that change nothing here; accepted so existing programs work.
IGNORED_FIELDS = frozenset({
    "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
    "user", "response_format", "tools", "tool_choice", "parallel_tool_calls", "functions",
    "function_call", "metadata", "store", "service_tier", "modalities", "audio",
    "prediction", "reasoning_effort", "web_search_options", "safety_identifier",
    "prompt_cache_key", "verbosity", "suffix",
})

FinishReason = Literal["stop", "length"]


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The count caps the list only: on the whole union it capped one string at 4 characters.
    stop: str | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                          Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    # Not OpenAI's, but what this server's sampler offers (llama.cpp and vLLM take them).
    top_k: int | None = Field(None, ge=1, le=1 << 20)
    repetition_penalty: float | None = Field(None, ge=1.0, le=10.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: object) -> object:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if key not in IGNORED_FIELDS}
        return data

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            if not 1 <= len(self.stop) <= MAX_STOP_CHARS:
                raise ApiError(400, f"stop: a stop string must be 1 to {MAX_STOP_CHARS} "
                                    f"characters", param="stop")
            return (self.stop,)
        return tuple(self.stop)


class StreamOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message; `name` and the fields an assistant reply carries back
    (`refusal`, `annotations`) are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"prompt: a list of {len(self.prompt)} prompts; this server "
                                f"answers one prompt per request", param="prompt")
        return self.prompt[0]


_Request.model_rebuild()
R = TypeVar("R", "ChatRequest", "CompletionRequest")
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


def validated(request_type: type[R], data: object) -> R:
    """`data` as a `request_type`, or ApiError 400 naming the first field at fault."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return request_type.model_validate(data)
    except ValidationError as exc:
        error = _most_specific(exc.errors(include_input=False, include_url=False))
        # (Past the first part: a top-level key named `str` is a key, not a union member.)
        where = ".".join(str(part) for index, part in enumerate(error["loc"])
                         if index == 0 or not _UNION_MEMBER.match(str(part))) or "body"
        if error["type"] == "extra_forbidden":
            raise ApiError(400, f"{where}: unrecognized request argument", param=where
                           ) from None
        raise ApiError(400, f"{where}: {error['msg']}", param=where) from None


# pydantic names the member of a union a value failed in its location
# (`stop.list[constrained-str].0`); a client knows the field as `stop.0`.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|(list|dict|tuple)\[.*\])$")


def _most_specific(errors: list[ErrorDetails]) -> ErrorDetails:
    """The error that goes deepest into the value, and of those one where the value had
    the right type: for `"stop": [""]` the list's first item is too short, for five stop
    strings the list is too long, rather than "stop: not a string" from the union's
    other member."""
    return max(errors, key=lambda error: (len(error["loc"]),
                                          not error["type"].endswith("_type")))


# ------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(response_id: str, model: str, text: str, finish_reason: FinishReason,
                    token_usage: dict[str, int]) -> dict[str, object]:
    return {"id": response_id, "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": token_usage}


def chat_chunk(response_id: str, model: str, delta: dict[str, str],
               finish_reason: FinishReason | None = None) -> dict[str, object]:
    return {"id": response_id, "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def text_completion(response_id: str, model: str, text: str,
                    finish_reason: FinishReason | None,
                    token_usage: dict[str, int] | None = None) -> dict[str, object]:
    """A whole `text_completion`, or one streamed piece of it (no usage)."""
    body: dict[str, object] = {
        "id": response_id, "object": "text_completion", "created": int(time.time()),
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "text": text, "logprobs": None,
                     "finish_reason": finish_reason}]}
    if token_usage is not None:
        body["usage"] = token_usage
    return body


def usage_chunk(response_id: str, model: str, obj: str,
                token_usage: dict[str, int]) -> dict[str, object]:
    """The last streamed chunk when `stream_options.include_usage`: no choices."""
    return {"id": response_id, "object": obj, "created": int(time.time()), "model": model,
            "choices": [], "usage": token_usage}


def model_list(model_id: str, created: int) -> dict[str, object]:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                        "owned_by": "fragment"}]}
