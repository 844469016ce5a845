"""Pre-splitting text into chunks before BPE: the named split patterns and their guards.

This module owns the split patterns (`gpt2`, `gpt4`), the checks a custom pattern must
pass before it is used, and `Splitter.split(text) -> list[str]`. It knows nothing about
merges, token ids or files.

    >>> Splitter.named("gpt4").split("Hello world's 12345!!\\n")
    ['Hello', ' world', "'s", ' ', '123', '45', '!!\\n']

Every chunk boundary is a token boundary, and the chunks always join back into the text
(`"".join(split(text)) == text`), so `decode(encode(text)) == text`.

Matching runs with the `regex` package under its `timeout=` guard. That guard has a price
(the gpt4 pattern runs ~2.7x slower with it), so ASCII text split by a *named* pattern
takes a fast path: stdlib `re` with an ASCII transcription of the same pattern
(`\\p{L}` -> `[A-Za-z]`, `\\s` -> `[\\t\\n\\v\\f\\r ]`, ...), ~7x faster than the guarded
match. It is only used for the two named patterns, which have no nested quantifiers
(linear time by construction), and tests prove it gives the same chunks as `regex`
(tests/tokenizer/test_tokenizer.py::test_ascii_fast_path_*). Custom patterns always run guarded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import regex

from fragment_llm.errors import TokenizerError

# tiktoken's r50k_base (GPT-2) and cl100k_base (GPT-4) split patterns, verbatim.
GPT2_PATTERN: Final = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""")
GPT4_PATTERN: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
NAMED_PATTERNS: Final = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}
CUSTOM: Final = "custom"

# The same patterns for ASCII text, for stdlib `re`. In ASCII, \p{L} is [A-Za-z], \p{N} is
# [0-9], and `regex`'s \s (Unicode White_Space) is [\t\n\v\f\r ]; `re`'s own \s would also
# match \x1c-\x1f, so it is spelled out.
_WS = r"\t\n\v\f\r "
_ASCII_PATTERNS: Final = {
    "gpt2": (rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]++| ?[0-9]++| ?[^{_WS}A-Za-z0-9]++"""
             rf"""|[{_WS}]++$|[{_WS}]+(?![^{_WS}])|[{_WS}]"""),
    "gpt4": (rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]++|[0-9]{{1,3}}+"""
             rf"""| ?[^{_WS}A-Za-z0-9]++[\r\n]*+|[{_WS}]++$|[{_WS}]*[\r\n]"""
             rf"""|[{_WS}]+(?![^{_WS}])|[{_WS}]"""),
}

# A guarded match may take this long before it is called catastrophic: one second plus
# 5 us per character (~40x the normal cost), so only runaway backtracking trips it.
TIMEOUT_BASE_S = 1.0
TIMEOUT_PER_CHAR_S = 5e-6
# The probe a custom pattern must pass: 64 KiB of each input, each within this time.
PROBE_CHARS = 1 << 16
PROBE_TIMEOUT_S = 1.0
PROBE_INPUTS: Final = {
    "spaces": " ", "newlines": "\n", "one letter": "a", "digits": "0123456789",
    "punctuation": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "tabs and CRLF": "\t\r\n",
    "words": "the cat's 12 hats, ok?\n", "non-ASCII letters": "éß漢字 Ωμέγα ",
    "alternating": "a ", "mixed symbols": "a1!\u00a0\u2028b2?\t",
}
MAX_PATTERN_CHARS = 4096
MAX_REPEAT_PRODUCT = 10_000
_COUNTED_REPEAT = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


@dataclass(frozen=True)
class SplitPattern:
    """A pattern name (`gpt2`, `gpt4` or `custom`) and the regex it stands for."""

    name: str
    pattern: str


