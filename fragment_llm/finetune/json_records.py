"""The records of one conversation file, decoded within caps, and the reason codes of
everything the conversation boundary refuses (`RefusalReason`, the one place they are
spelled).

`records(text, caps)` tells the two layouts apart by the first character: `[` opens a
JSON array of records, anything else is JSON Lines (one record per line, blank lines
skipped). It yields each record's number (the line, or the element counted from 1)
with its decoded JSON value, or a `Refused` saying why that record is not one: a line
longer than `max_record_chars` (measured before it is decoded), invalid JSON, a
duplicate key, NaN or Infinity, nesting deeper than `max_json_depth`. An array is
decoded one element at a time, each from a slice of the text that grows to at most
`max_record_chars`, so no element is ever decoded past the cap and the array never
exists whole as Python objects. What leaves no way to find the next record (broken
array syntax, an element over the cap) raises `FileRefused`, as do invalid UTF-8
(`text_of`) and a file none of whose lines is JSON.

It knows nothing of conversations (`conversations.py` reads the records' fields).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from fragment_llm.data.processed import Reason
from fragment_llm.data.readers import json_value_depth

FIRST_SLICE_CHARS = 4096  # an array element is first parsed from this much text

_JSON_SPACE = re.compile(r"[ \t\n\r]*")


class RefusalReason(StrEnum):
    """Why a record (or a whole file: record 0) was refused."""

    # a record
    BAD_JSON = "bad_json"
    TOO_DEEP = "too_deep"
    RECORD_TOO_LONG = "record_too_long"
    BAD_RECORD = "bad_record"
    UNKNOWN_ROLE = "unknown_role"
    TOO_MANY_TURNS = "too_many_turns"
    SEVERAL_SYSTEM_MESSAGES = "several_system_messages"
    SYSTEM_NOT_FIRST = "system_not_first"
    NOT_ALTERNATING = "not_alternating"
    NO_ASSISTANT_TURN = "no_assistant_turn"
    EMPTY_CONTENT = "empty_content"
    MESSAGE_TOO_LONG = "message_too_long"
    CONVERSATION_TOO_LONG = "conversation_too_long"
    DUPLICATE = "duplicate"
    TOO_MANY_RECORDS = "too_many_records"  # also a whole file, once the cap is reached
    # a whole file, as this module reads it
    INVALID_UTF8 = "invalid_utf8"
    NOT_JSON = "not_json"  # neither a JSON array nor JSON Lines
    # a whole file, as discovery and `read_whole_file` refuse it (`data.processed.Reason`)
    SYMLINK_ESCAPES_ROOT = "symlink_escapes_root"
    SYMLINK_LOOP = "symlink_loop"
    BROKEN_SYMLINK = "broken_symlink"
    NOT_REGULAR_FILE = "not_regular_file"
    UNREADABLE = "unreadable"
    VANISHED = "vanished"
    CHANGED_WHILE_READ = "changed_while_read"
    TOO_LARGE = "too_large"
    TOTAL_CAP = "total_cap"
    TOO_MANY_FILES = "too_many_files"

    @classmethod
    def of_file(cls, reason: Reason) -> RefusalReason:
        """The code for a file that discovery or reading refused: `symlink-loop -> symlink_loop`."""
        return cls(reason.value.replace("-", "_"))


@dataclass(frozen=True, slots=True)
class RecordCaps:
    max_record_chars: int  # a line or an array element, before it is decoded
    max_json_depth: int


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a record is refused (its place is added by whoever counts the records)."""

    reason: RefusalReason
    detail: str


class FileRefused(Exception):
    """The file is refused whole: none of its records counts."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def text_of(data: bytes) -> str:
    """A file's bytes as text: strict UTF-8, a leading byte order mark dropped."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileRefused(RefusalReason.INVALID_UTF8, f"invalid UTF-8 at byte "
                          f"{exc.start}; save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def records(text: str, caps: RecordCaps) -> Iterator[tuple[int, object | Refused]]:
    """(record number, parsed JSON or why it is refused) for each record of a file."""
    start = _skip_space(text, 0)
    if text.startswith("[", start):
        return _array_records(text, start + 1, caps)
    return _jsonl_records(text, caps)


def _skip_space(text: str, position: int) -> int:
    """The first position from `position` on that is not JSON whitespace."""
    match = _JSON_SPACE.match(text, position)
    assert match is not None  # `*` matches the empty string
    return match.end()


class _GuardedJson:
    """json's decoder, noting (instead of raising) a duplicate key or a NaN/Infinity:
    an array element that has one is refused alone, and the next element is found."""

    def __init__(self) -> None:
        self.problem: str | None = None
        self._decoder = json.JSONDecoder(object_pairs_hook=self._object,
                                         parse_constant=self._constant)

    def decode(self, text: str) -> object:
        """A whole text (surrounding whitespace allowed), as `json.loads`."""
        self.problem = None
        return self._decoder.decode(text)

    def raw_decode(self, text: str) -> tuple[object, int]:
        """The value at the start of `text`, and where it ends."""
        self.problem = None
        return self._decoder.raw_decode(text)

    def checked(self, value: object, max_depth: int) -> object | Refused:
        """The value just decoded, or why it is refused."""
        if self.problem is not None:
            return Refused(RefusalReason.BAD_JSON, self.problem)
        if isinstance(value, dict | list) and json_value_depth(value) > max_depth:
            return Refused(RefusalReason.TOO_DEEP,
                           f"JSON nested deeper than max_json_depth={max_depth}")
        return value

    def _object(self, pairs: list[tuple[str, object]]) -> dict[str, object]:
        result = dict(pairs)
        if len(result) < len(pairs) and self.problem is None:
            keys = [key for key, _ in pairs]
            duplicate = next(key for index, key in enumerate(keys) if key in keys[:index])
            self.problem = f"duplicate key {duplicate!r}"
        return result

    def _constant(self, name: str) -> None:
        self.problem = self.problem or f"non-standard JSON constant {name}"


