"""safeio: capped no-follow reads, guarded JSON, atomic writes and staged folders."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fragment_llm.errors import OutputError, TokenizerError
from fragment_llm.safety.files import (
    OLD_MARKER,
    TEMP_MARKER,
    atomic_write_bytes,
    json_depth,
    parse_json_guarded,
    read_capped,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
    staged_dir,
)


def test_read_capped_refuses_oversized_file(tmp_path):
    path = tmp_path / "big"
    path.write_bytes(b"x" * 101)
    with pytest.raises(TokenizerError, match="file too large.*limit is 100"):
        read_capped(path, 100, TokenizerError)
    assert read_capped(path, 101, TokenizerError) == b"x" * 101


def test_read_capped_refuses_symlink_and_fifo(tmp_path):
    target = tmp_path / "real"
    target.write_text("hi")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(TokenizerError, match="symlink"):
        read_capped(tmp_path / "link", 100, TokenizerError)
    os.mkfifo(tmp_path / "fifo")
    result: list[BaseException] = []

    def attempt():
        try:
            read_capped(tmp_path / "fifo", 100, TokenizerError)
        except TokenizerError as exc:
            result.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "opening a FIFO blocked"
    assert "not a regular file" in str(result[0])


def test_sha256_file_matches_bytes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1000)
    assert sha256_file(path, TokenizerError) == sha256_bytes(b"abc" * 1000)


@pytest.mark.parametrize("text,depth", [("1", 0), ("[]", 1), ('{"a": [1, [2]]}', 3),
                                        ('["[[[[", {"b": "]]"}]', 2)])
def test_json_depth_ignores_brackets_in_strings(text, depth):
    assert json_depth(text) == depth


def reference_depth(text: bytes) -> int:
    """json_depth's rule, byte by byte: an unescaped quote opens or closes a string
    (escaped: after an odd run of backslashes), brackets count outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in text:
        if byte == ord('"') and not escaped:
            in_string = not in_string
        elif not in_string and byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif not in_string and byte in b"]}":
            depth -= 1
        escaped = byte == ord("\\") and not escaped
    return deepest


@given(st.binary(max_size=64).map(lambda b: bytes(b'[]{}"\\a'[x % 7] for x in b)),
       st.sampled_from([1, 2, 3, 5, 1 << 18]))
def test_json_depth_follows_escapes_across_chunk_boundaries(text, chunk_bytes):
    # Any bytes, valid JSON or not, scanned in chunks of any size: the carried state
    # (depth, inside a string, an escape pending) makes the chunks one scan.
    assert json_depth(text, chunk_bytes) == reference_depth(text)


@pytest.mark.parametrize("hostile", [
    b'"' + b'\\"' * (1 << 19),  # an unterminated string of escaped quotes
    b'["\\' * (1 << 18), b"\\" * (1 << 20), b"[" * (1 << 20)])
def test_json_depth_is_linear_on_escaped_quotes(hostile):
    # The regex scan it replaced retried from every quote: 40 KB of `\"` took 6.5 s of
    # CPU, a megabyte hours. The linear scan takes ~0.05 s; the bound is generous (20x)
    # and measures this thread's CPU time, so other processes' load does not count.
    started = time.thread_time()
    json_depth(hostile)
    assert time.thread_time() - started < 1.0


def test_parse_json_guarded_refuses_quadratic_json_quickly():
    started = time.thread_time()
    with pytest.raises(TokenizerError, match="invalid JSON"):
        parse_json_guarded(b'{"a": "' + b'\\"' * 20_000, "evil.json", TokenizerError)
    assert time.thread_time() - started < 1.0


@pytest.mark.parametrize("payload,rule", [
    (b"[" * 100_000, "nested deeper"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": NaN}', "NaN"),
    (b"\xff\xfe", "invalid UTF-8 at byte 0"),
    (b'{"a": ', "invalid JSON"),
])
def test_parse_json_guarded_refuses_hostile_json(payload, rule):
    with pytest.raises(TokenizerError, match=rule) as info:
        parse_json_guarded(payload, "evil.json", TokenizerError)
    assert "evil.json" in str(info.value)


@given(st.recursive(st.none() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=20))
def test_parse_json_guarded_round_trips_plain_json(value):
    assert parse_json_guarded(json.dumps(value).encode(), "x", TokenizerError) == value


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_bytes(b"previous")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OutputError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_staged_dir_refuses_existing_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(OutputError, match="already exists"):
        with staged_dir(target, overwrite=False):
            pytest.fail("body must not run")


def test_staged_dir_failure_keeps_previous_result(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(target, overwrite=True) as tmp:
            (tmp / "half").write_text("partial")
            raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (target / "keep").read_text() == "old"


def test_staged_dir_success_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    with staged_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / f".out{TEMP_MARKER}999999999-abcd"
    dead.mkdir()
    assert remove_stale_temps(target) == [dead]
    assert not dead.exists()


def test_interrupted_swap_restores_previous_result(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / f".out{OLD_MARKER}999999999-abcd"
    old.mkdir()
    (old / "keep").write_text("old")
    remove_stale_temps(target)
    assert (target / "keep").read_text() == "old"


def test_atomic_write_without_replace_never_replaces(tmp_path):
    target = tmp_path / "new.txt"
    atomic_write_bytes(target, b"first", replace=False)
    assert target.read_bytes() == b"first"
    with pytest.raises(OutputError, match="already exists"):
        atomic_write_bytes(target, b"second", replace=False)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="already exists"):  # a dangling symlink too
        atomic_write_bytes(tmp_path / "link", b"third", replace=False)
    assert target.read_bytes() == b"first" and not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "new.txt"]
