"""Cleaning rules: one test per rule, their order, and hypothesis properties."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fragment_llm.data.cleaning import RULES, WHITESPACE, CleaningCounts, clean_text
from fragment_llm.data.processed import CharsRemoved
from fragment_llm.safety.text import BIDI_CHARS, CONTROL_CHARS, ZERO_WIDTH_CHARS

FORBIDDEN = set(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS + "\r")


def counts_of(text: str) -> dict[str, int]:
    return {rule: n for rule, n in clean_text(text)[1].as_dict().items() if n}


@pytest.mark.parametrize(("raw", "cleaned", "counts"), [
    ("a\r\nb\rc", "a\nb\nc", {"newlines": 1}),
    ("Cafe\u0301", "Caf\u00e9", {"nfc": 1}),
    ("a\x1b[2Jb\x00c\x7fd\x85e\tf", "a[2Jbcde\tf", {"controls": 4}),
    ("abc\u202edef\u2066g\u200fh\u061c", "abcdefgh", {"bidi": 4}),
    ("\ufeffzero\u200bwidth\u200c\u200d\u2060", "zerowidth", {"zero_width": 5}),
    ('{"x": "lone \ud800 surrogate"}', '{"x": "lone  surrogate"}', {"surrogates": 1}),
    ("line one  \nline two\t\nend \t ", "line one\nline two\nend", {"trailing_whitespace": 6}),
    ("nbsp\u00a0\nideographic\u3000\nsep\u2028\n\u2003", "nbsp\nideographic\nsep",
     {"trailing_whitespace": 4, "blank_lines": 1}),
    ("a\n\n\n\nb\n\nc", "a\n\nb\n\nc", {"blank_lines": 2}),
    ("\n\n  \nbody\n\n\n", "body", {"trailing_whitespace": 2, "blank_lines": 6}),
])
def test_each_rule(raw, cleaned, counts):
    text, _ = clean_text(raw)
    assert text == cleaned
    assert counts_of(raw) == counts


def test_docstring_example():
    text, counts = clean_text("Hi\u200b there  \r\n\r\n\r\nBye\x1b")
    assert text == "Hi there\n\nBye"
    assert counts.as_dict() == {"newlines": 3, "nfc": 0, "controls": 1, "bidi": 0,
                                "zero_width": 1, "surrogates": 0, "trailing_whitespace": 2,
                                "blank_lines": 1}


def test_removal_that_breaks_nfc_is_renormalised():
    # The bidi mark separates 'e' from its combining accent; once it is gone they compose.
    text, counts = clean_text("e\u200f\u0301")
    assert text == "\u00e9" and unicodedata.is_normalized("NFC", text)
    assert counts.bidi == 1 and counts.nfc == 1


@pytest.mark.parametrize("run", [1, 2, 3, 7, 8, 15, 16, 40])
def test_trailing_space_runs_of_any_length(run):
    assert clean_text("a" + " " * run + "\nb" + " " * run)[0] == "a\nb"


def test_trailing_tabs_and_mixed_runs():
    assert clean_text("a \t \t\nb\t\n\tc")[0] == "a\nb\n\tc"


def test_leading_indentation_is_kept():
    assert clean_text("    indented\n\tverse")[0] == "    indented\n\tverse"


def test_crlf_with_trailing_spaces():
    assert clean_text("one  \r\ntwo  \r\n\r\n\r\n\r\nthree")[0] == "one\ntwo\n\nthree"


def test_nothing_to_do_returns_zero_counts():
    text = "Plain text.\n\nTwo paragraphs."
    assert clean_text(text) == (text, CleaningCounts())


def test_counts_add_up():
    total = CleaningCounts()
    total.add(clean_text("a\r\n")[1])
    total.add(clean_text("b\r\n\x01")[1])
    assert total.newlines == 2 and total.controls == 1


def test_manifest_names_every_rule():
    assert tuple(CleaningCounts().as_dict()) == RULES
    assert tuple(CharsRemoved.model_fields) == RULES


# ------------------------------------------------------------------------ properties

# Plenty of the characters the rules act on, mixed with arbitrary text.
_TRICKY = st.sampled_from([*CONTROL_CHARS, *BIDI_CHARS, *ZERO_WIDTH_CHARS, *WHITESPACE,
                           "\r", "\n", "\r\n", "\n\n\n", " " * 17, "\u0301", "\u0327", "e",
                           "\u212a", "\u0958", "\ud800", "\udfff", "\u1100", "\u1161"])
TEXT = st.lists(st.one_of(st.characters(), _TRICKY, st.text(max_size=5)),
                max_size=60).map("".join)


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_cleaning_is_idempotent(raw):
    once, _ = clean_text(raw)
    twice, counts = clean_text(once)
    assert twice == once
    assert counts == CleaningCounts()


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_output_has_no_forbidden_character_and_is_nfc(raw):
    text, _ = clean_text(raw)
    assert not FORBIDDEN & set(text)
    assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)
    assert unicodedata.is_normalized("NFC", text)
    text.encode("utf-8")  # always encodable: no lone surrogate survives


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_output_shape_and_counts(raw):
    text, counts = clean_text(raw)
    assert "\n\n\n" not in text
    assert not text.startswith("\n") and not text.endswith("\n")
    assert all(line == line.rstrip(WHITESPACE) for line in text.split("\n"))
    assert sum(counts.as_dict().values()) == len(raw) - len(text)