def _jsonl_records(text: str, caps: RecordCaps
                   ) -> Iterator[tuple[int, object | Refused]]:
    """One record per non-blank line. A file none of whose lines is JSON is refused
    whole (a pretty-printed object, a text file): its lines are not records."""
    decoder = _GuardedJson()
    parsed_any, first_error = False, None
    for number, start, end in _lines(text):
        if end - start > caps.max_record_chars:  # before decoding anything
            yield number, Refused(RefusalReason.RECORD_TOO_LONG, f"line of {end - start} "
                                  f"characters; max_record_chars is {caps.max_record_chars}")
            continue
        line = text[start:end]
        if not line or line.isspace():
            continue
        value = _parse_line(decoder, line, caps.max_json_depth)
        if isinstance(value, Refused) and value.reason == RefusalReason.BAD_JSON:
            first_error = first_error or f"line {number}: {value.detail}"
        else:
            parsed_any = True
        yield number, value
    if first_error and not parsed_any:
        raise FileRefused(RefusalReason.NOT_JSON, "neither a JSON array nor JSON Lines "
                          f"(an object per line); {first_error}")


def _lines(text: str) -> Iterator[tuple[int, int, int]]:
    """(line number, start, end) of each line, without a list of all the lines."""
    start = 0
    for number in itertools.count(1):
        end = text.find("\n", start)
        if end < 0:
            yield number, start, len(text)
            return
        yield number, start, end
        start = end + 1


def _parse_line(decoder: _GuardedJson, line: str, max_depth: int) -> object | Refused:
    try:
        value = decoder.decode(line)
    except RecursionError:  # the C parser stops at Python's recursion limit
        return Refused(RefusalReason.TOO_DEEP,
                       f"JSON nested deeper than max_json_depth={max_depth}")
    except json.JSONDecodeError as exc:
        return Refused(RefusalReason.BAD_JSON, f"invalid JSON: {exc.msg} at column {exc.colno}")
    return decoder.checked(value, max_depth)


def _array_records(text: str, start: int, caps: RecordCaps
                   ) -> Iterator[tuple[int, object | Refused]]:
    """The elements of the JSON array whose `[` ends just before `start`, one at a time
    (never the whole array as Python objects). Broken syntax refuses the whole file:
    past it, where the next element starts is unknown."""
    decoder = _GuardedJson()
    position = _skip_space(text, start)
    if text.startswith("]", position):
        _check_array_end(text, position, 0)
        return
    for number in itertools.count(1):
        value, position = _array_element(decoder, text, position, number, caps)
        yield number, value
        position = _skip_space(text, position)
        if text.startswith("]", position):
            _check_array_end(text, position, number)
            return
        if not text.startswith(",", position):
            raise FileRefused(RefusalReason.NOT_JSON, f"invalid JSON array: expected ',' "
                              f"or ']' after element {number} (character {position})")
        position = _skip_space(text, position + 1)


def _check_array_end(text: str, position: int, elements: int) -> None:
    if _skip_space(text, position + 1) != len(text):
        raise FileRefused(RefusalReason.NOT_JSON, f"invalid JSON array: data after its "
                          f"end (after element {elements})")


def _array_element(decoder: _GuardedJson, text: str, start: int, number: int,
                   caps: RecordCaps) -> tuple[object | Refused, int]:
    """One element and the position after it, parsed from a slice of 4 KiB, then 8 KiB,
    ... up to `max_record_chars`: a huge element costs about twice its size to parse,
    and one over the cap is refused once the cap's worth of text was tried."""
    cap = caps.max_record_chars
    size = min(FIRST_SLICE_CHARS, cap + 1)
    while True:
        end = min(len(text), start + size)
        try:
            value, stop = decoder.raw_decode(text[start:end])
            # A value ending exactly at the cut may go on (a number): look further.
            cut = end < len(text) and stop == end - start
        except RecursionError:
            raise FileRefused(RefusalReason.TOO_DEEP, f"element {number} is nested too "
                              "deeply to parse") from None
        except json.JSONDecodeError as exc:
            if end == len(text) or not _cut_short(exc, end - start):
                raise FileRefused(RefusalReason.NOT_JSON, f"invalid JSON in element {number}"
                                  f": {exc.msg} (character {start + exc.pos})") from None
            cut = True
        if not cut:
            return decoder.checked(value, caps.max_json_depth), start + stop
        if size > cap:
            raise FileRefused(RefusalReason.RECORD_TOO_LONG, f"element {number} does not "
                              f"end within max_record_chars={cap} characters")
        size = min(2 * size, cap + 1)


def _cut_short(error: json.JSONDecodeError, parsed: int) -> bool:
    """Whether the error may come from where the slice was cut rather than from the
    JSON: the parser ran out of text inside a string, or failed within an escape's
    length (`\\u00`) of the end."""
    return error.msg.startswith("Unterminated string") or error.pos >= parsed - 6
