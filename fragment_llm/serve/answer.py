"""From a validated request to the model's answer: the prompt's ids, the sampling
settings, and the answer as one response or as server-sent events.

Chat requests are rendered exactly as `fragment chat` renders a conversation (the
checkpoint's template; special tokens for a model tuned to chat), with the same prompt
sanitising and caps, oldest turns dropped to fit the window. Completions continue the
prompt as a document, as `fragment generate --raw` does.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fragment_llm.config import GenerateConfig, ServeConfig
from fragment_llm.errors import PromptError
from fragment_llm.inference.text import check_prompt
from fragment_llm.serve import protocol
from fragment_llm.serve.errors import ApiError
from fragment_llm.serve.protocol import ChatRequest, CompletionRequest
from fragment_llm.serve.slots import Job, Outcome, Prompt, SlotPool
from fragment_llm.tokenizer.chat_template import Conversation, Turn, render_prompt, template_for
from fragment_llm.tokenizer.tokenizer import Tokenizer

Request = ChatRequest | CompletionRequest
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


@dataclass(frozen=True)
class Served:
    """The model behind the API, as the server needs it."""

    pool: SlotPool
    tokenizer: Tokenizer
    chat_format: str | None
    model_id: str
    created: int  # when the checkpoint was written (Unix time), for /v1/models
    # The jobs answers are reading now (weakly: a finished job drops out by itself), and
    # whether the server is shutting down; see `stop_all`.
    live: weakref.WeakSet[Job] = field(default_factory=weakref.WeakSet, compare=False)
    stopping: threading.Event = field(default_factory=threading.Event, compare=False)

    def stop_all(self) -> None:
        """The server is shutting down: every answer in progress, and any that a queued
        request starts from now on, ends at its next token (`finish_reason` "length"),
        so each response completes rather than being cut off mid-stream."""
        self.stopping.set()
        for job in list(self.live):
            job.cancel()


def sampling(settings: ServeConfig, request: Request, deadline: float) -> GenerateConfig:
    """The server's defaults, overridden by what the request sets; the deadline left."""
    limit = request.token_limit or settings.max_new_tokens
    if limit > settings.max_new_tokens:
        field = "max_completion_tokens" if isinstance(request, ChatRequest) and \
            request.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{field}: {limit:,} is over this server's cap of "
                            f"{settings.max_new_tokens:,}", param=field)
    values = settings.model_dump(include=set(GenerateConfig.model_fields))
    values.update({name: getattr(request, name) for name in SAMPLING_FIELDS
                   if getattr(request, name) is not None})
    values.update(max_new_tokens=limit, stop=(), max_time_s=max(0.001, deadline - time.monotonic()))
    return GenerateConfig.model_validate(values)


