"""sanitize: nothing a terminal can act on survives display or content stripping, nor
the sanitiser of model output and prompts, whole or streamed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fragment_llm.safety.text import (
    BIDI_CHARS,
    CONTROL_CHARS,
    ZERO_WIDTH_CHARS,
    OutputSanitizer,
    escape_for_display,
    sanitize_output,
    sanitize_prompt,
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


# ---------------------------------------------------------------- output sanitiser

HOSTILE_OUTPUTS = {
    "csi clear screen": ("a\x1b[2Jb", "ab"),
    "csi colour": ("\x1b[31;1mred\x1b[0m", "red"),
    "osc 8 link": ("\x1b]8;;http://x\x1b\\click\x1b]8;;\x1b\\", "click"),
    "osc 52 clipboard": ("x\x1b]52;c;aGk=\x07y", "xy"),
    "osc title, bel": ("\x1b]0;pwned\x07", ""),
    "dcs": ("\x1bP1$qm\x1b\\z", "z"),
    "apc": ("\x1b_hidden\x1b\\", ""),
    "c1 csi": ("a\x9b2Jb", "ab"),
    "c1 osc": ("\x9d0;title\x9cz", "z"),
    "single esc": ("\x1bcreset\x1b(B", "reset"),
    "carriage return": ("safe\rEVIL", "safeEVIL"),
    "backspace": ("abc\x08\x08d", "abcd"),
    "bell and nul": ("\x07\x00x", "x"),
    "bidi override": ("abc\u202edcba\u2066", "abcdcba"),
    "zero width": ("pay\u200bpal\ufeff", "paypal"),
    "lone surrogates": ("a\ud800b\udfffc", "abc"),
    "del and c1": ("a\x7fb\x85c", "abc"),
    "unterminated osc": ("ok\x1b]52;c;aGk=", "ok"),
    "broken csi": ("\x1b[12é", "[12é"),
    "esc made by removal": ("\x1b\u200b[2J", "[2J"),
    "rich markup is text": ("[link=http://x]a[/link] [/oops] [bold]", None),
    "newline and tab kept": ("a\n\tb", "a\n\tb"),
}


@pytest.mark.parametrize("text, expected", HOSTILE_OUTPUTS.values(), ids=HOSTILE_OUTPUTS)
def test_hostile_output(text, expected):
    clean = sanitize_output(text)
    assert clean == (text if expected is None else expected)
    assert not FORBIDDEN.intersection(clean)
    assert sanitize_output(clean) == clean


@pytest.mark.parametrize("text, expected", HOSTILE_OUTPUTS.values(), ids=HOSTILE_OUTPUTS)
def test_hostile_output_streamed_one_char_at_a_time(text, expected):
    stream = OutputSanitizer()
    shown = "".join(stream.feed(ch) for ch in text) + stream.flush()
    assert shown == sanitize_output(text)


TRICKY = st.text(st.sampled_from(list("ab[];0\\P_^X\x1b\x07\x9b\x9c\x9d\x90\r\n\x08é\u202e"
                                      "\u200b\ud800")) | st.characters(), max_size=80)


@given(TRICKY)
def test_sanitised_output_is_safe_and_idempotent(text):
    clean = sanitize_output(text)
    assert not FORBIDDEN.intersection(clean)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in clean)
    assert sanitize_output(clean) == clean


@given(TRICKY)
def test_sanitised_prompt_is_safe_idempotent_and_nfc(text):
    clean = sanitize_prompt(text)
    assert not FORBIDDEN.intersection(clean) and "\r" not in clean
    assert sanitize_prompt(clean) == clean


@given(TRICKY, st.lists(st.integers(0, 80), max_size=6))
def test_streaming_equals_sanitising_at_once(text, cuts):
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    stream = OutputSanitizer()
    shown = "".join(stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + stream.flush()
    assert shown == sanitize_output(text)


def test_a_sequence_split_across_chunks_is_removed_whole():
    stream = OutputSanitizer()
    pieces = [stream.feed(p) for p in ("ok\x1b", "]52;c;", "aGk=\x07done", "\x1b[", "2J")]
    assert pieces == ["ok", "", "done", "", ""] and stream.flush() == ""
