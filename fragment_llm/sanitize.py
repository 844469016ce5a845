"""Character classes that must never reach a terminal, and the functions that keep them out.

Two jobs, one definition of "unsafe":
- `escape_for_display` makes a file name or error message visible and harmless
  (`\\x1b` shown as the four characters `\\x1b`), for one-line diagnostics.
- `strip_unsafe` deletes the same characters, for text that is content (cleaned
  documents, model output).
"""

from __future__ import annotations

import re

# C0 controls except \t and \n, DEL, and the C1 block.
CONTROL_CHARS = "".join(chr(c) for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F,
                                         *range(0x80, 0xA0)])
# Explicit bidi embeddings/overrides/isolates and marks: they reorder what the reader sees.
BIDI_CHARS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
# Zero-width and invisible characters that hide content or split look-alike words.
ZERO_WIDTH_CHARS = "\u200b\u200c\u200d\u2060\ufeff"
SURROGATES = "\ud800-\udfff"

_DISPLAY_UNSAFE = re.compile(
    "[" + re.escape(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS + "\n\t") + SURROGATES + "]"
)
_CONTENT_UNSAFE = re.compile(
    "[" + re.escape(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS) + SURROGATES + "]"
)


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


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
