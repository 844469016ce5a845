"""The text cleaning rules of `fragment preprocess`, applied in a fixed order and counted.

This module owns what "clean text" means; it does no I/O and knows nothing of files,
formats or shards. `clean_text(text)` applies, in order:

1. `newlines`             `\\r\\n` and lone `\\r` become `\\n`
2. `nfc`                  Unicode NFC normalisation
3. `controls`             C0/C1 control characters and DEL removed (`\\n`, `\\t` kept)
4. `bidi`                 bidi embeddings, overrides, isolates and marks removed
5. `zero_width`           zero-width and invisible characters removed
6. `surrogates`           lone surrogates removed (only JSON `\\ud800` escapes make them)
7. `trailing_whitespace`  whitespace at the end of every line removed
8. `blank_lines`          runs of blank lines collapsed to one; none at the start or end

and counts, per rule, the characters it removed (`len(before) - len(after)`; a lone
`\\r` becoming `\\n` removes nothing, and NFC can in rare cases lengthen a text, which
counts negative). Removing a character between a letter and a combining mark can make
text non-NFC again, so `nfc` runs a second time when rules 3-6 removed anything: the
result is always NFC, holds no forbidden character, and cleaning it again changes
nothing (`clean_text(clean_text(x)[0])[0] == clean_text(x)[0]`).

Speed: every rule is a C-level operation (`str` methods, `bytes.translate`, compiled
`re` with literal prefixes) guarded by a cheap "is there anything to do" test, because
most documents need no rule at all. Pure-ASCII text skips the Unicode rules entirely.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from fragment_llm.safety.text import (
    BIDI_CHARS,
    CONTROL_CHARS,
    SURROGATES,
    TAG_CHARS,
    ZERO_WIDTH_CHARS,
)

RULES = ("newlines", "nfc", "controls", "bidi", "zero_width", "surrogates",
         "trailing_whitespace", "blank_lines")

# Every character `str.isspace` accepts that survives the control-character rule.
WHITESPACE = ("\t \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
              "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_ASCII_WHITESPACE = "\t "

_ASCII_CONTROLS = CONTROL_CHARS[: CONTROL_CHARS.index("\x7f") + 1]
_ASCII_CONTROL_BYTES = _ASCII_CONTROLS.encode("ascii")
# Deleting every byte except the controls leaves exactly the controls: a C-speed count.
_ASCII_NON_CONTROL_BYTES = bytes(b for b in range(128) if chr(b) not in _ASCII_CONTROLS)

_CONTROLS = re.compile("[" + re.escape(CONTROL_CHARS) + "]")
_BIDI = re.compile("[" + re.escape(BIDI_CHARS) + "]")
_ZERO_WIDTH = re.compile("[" + re.escape(ZERO_WIDTH_CHARS) + TAG_CHARS + "]")
_SURROGATES = re.compile("[" + SURROGATES + "]")
_ANY_FORBIDDEN = re.compile(
    "[" + re.escape(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS) + TAG_CHARS + SURROGATES
    + "]")
_UNICODE_SPACE = re.compile("[" + re.escape(WHITESPACE[2:]) + "]")
# Anything that needs more than the fast path: a forbidden character or a non-ASCII space.
_UNUSUAL = re.compile(
    "[" + re.escape(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS + WHITESPACE[2:])
    + TAG_CHARS + SURROGATES + "]")
_SPACE_RUNS = tuple(" " * run + "\n" for run in (8, 4, 2, 1))
_LONG_SPACE_RUN = " " * 16 + "\n"
# Three or more newlines; the literal prefix lets `re` skip ahead at C speed.
_BLANK_RUN = re.compile("\n\n\n\n*")


@dataclass(slots=True)
class CleaningCounts:
    """Characters removed by each rule, summed over the documents cleaned so far."""

    newlines: int = 0
    nfc: int = 0
    controls: int = 0
    bidi: int = 0
    zero_width: int = 0
    surrogates: int = 0
    trailing_whitespace: int = 0
    blank_lines: int = 0

    def add(self, other: CleaningCounts) -> None:
        # Spelled out: this runs once per document, and a loop over fields() is 3x slower.
        self.newlines += other.newlines
        self.nfc += other.nfc
        self.controls += other.controls
        self.bidi += other.bidi
        self.zero_width += other.zero_width
        self.surrogates += other.surrogates
        self.trailing_whitespace += other.trailing_whitespace
        self.blank_lines += other.blank_lines

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in RULES}


def clean_text(text: str) -> tuple[str, CleaningCounts]:
    """Apply every rule in order; return the cleaned text and what each rule removed.

    `'Hi\\u200b there  \\r\\n\\r\\n\\r\\nBye\\x1b' -> ('Hi there\\n\\nBye', counts)` with
    `newlines=3, zero_width=1, controls=1, trailing_whitespace=2, blank_lines=1`.
    """
    counts = CleaningCounts()
    if "\r" in text:  # rule 1
        before = len(text)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        counts.newlines = before - len(text)
    if text.isascii():  # O(1) in CPython: the string knows its widest character
        raw = text.encode("ascii")  # rule 3, the only one of 2-6 ASCII can break
        counts.controls = len(raw.translate(None, _ASCII_NON_CONTROL_BYTES))
        if counts.controls:
            text = raw.translate(None, _ASCII_CONTROL_BYTES).decode("ascii")
        whitespace = _ASCII_WHITESPACE
    else:
        text, counts.nfc = _nfc(text)
        text, whitespace = _remove_forbidden(text, counts)
    before = len(text)  # rule 7
    if whitespace == _ASCII_WHITESPACE:
        text = _strip_space_and_tab(text)
    else:
        text = _rstrip_lines(text, whitespace)
    text = text.rstrip(whitespace)  # the last line has no "\n" after it
    counts.trailing_whitespace = before - len(text)
    before = len(text)  # rule 8
    if "\n\n\n" in text:
        text = _BLANK_RUN.sub("\n\n", text)
    text = text.strip("\n")
    counts.blank_lines = before - len(text)
    return text, counts


def _nfc(text: str) -> tuple[str, int]:
    if unicodedata.is_normalized("NFC", text):  # quick check: no copy for most text
        return text, 0
    normalised = unicodedata.normalize("NFC", text)
    return normalised, len(text) - len(normalised)


def _remove_forbidden(text: str, counts: CleaningCounts) -> tuple[str, str]:
    """Rules 3-6 on non-ASCII text, then NFC again if needed.

    Also returns the whitespace set rule 7 must strip: just space and tab unless the
    text holds other Unicode whitespace. One regex pass answers both questions for
    the common text that has neither.
    """
    first = _UNUSUAL.search(text)
    if first is None:
        return text, _ASCII_WHITESPACE
    start = first.start()
    whitespace = WHITESPACE if _UNICODE_SPACE.search(text, start) else _ASCII_WHITESPACE
    if _ANY_FORBIDDEN.search(text, start) is None:
        return text, whitespace
    text, counts.controls = _CONTROLS.subn("", text)
    text, counts.bidi = _BIDI.subn("", text)
    text, counts.zero_width = _ZERO_WIDTH.subn("", text)
    text, counts.surrogates = _SURROGATES.subn("", text)
    # A removed character may have separated a letter from its combining mark.
    text, renormalised = _nfc(text)
    counts.nfc += renormalised
    return text, whitespace


def _strip_space_and_tab(text: str) -> str:
    """Trailing spaces and tabs, by C-level `str.replace`: far faster than any regex.

    Without tabs, a run of r spaces before a newline goes in at most four passes, one
    each for runs of 8, 4, 2 and 1 (r < 16); the needle ends in "\\n", so it can only
    match the spaces right before a line end. Longer runs, and tabs, fall back to one
    `rstrip` per line.
    """
    if "\t" in text:  # one memchr; tabs are rare in prose
        if " \n" not in text and "\t\n" not in text:
            return text
        return _rstrip_lines(text, _ASCII_WHITESPACE)
    if " \n" not in text:
        return text
    if _LONG_SPACE_RUN in text:
        return _rstrip_lines(text, _ASCII_WHITESPACE)
    for needle in _SPACE_RUNS:
        if needle in text:
            text = text.replace(needle, "\n")
    return text


def _rstrip_lines(text: str, whitespace: str) -> str:
    return "\n".join([line.rstrip(whitespace) for line in text.split("\n")])
