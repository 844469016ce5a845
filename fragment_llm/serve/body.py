"""Request bodies as hostile input: bytes capped before they are read, JSON bounded
before it is parsed.

A body is read in chunks and refused (413) the moment it passes `max_body_bytes`, so
a client cannot make the server hold more than the cap. The bytes are then checked
for UTF-8 and for nesting depth *before* `json.loads` sees them: Python's parser
recurses once per level, and `[[[[...` a few thousand deep would be a RecursionError
(a traceback) rather than a refusal. Numbers that are not finite (`NaN`, `Infinity`,
which Python's parser accepts and JSON does not) are refused too, and so is a key
that appears twice in one object. A body that trickles
in is cut off (408) after `MAX_BODY_SECONDS`, so a slow client cannot hold a connection
open by sending a byte now and then.

This module knows no web framework: `read_body` takes any async iterator of chunks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fragment_llm.safety.files import json_depth, refuse_duplicate_keys, refuse_json_constant
from fragment_llm.serve.errors import ApiError

# A body trickling in holds a connection: it must all arrive within this (or within the
# request's own wall-clock cap, when that is shorter).
MAX_BODY_SECONDS = 10.0


async def read_body(chunks: AsyncIterator[bytes], declared_length: str | None,
                    max_bytes: int, max_seconds: float = MAX_BODY_SECONDS) -> bytes:
    """The whole body, or ApiError 413 as soon as it is known to be over `max_bytes`
    (from its Content-Length before reading, else while reading), or 408 when it has
    not all arrived within `max_seconds`."""
    if declared_length is not None:
        if not declared_length.isdigit():
            raise ApiError(400, "the Content-Length header is not a number")
        if int(declared_length) > max_bytes:
            raise too_large(max_bytes)
    body = bytearray()
    try:
        async with asyncio.timeout(max_seconds):
            async for chunk in chunks:
                body += chunk
                if len(body) > max_bytes:
                    raise too_large(max_bytes)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {max_seconds:.3g} s",
                       code="request_timeout", headers={"connection": "close"}) from None
    return bytes(body)


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is over {max_bytes:,} bytes",
                    code="request_too_large")


def parse_json(body: bytes, max_depth: int) -> object:
    """The body as JSON, after checking its encoding and depth; ApiError 400 otherwise."""
    if not body.strip():
        raise ApiError(400, "the request body is empty; it must be a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    depth = json_depth(body)
    if depth > max_depth:
        raise ApiError(400, f"the request body nests {depth:,} levels deep; the limit is "
                            f"{max_depth} (max_json_depth)")
    try:
        return json.loads(text, parse_constant=refuse_json_constant,
                          object_pairs_hook=refuse_duplicate_keys)
    except ValueError as exc:  # JSONDecodeError, or a refused constant
        raise ApiError(400, f"the request body is not valid JSON: {_reason(exc)}") from None


def _reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc)