def chat_prompt(served: Served, settings: GenerateConfig, request: ChatRequest,
                max_messages: int) -> Prompt:
    """The conversation's ids, ending with the assistant's opening."""
    if len(request.messages) > max_messages:
        raise ApiError(400, f"messages: {len(request.messages):,} messages; this server takes "
                            f"at most {max_messages:,}", param="messages")
    conversation = Conversation()
    systems = []
    for index, message in enumerate(request.messages):
        text = _checked(served.tokenizer, settings, message.text, f"messages.{index}.content")
        if message.role in ("system", "developer"):
            systems.append(text)
        else:
            conversation.turns.append(Turn(message.role, text))
    if not conversation.turns or conversation.turns[-1].role != "user":
        raise ApiError(400, "messages: the last message that is not a system message must "
                            "be the user's", param="messages")
    conversation.system = "\n\n".join(systems) or None
    template = template_for(served.chat_format)
    window = served.pool.window
    budget = window - min(settings.max_new_tokens, window // 2)
    try:
        ids = render_prompt(conversation, template, served.tokenizer, budget)
    except PromptError as exc:
        raise ApiError(400, f"messages: {exc.message}", param="messages",
                       code="context_length_exceeded") from None
    return Prompt(ids, settings, template.stop_strings + request.stop_strings)


def completion_prompt(served: Served, settings: GenerateConfig,
                      request: CompletionRequest) -> Prompt:
    """The prompt continued as a document (after `<|endoftext|>`)."""
    text = _checked(served.tokenizer, settings, request.text, "prompt")
    if not text.strip():
        raise ApiError(400, "prompt: empty (after removing control characters)", param="prompt")
    ids = [served.tokenizer.eot_id, *served.tokenizer.encode(text)]
    return Prompt(ids, settings, request.stop_strings)


def _checked(tokenizer: Tokenizer, settings: GenerateConfig, text: str, field: str) -> str:
    try:
        return check_prompt(text, settings, tokenizer)
    except PromptError as exc:
        raise ApiError(400, f"{field}: {exc.message}", param=field) from None


# ------------------------------------------------------------------------ answering


@dataclass(frozen=True)
class Shape:
    """How one kind of answer is written: whole, as chunks, and its object names."""

    prefix: str  # of the response id
    whole: Callable[[str, str, str, str, dict[str, int]], dict[str, object]]
    piece: Callable[[str, str, str, str | None], dict[str, object]]
    first: dict[str, object] | None  # a chunk sent before any text (chat: the role)
    chunk_object: str


def _chat_piece(rid: str, model: str, text: str, finish: str | None) -> dict[str, object]:
    return protocol.chat_chunk(rid, model, {"content": text} if text else {}, finish)


def _completion_piece(rid: str, model: str, text: str, finish: str | None) -> dict[str, object]:
    return protocol.text_completion(rid, model, text, finish)


def _chat_whole(rid: str, model: str, text: str, finish: str,
                token_usage: dict[str, int]) -> dict[str, object]:
    return protocol.chat_completion(rid, model, text, finish, token_usage)


def _completion_whole(rid: str, model: str, text: str, finish: str,
                      token_usage: dict[str, int]) -> dict[str, object]:
    return protocol.text_completion(rid, model, text, finish, token_usage)


CHAT = Shape("chatcmpl", _chat_whole, _chat_piece, {"role": "assistant", "content": ""},
             "chat.completion.chunk")
COMPLETION = Shape("cmpl", _completion_whole, _completion_piece, None, "text_completion")


class Answer:
    """One request's generation on a slot: started at construction, read once, either
    whole (`collect`) or as server-sent events (`events`)."""

    def __init__(self, served: Served, job: Job, prompt: Prompt, shape: Shape,
                 echo: str = "") -> None:
        self.served, self.job, self.prompt, self.shape, self.echo = (
            served, job, prompt, shape, echo)
        self.response_id = protocol.new_id(shape.prefix)
        self.outcome: Outcome | None = None
        served.live.add(job)
        if served.stopping.is_set():
            job.cancel()

    def usage(self) -> dict[str, int]:
        new_tokens = self.outcome.stats.new_tokens if self.outcome else 0
        return protocol.usage(len(self.prompt.ids), new_tokens)

    async def collect(self, disconnected: Callable[[], asyncio.Future[None]]) -> dict[str, object]:
        """The whole answer; cancelled (and its slot freed) if the client goes away."""
        pieces = [self.echo]
        reading = asyncio.ensure_future(self._read(pieces))
        gone = disconnected()
        try:
            await asyncio.wait({reading, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not reading.done():
                self.job.cancel()
            gone.cancel()
        await reading  # re-raises a failure
        assert self.outcome is not None
        return self.shape.whole(self.response_id, self.served.model_id, "".join(pieces),
                                self.outcome.finish_reason, self.usage())

    async def _read(self, pieces: list[str]) -> None:
        async for event in self.job.events():
            if isinstance(event, Outcome):
                self.outcome = event
            else:
                pieces.append(event)

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """`data: {...}` lines, then `data: [DONE]`. Leaving early (a client that
        disconnected) cancels the generation."""
        model, rid = self.served.model_id, self.response_id
        try:
            if self.shape.first is not None:
                yield _sse(protocol.chat_chunk(rid, model, self.shape.first))
            if self.echo:
                yield _sse(self.shape.piece(rid, model, self.echo, None))
            try:
                async for event in self.job.events():
                    if isinstance(event, Outcome):
                        self.outcome = event
                        yield _sse(self.shape.piece(rid, model, "", event.finish_reason))
                    else:
                        yield _sse(self.shape.piece(rid, model, event, None))
            except ApiError as exc:
                yield _sse(exc.body())
            if include_usage:
                yield _sse(protocol.usage_chunk(rid, model, self.shape.chunk_object,
                                                self.usage()))
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancel()  # a no-op when the answer ended by itself


def _sse(payload: dict[str, object]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, allow_nan=False)}\n\n"