class Splitter:
    """Splits text into pre-tokenization chunks with one validated pattern.

    Build one with `Splitter.named("gpt4")` or `Splitter.custom(pattern)` (which probes
    the pattern first); both raise `TokenizerError` for anything unusable.
    """

    def __init__(self, spec: SplitPattern) -> None:
        self.spec = spec
        self._guarded = _compile(spec.pattern)
        ascii_pattern = _ASCII_PATTERNS.get(spec.name)
        self._ascii = re.compile(ascii_pattern) if ascii_pattern is not None else None
        self._named = spec.name in NAMED_PATTERNS

    @classmethod
    def named(cls, name: str) -> Splitter:
        if name not in NAMED_PATTERNS:
            raise TokenizerError(f"unknown split pattern {name!r}",
                                 hint="use gpt2 or gpt4 (or 'custom' with custom_pattern)")
        return cls(SplitPattern(name, NAMED_PATTERNS[name]))

    @classmethod
    def custom(cls, pattern: str) -> Splitter:
        check_custom_pattern(pattern)
        return cls(SplitPattern(CUSTOM, pattern))

    @classmethod
    def for_spec(cls, spec: SplitPattern) -> Splitter:
        """The splitter for a (name, pattern) pair, as read from a file or a config."""
        if spec.name == CUSTOM:
            return cls.custom(spec.pattern)
        splitter = cls.named(spec.name)
        if spec.pattern != splitter.spec.pattern:
            raise TokenizerError(f"pattern does not match the named pattern {spec.name!r}")
        return splitter

    def split(self, text: str) -> list[str]:
        """The chunks of `text`, in order; they join back into `text`."""
        if self._ascii is not None and text.isascii():
            return self._ascii.findall(text)
        timeout = TIMEOUT_BASE_S + len(text) * TIMEOUT_PER_CHAR_S
        if not self._named:
            # Matches plus the unmatched gaps between them (as HF's `isolated` split
            # does), so a custom pattern that skips characters still round-trips.
            return split_with_gaps(self._guarded, text, timeout, self.spec.name)
        # The named patterns match every character, so findall loses nothing.
        try:
            return self._guarded.findall(text, timeout=timeout)
        except TimeoutError:
            raise _timeout_error(self.spec.name, len(text)) from None


def split_with_gaps(compiled: regex.Pattern[str], text: str, timeout: float,
                    name: str) -> list[str]:
    """`"a1b" with r"\\d" -> ["a", "1", "b"]`: every match and every gap, none empty."""
    pieces: list[str] = []
    end = 0
    try:
        for match in compiled.finditer(text, timeout=timeout):
            start, stop = match.span()
            if start > end:
                pieces.append(text[end:start])
            if stop > start:
                pieces.append(text[start:stop])
            end = stop
    except TimeoutError:
        raise _timeout_error(name, len(text)) from None
    if end < len(text):
        pieces.append(text[end:])
    return pieces


def _timeout_error(name: str, chars: int) -> TokenizerError:
    return TokenizerError(f"the {name} split pattern timed out on a {chars}-character text "
                          f"(catastrophic backtracking)",
                          hint="use a named pattern (gpt4, gpt2) or simplify the custom one")


def _compile(pattern: str) -> regex.Pattern[str]:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise TokenizerError(f"split pattern is {len(pattern)} characters, the limit is "
                             f"{MAX_PATTERN_CHARS}")
    _check_repeats(pattern)
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, TypeError, RecursionError, OverflowError,
            MemoryError) as exc:
        raise TokenizerError(f"split pattern does not compile: {exc}") from None


def _check_repeats(pattern: str) -> None:
    """Refuse counted repeats that could blow up compilation before compiling.

    `regex` expands `a{100000000}` into memory while compiling (the process is killed
    long before a MemoryError). Every `{n}`, `{m,n}`, `{,n}` counts, as if nested, so
    `(?:a{100}){100}` (product 10,000) is the most allowed; gpt4's `{1,3}` is 3.
    """
    product = 1
    for low, high in _COUNTED_REPEAT.findall(pattern):
        product *= max(int(low or 1), int(high or 1), 1)
        if product > MAX_REPEAT_PRODUCT:
            raise TokenizerError("split pattern has counted repeats ({n}) multiplying to "
                                 f"more than {MAX_REPEAT_PRODUCT:,}",
                                 hint="use smaller counts, or + and * instead")


def check_custom_pattern(pattern: str) -> None:
    """Refuse a custom pattern that is slow, matches empty strings or skips characters.

    Runs it over 64 KiB of each `PROBE_INPUTS` text (spaces, newlines, one letter, ...)
    under a short timeout; the matches must be non-empty and cover every character.
    """
    compiled = _compile(pattern)
    for label, unit in PROBE_INPUTS.items():
        text = (unit * (PROBE_CHARS // len(unit) + 1))[:PROBE_CHARS]
        _probe_one(compiled, text, label)


def _probe_one(compiled: regex.Pattern[str], text: str, label: str) -> None:
    end = 0
    try:
        for match in compiled.finditer(text, timeout=PROBE_TIMEOUT_S):
            start, stop = match.span()
            if stop == start:
                raise TokenizerError(f"custom split pattern matches the empty string "
                                     f"(probe: {label})", hint="make every branch consume text")
            if start != end:
                raise _gap_error(label)
            end = stop
    except TimeoutError:
        raise TokenizerError(f"custom split pattern failed the pathological-input probe: "
                             f"it took over {PROBE_TIMEOUT_S:g}s on {len(text)} characters "
                             f"of {label}", hint="avoid nested quantifiers like (a+)+") from None
    if end != len(text):
        raise _gap_error(label)


def _gap_error(label: str) -> TokenizerError:
    return TokenizerError(f"custom split pattern does not match every character "
                          f"(probe: {label})", hint=r"end it with a catch-all branch like |\s+|.")
