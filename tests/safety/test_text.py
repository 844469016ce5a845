"""sanitize: nothing a terminal can act on survives display or content stripping."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fragment_llm.safety.text import (
    BIDI_CHARS,
    CONTROL_CHARS,
    ZERO_WIDTH_CHARS,
    escape_for_display,
    strip_unsafe,
)

FORBIDDEN = set(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS)


def test_escape_for_display_makes_escapes_visible():
    assert escape_for_display("a\x1b[2Jb\n\u202e") == "a\\x1b[2Jb\\x0a\\u202e"


def test_invisible_formatting_and_tag_characters_are_removed_or_shown():
    # Tag characters spell hidden ASCII ("ASCII smuggling"); the soft hyphen and the
    # invisible operators hide inside words. None may reach a reader unseen.
    smuggled = "ok" + "".join(chr(0xE0000 + ord(c)) for c in "rm -rf") + "\u00ad\u2062"
    assert strip_unsafe(smuggled) == "ok"
    assert escape_for_display("a\U000e0041") == "a\\U000e0041"
    assert escape_for_display("\u180e") == "\\u180e"


def test_escape_for_display_truncates():
    assert escape_for_display("x" * 20, max_chars=5) == "xxxxx…"


def test_strip_unsafe_keeps_newline_and_tab():
    assert strip_unsafe("a\tb\nc\x9b\x07\u200b\ud800") == "a\tb\nc"


@given(st.text())
def test_display_output_is_one_safe_line(text):
    shown = escape_for_display(text, max_chars=10_000)
    assert not FORBIDDEN.intersection(shown)
    assert "\n" not in shown and "\t" not in shown
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in shown)


@given(st.text())
def test_strip_unsafe_is_idempotent_and_safe(text):
    once = strip_unsafe(text)
    assert strip_unsafe(once) == once
    assert not FORBIDDEN.intersection(once)
