"""serve/body.py: the depth of JSON measured on its bytes, before any parser sees it."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fragment_llm.safety.files import json_depth
from fragment_llm.serve.body import parse_json, read_body
from fragment_llm.serve.errors import ApiError

# Strings full of what confuses a bracket counter: brackets, quotes and backslashes.
TRICKY_TEXT = st.text(alphabet=st.sampled_from('[]{}"\\ab\u00e9\u2028\n'), max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY_TEXT, inner, max_size=4),
    max_leaves=30)


def nesting(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    return 0


@given(JSON_VALUES, st.booleans())
def test_depth_on_the_bytes_is_the_depth_of_the_value(value, ascii_only):
    body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    assert json_depth(body) == nesting(value)


@pytest.mark.parametrize("body, depth", [
    (b'{"a": [1, "]]"]}', 2), (b'"[[[\\"[["', 0), (b'["a\\\\", ["]"]]', 2), (b"]]]", 0),
    (b"[" * 100_000 + b"]" * 100_000, 100_000)])
def test_depth_of_awkward_bodies(body, depth):
    assert json_depth(body) == depth


def test_a_hundred_thousand_levels_are_refused_before_parsing():
    with pytest.raises(ApiError) as refused:
        parse_json(b"[" * 100_000 + b"]" * 100_000, max_depth=16)
    assert refused.value.status == 400 and "100,000 levels" in refused.value.message


@pytest.mark.parametrize("body, words", [
    (b"", "empty"), (b"\xff{}", "UTF-8"), (b'{"a": NaN}', "NaN"), (b'{"a": Infinity}', "Infinity"),
    (b'{"a": 1', "not valid JSON")])
def test_bodies_that_are_not_json_are_400s(body, words):
    with pytest.raises(ApiError) as refused:
        parse_json(body, max_depth=16)
    assert refused.value.status == 400 and words in refused.value.message


async def chunks(*parts: bytes):
    for part in parts:
        yield part


def test_a_body_is_refused_as_soon_as_it_passes_the_cap():
    seen = []

    async def endless():
        while True:
            seen.append(1)
            yield b"x" * 1000

    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(endless(), None, max_bytes=10_000))
    assert refused.value.status == 413 and len(seen) == 11  # stopped at the first over


def test_a_declared_length_over_the_cap_is_refused_unread():
    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(chunks(b"never read"), "2000000", max_bytes=1_000_000))
    assert refused.value.status == 413
    with pytest.raises(ApiError):
        asyncio.run(read_body(chunks(b"{}"), "-5", max_bytes=1_000_000))
    assert asyncio.run(read_body(chunks(b"{", b"}"), "2", max_bytes=10)) == b"{}"


def test_a_body_that_stops_arriving_is_408_after_its_deadline():
    async def stalled():
        yield b'{"model": '
        await asyncio.sleep(3600)
        yield b"never"

    with pytest.raises(ApiError) as refused:
        asyncio.run(read_body(stalled(), None, max_bytes=1000, max_seconds=0.05))
    assert refused.value.status == 408 and refused.value.code == "request_timeout"
    assert "within 0.05 s" in refused.value.message


def test_a_key_twice_in_one_object_is_refused_at_any_depth():
    for body in (b'{"model": "a", "model": "b"}', b'{"messages": [{"role": "user", "role": "x"}]}'):
        with pytest.raises(ApiError, match="duplicate key"):
            parse_json(body, max_depth=16)
