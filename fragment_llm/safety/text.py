"""Character classes that must never reach a terminal, and the functions that keep them out.

Two jobs, one definition of "unsafe":
- `escape_for_display` makes a file name or error message visible and harmless
  (`\\x1b` shown as the four characters `\\x1b`), for one-line diagnostics.
- `strip_unsafe` deletes the same characters, for text that is content (cleaned
  documents, model output).

For generation, built on `strip_unsafe`: `sanitize_output` (and `OutputSanitizer`, its
streaming form) also removes whole escape sequences (CSI, OSC, DCS, ...), and
`sanitize_prompt` adds newline normalisation and NFC for text going into the model.
"""

from __future__ import annotations

import re
import unicodedata

import regex

# C0 controls except \t and \n, DEL, and the C1 block.
CONTROL_CHARS = "".join(chr(c) for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F,
                                         *range(0x80, 0xA0)])
# Explicit bidi embeddings/overrides/isolates and marks: they reorder what the reader sees.
BIDI_CHARS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
# Zero-width and invisible characters that hide content or split look-alike words: also
# the soft hyphen, the Mongolian vowel separator and the invisible math operators.
ZERO_WIDTH_CHARS = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e\u2061\u2062\u2063\u2064"
# Unicode tag characters (a range, for a regex class): invisible copies of ASCII, used
# to smuggle instructions past a reader ("ASCII smuggling").
TAG_CHARS = "\U000e0000-\U000e007f"
SURROGATES = "\ud800-\udfff"

_DISPLAY_UNSAFE = re.compile(
    "[" + re.escape(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS + "\n\t") + TAG_CHARS
    + SURROGATES + "]"
)
_CONTENT_UNSAFE = re.compile(
    "[" + re.escape(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS) + TAG_CHARS + SURROGATES
    + "]"
)


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape_for_display(text: str, max_chars: int = 500) -> str:
    """One printable line: unsafe characters (newline and tab too) become visible escapes.

    `'evil\\x1b[2Jname\\n' -> 'evil\\\\x1b[2Jname\\\\x0a'`. Long text is cut with an ellipsis.
    """
    if len(text) > max_chars:
        text = text[:max_chars] + "…"
    return _DISPLAY_UNSAFE.sub(_escape_char, text)


def strip_unsafe(text: str) -> str:
    """Remove every character a terminal could act on, keeping `\\n` and `\\t`."""
    return _CONTENT_UNSAFE.sub("", text)


# ------------------------------------------------------------- escape sequences
#
# Model output and prompts lose whole terminal escape sequences, not just their ESC,
# so `\x1b[2J` disappears instead of leaving `[2J` on screen. Safety does not depend on
# these patterns: whatever they miss, `strip_unsafe` then deletes every ESC and C1
# control, so no sequence can reach a terminal and the result is idempotent (nothing
# in it can start a sequence).
#
# Each sequence holds an introducer (ESC or a C1 control) only as its first character:
# string bodies end before any ESC or C1. That makes a stream safe to cut just before
# an introducer, which `OutputSanitizer` relies on. `regex` (not `re`) offers partial
# matching: "could more text still complete this sequence?".

MAX_SEQUENCE_BODY = 1024  # longer "strings" are not treated as one sequence
_BODY = rf"[^\x07\x1b\x80-\x9f]{{0,{MAX_SEQUENCE_BODY}}}"
# CSI: ESC [ or 8-bit \x9b; parameters, intermediates, one final byte. `\x1b[2J`
_CSI = r"(?:\x1b\[|\x9b)[\x30-\x3f]{0,64}[\x20-\x2f]{0,16}[\x40-\x7e]"
# OSC, DCS, SOS, PM, APC (7-bit and 8-bit): a body ended by BEL or ST (ESC \ or \x9c),
# or cut short by the next ESC / C1 control. `\x1b]52;c;aGk=\x07`, `\x1b]8;;http://x\x1b\\`
_STRING_START = r"(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])"
_STRING = _STRING_START + _BODY + r"(?:\x07|\x9c|\x1b\\|(?=[\x1b\x80-\x9f]))"
# Every other ESC sequence: intermediates then a final byte (`\x1b(B`, `\x1bc`, `\x1b7`).
# Without intermediates, the introducers of CSI and strings are not finals, so a
# half-received `\x1b[12` stays pending instead of matching as `\x1b[`.
_ESC_OTHER = r"\x1b(?:[\x20-\x2f]{1,16}[\x30-\x7e]|[\x30-\x4f\x51-\x57\x59-\x5a\x5c\x60-\x7e])"
_SEQUENCE = regex.compile(f"{_CSI}|{_STRING}|{_ESC_OTHER}")
_UNTERMINATED = regex.compile(_STRING_START + _BODY + r"\Z")  # a string cut off by the end
_INTRODUCER = regex.compile(r"[\x1b\x80-\x9f]")


def _remove_sequences(text: str, final: bool) -> tuple[str, int]:
    """Text with escape sequences removed, and how much of `text` was decided.

    With `final=False` the scan stops before a sequence that more text could still
    complete (`'ok\\x1b]52;c;' -> ('ok', 2)`); with `final=True` all of it is decided and
    a string sequence cut off by the end is removed to the end. Bare introducers are
    left in place for `strip_unsafe`.
    """
    pieces, pos = [], 0
    while (found := _INTRODUCER.search(text, pos)) is not None:
        start = found.start()
        match = _SEQUENCE.match(text, start, partial=not final)
        if match is not None and match.partial:
            pieces.append(text[pos:start])
            return "".join(pieces), start
        if match is None and final:
            match = _UNTERMINATED.match(text, start)
        pieces.append(text[pos:start] if match else text[pos:start + 1])
        pos = match.end() if match else start + 1
    pieces.append(text[pos:])
    return "".join(pieces), len(text)


def sanitize_output(text: str) -> str:
    """Text safe to print: escape sequences removed whole, then every control (but
    `\\n` and `\\t`), bidi control, zero-width character and lone surrogate.

    `'a\\x1b[2Jb\\x1b]8;;http://x\\x1b\\\\c\\r' -> 'abc'`. Idempotent.
    """
    return strip_unsafe(_remove_sequences(text, final=True)[0])


def sanitize_prompt(text: str) -> str:
    """A prompt as the model should see it: `\\r\\n` and `\\r` become `\\n`, the
    `sanitize_output` removals, then Unicode NFC (last, so removing a character
    between a letter and its accent cannot leave text that is not NFC). Idempotent.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return unicodedata.normalize("NFC", sanitize_output(text))


class OutputSanitizer:
    """`sanitize_output` for text arriving in pieces.

    A trailing piece that could still become an escape sequence (`'\\x1b'`, `'\\x1b]52;'`)
    is held back until the next `feed` decides it, so a sequence split across two
    pieces is removed whole, exactly as if the text had come at once:
    `feed(a) + feed(b) + flush() == sanitize_output(a + b)`. At most one sequence
    (about MAX_SEQUENCE_BODY characters) is ever held back.
    """

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> str:
        text = self._pending + text
        done, decided = _remove_sequences(text, final=False)
        self._pending = text[decided:]
        return strip_unsafe(done)

    def flush(self) -> str:
        """Everything held back, decided as the end of the text; resets the sanitizer."""
        text, self._pending = self._pending, ""
        return sanitize_output(text)
