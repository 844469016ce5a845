"""Conversations for `fragment finetune --data PATH`: the hostile-input boundary.

`read_conversations(path, limits)` finds the `.jsonl` and `.json` files at `path` the
way `preprocess` finds its inputs (`data/discovery.py`: regular files only, no symlink
out of the root, a hard-linked file read once, sizes capped), reads each once
(`data/readers.py`: the sha256 recorded is of the very bytes parsed), decodes its
records within caps (`json_records.py`: a JSON array or JSON Lines, whatever the
extension) and turns each into a `Conversation`. A record is either

- OpenAI's chat format, `{"messages": [{"role": "system"|"user"|"assistant",
  "content": "..."}, ...]}`: an optional system message first, then user and assistant
  turns alternating, ending with the assistant's; or
- Alpaca's `{"instruction": ..., "input": optional, "output": ...}`: one user turn (the
  instruction, then a blank line and the input when there is one) and one assistant turn.

Keys a record or message does not need are ignored. Each content is cleaned as
`preprocess` cleans a document (`clean_content`: NFC; no control, bidi or zero-width
character) before the caps on messages and conversations apply. A record breaking a
rule is refused with a `RefusalReason` and a one-line detail safe to print, and the
others go on; a file is refused whole when it cannot be read (too large, a symlink out
of the root, not UTF-8, neither a JSON array nor JSON Lines), and the other files go
on. A conversation with the same content as an earlier one (`conversation_sha256`, in
any file or format) is refused as a duplicate. Only when no conversation is left does
reading raise `DatasetError`.

It tokenizes nothing and writes nothing: rendering through the chat template and
sharding happen downstream; `report_document` is what a caller writes as provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from fragment_llm.config import PreprocessConfig
from fragment_llm.data.cleaning import clean_text
from fragment_llm.data.discovery import Discovered, apply_caps, discover, resolve
from fragment_llm.data.processed import SKIP_REASONS, InputFile
from fragment_llm.data.readers import FileTask, Refusal, read_whole_file
from fragment_llm.errors import ConfigError, DatasetError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.finetune.json_records import (
    FileRefused,
    RecordCaps,
    RefusalReason,
    Refused,
    records,
    text_of,
)
from fragment_llm.safety.files import JsonValue
from fragment_llm.safety.text import escape_for_display
from fragment_llm.tokenizer.chat_template import Conversation, Turn

__all__ = ["ConversationLimits", "ConversationSet", "RefusalReason", "RefusedRecord",
           "SourceFile", "clean_content", "conversation_sha256", "read_conversations",
           "report_document"]

KINDS = {".jsonl": "conversations", ".json": "conversations"}  # what discovery keeps
ROLES = ("system", "user", "assistant")
MAX_LISTED_REFUSALS = 1000  # refusals kept with their detail; the counts are exact
REPORT_REFUSALS = 100  # of those, the ones report_document lists
MAX_DETAIL_CHARS = 200
REPORT_FORMAT = "fragment-conversations-report"
REPORT_VERSION = 1
HINT = ("each record needs {\"messages\": [...]} with user and assistant turns "
        "alternating and ending with the assistant's, or Alpaca's \"instruction\" and "
        "\"output\"; see docs/finetune.md")


@dataclass(frozen=True)
class ConversationLimits:
    """Caps on everything `read_conversations` reads; sane defaults for a laptop."""

    max_file_bytes: int = 256 << 20
    max_total_bytes: int = 2 << 30
    max_files: int = 10_000
    max_records: int = 2_000_000
    max_record_chars: int = 4 << 20  # a JSONL line or array element, before it is parsed
    max_message_chars: int = 32_768  # after cleaning
    max_conversation_chars: int = 262_144  # all its contents, after cleaning
    max_turns: int = 512  # user and assistant messages
    max_json_depth: int = 16

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ConfigError(f"conversation limit {field.name} must be a positive "
                                  f"integer, not {value!r}")

    @property
    def caps(self) -> RecordCaps:
        return RecordCaps(self.max_record_chars, self.max_json_depth)


@dataclass(frozen=True)
class RefusedRecord:
    source: str
    record: int  # 1-based line (JSON Lines) or element (JSON array); 0: the whole file
    reason: str  # a RefusalReason
    detail: str  # one line, safe to print


@dataclass(frozen=True)
class SourceFile:
    path: str  # the input as given, then the path below it
    sha256: str | None  # of the bytes read; None when the file was refused unread
    bytes: int
    records: int
    accepted: int
    refused_reason: str | None  # a RefusalReason when the file was refused whole


@dataclass(frozen=True)
class ConversationSet:
    conversations: tuple[Conversation, ...]  # accepted, in discovery then record order
    hashes: tuple[str, ...]  # conversation_sha256 of each: the dedup key (and the split's)
    sources: tuple[SourceFile, ...]  # in discovery order
    refused: tuple[RefusedRecord, ...]  # the first MAX_LISTED_REFUSALS
    refused_counts: dict[str, int]  # exact, by reason, sorted


# --------------------------------------------------------------------------- reading


def read_conversations(path: Path, limits: ConversationLimits = ConversationLimits(),
                       progress: ProgressFn | None = None) -> ConversationSet:
    """Every conversation in the file or folder `path`, validated and cleaned, with what
    was refused and why. Raises `DatasetError` when none is usable."""
    entries = _discover(path, limits)
    collector = _Collector(limits, progress or no_progress, entries)
    for entry in entries:
        collector.add(entry)
    found = collector.result()
    if not found.conversations:
        raise _nothing_usable(path, found)
    return found


def _discover(path: Path, limits: ConversationLimits) -> list[Discovered]:
    """The files to read and those already refused; skipped ones (another extension,
    a second hard link to a file) are left out."""
    shown = escape_for_display(str(path))
    if not os.path.lexists(path):
        raise DatasetError(f"conversation data not found: {shown}",
                           hint="pass a .jsonl or .json file, or a folder of them")
    if not resolve(path).exists():
        raise DatasetError(f"conversation data is a broken symlink: {shown}")
    try:
        config = PreprocessConfig(max_file_bytes=limits.max_file_bytes,
                                  max_total_bytes=limits.max_total_bytes,
                                  max_files=limits.max_files)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ConfigError(f"conversation limit {error['loc'][0]} out of range: "
                          f"{error['msg']}") from None
    entries = [entry for entry in apply_caps(discover([path], config, KINDS), config)
               if not (isinstance(entry, InputFile) and entry.reason in SKIP_REASONS)]
    if not entries:
        raise DatasetError(f"no .jsonl or .json file in {shown}",
                           hint="conversation files end in .jsonl (a record per line) "
                                "or .json (an array of records)")
    return entries


def _nothing_usable(path: Path, found: ConversationSet) -> DatasetError:
    by_count = sorted(found.refused_counts.items(), key=lambda item: (-item[1], item[0]))
    counts = ", ".join(f"{reason} {count:,}" for reason, count in by_count)
    first = found.refused[0]
    return DatasetError(escape_for_display(
        f"no usable conversation in {path} ({len(found.sources)} files; refused: {counts}); "
        f"first: {first.source} record {first.record}: {first.reason}: {first.detail}",
        max_chars=1000), hint=HINT)


def _source_label(root: str, relative: str) -> str:
    return str(PurePosixPath(root) / relative)


class _Collector:
    """Reads the files in order into one `ConversationSet`. A file refused whole leaves
    nothing behind but its refusal: what its earlier records added is rolled back."""

    def __init__(self, limits: ConversationLimits, progress: ProgressFn,
                 entries: list[Discovered]) -> None:
        self.limits = limits
        self.progress = progress
        self.total_bytes = sum(entry.size for entry in entries if isinstance(entry, FileTask))
        self.bytes_done = 0
        self.conversations: list[Conversation] = []
        self.hashes: list[str] = []
        self.seen: set[str] = set()
        self.sources: list[SourceFile] = []
        self.refused: list[RefusedRecord] = []
        self.counts: Counter[str] = Counter()
        self.records_read = 0

    def add(self, entry: Discovered) -> None:
        if isinstance(entry, InputFile):
            assert entry.reason is not None  # discovery gives a reason to every rejection
            self._refuse_file(_source_label(entry.root, entry.path), entry.size, None,
                              FileRefused(RefusalReason.of_file(entry.reason), entry.detail))
            return
        source = _source_label(entry.root, entry.source)
        if self.records_read >= self.limits.max_records:
            self._refuse_file(source, entry.size, None, FileRefused(
                RefusalReason.TOO_MANY_RECORDS, f"max_records={self.limits.max_records} "
                "reached before this file; not read"))
            return
        data = read_whole_file(Path(entry.path), self.limits.max_file_bytes)
        if isinstance(data, Refusal):
            self._refuse_file(source, entry.size, None,
                              FileRefused(RefusalReason.of_file(data.reason), data.detail))
        else:
            self._read_file(source, data)
        self.bytes_done += entry.size
        self.progress("reading", self.bytes_done, self.total_bytes)

    def _read_file(self, source: str, data: bytes) -> None:
        sha256 = hashlib.sha256(data).hexdigest()
        mark = (len(self.conversations), len(self.refused), self.records_read)
        counts: Counter[str] = Counter()
        try:
            for number, value in records(text_of(data), self.limits.caps):
                if self.records_read >= self.limits.max_records:
                    self._refuse(source, number, Refused(RefusalReason.TOO_MANY_RECORDS,
                                 f"reading stopped at max_records={self.limits.max_records}"),
                                 counts)
                    break
                self.records_read += 1
                self._take(source, number, value, counts)
        except FileRefused as refused:
            self._roll_back(*mark)
            self._refuse_file(source, len(data), sha256, refused)
            return
        self.counts.update(counts)
        self.sources.append(SourceFile(source, sha256, len(data), self.records_read - mark[2],
                                       len(self.conversations) - mark[0], None))

    def _take(self, source: str, number: int, value: object | Refused,
              counts: Counter[str]) -> None:
        outcome = value if isinstance(value, Refused) else _conversation_of(value, self.limits)
        if isinstance(outcome, Refused):
            self._refuse(source, number, outcome, counts)
            return
        digest = conversation_sha256(outcome)
        if digest in self.seen:
            self._refuse(source, number, Refused(RefusalReason.DUPLICATE,
                         "same conversation as an earlier record"), counts)
            return
        self.seen.add(digest)
        self.conversations.append(outcome)
        self.hashes.append(digest)

    def _refuse(self, source: str, number: int, refused: Refused,
                counts: Counter[str]) -> None:
        counts[refused.reason.value] += 1
        if len(self.refused) < MAX_LISTED_REFUSALS:
            detail = escape_for_display(refused.detail, MAX_DETAIL_CHARS)
            self.refused.append(RefusedRecord(source, number, refused.reason.value, detail))

    def _refuse_file(self, source: str, size: int, sha256: str | None,
                     refused: FileRefused) -> None:
        self.sources.append(SourceFile(source, sha256, size, 0, 0, refused.reason.value))
        self._refuse(source, 0, Refused(refused.reason, refused.detail), self.counts)

    def _roll_back(self, conversations: int, refused: int, records: int) -> None:
        self.seen.difference_update(self.hashes[conversations:])
        del self.conversations[conversations:], self.hashes[conversations:]
        del self.refused[refused:]
        self.records_read = records

    def result(self) -> ConversationSet:
        return ConversationSet(tuple(self.conversations), tuple(self.hashes),
                               tuple(self.sources), tuple(self.refused),
                               dict(sorted(self.counts.items())))


# -------------------------------------------------------------- records into turns


Message = tuple[str, str]  # (role, content as given)


def _conversation_of(record: object, limits: ConversationLimits) -> Conversation | Refused:
    """A decoded record as a conversation, checked and cleaned, or why it is refused."""
    messages = _messages_of(record)
    if isinstance(messages, Refused):
        return messages
    problem = _structure_problem(messages, limits.max_turns)
    if problem is not None:
        return problem
    cleaned = [clean_content(content) for _, content in messages]
    for number, ((role, _), text) in enumerate(zip(messages, cleaned, strict=True), start=1):
        if not text:
            return Refused(RefusalReason.EMPTY_CONTENT, f"message {number} ({role}) is "
                           "empty once cleaned")
        if len(text) > limits.max_message_chars:
            return Refused(RefusalReason.MESSAGE_TOO_LONG, f"message {number} ({role}) has "
                           f"{len(text):,} characters; max_message_chars is "
                           f"{limits.max_message_chars:,}")
    total = sum(map(len, cleaned))
    if total > limits.max_conversation_chars:
        return Refused(RefusalReason.CONVERSATION_TOO_LONG, f"{total:,} characters; "
                       f"max_conversation_chars is {limits.max_conversation_chars:,}")
    system = cleaned[0] if messages[0][0] == "system" else None
    turns = [Turn("user" if role == "user" else "assistant", text)
             for (role, _), text in zip(messages, cleaned, strict=True) if role != "system"]
    return Conversation(system, turns)


def clean_content(text: str) -> str:
    """A message as fine-tuning sees it: cleaned like a preprocessed document (NFC;
    control, bidi and zero-width characters removed; no trailing spaces; blank-line runs
    collapsed to one), then stripped of whitespace at both ends."""
    return clean_text(text)[0].strip()


def _messages_of(record: object) -> list[Message] | Refused:
    if not isinstance(record, dict):
        return Refused(RefusalReason.BAD_RECORD, f"a JSON {_json_type(record)}, not an object")
    if "messages" in record:
        return _chat_messages(record["messages"])
    if "instruction" in record:
        return _alpaca_messages(record)
    return Refused(RefusalReason.BAD_RECORD, "neither a \"messages\" list nor an Alpaca "
                   "\"instruction\"")


def _chat_messages(messages: object) -> list[Message] | Refused:
    """OpenAI's `messages`: objects with a string `role` and a string `content`."""
    if not isinstance(messages, list):
        return Refused(RefusalReason.BAD_RECORD, f"\"messages\" is a JSON "
                       f"{_json_type(messages)}, not an array")
    found: list[Message] = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            return Refused(RefusalReason.BAD_RECORD, f"message {number} is a JSON "
                           f"{_json_type(message)}, not an object")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return Refused(RefusalReason.BAD_RECORD, f"message {number} needs a string "
                           f"\"role\" and a string \"content\" (has {_json_type(role)} and "
                           f"{_json_type(content)})")
        if role not in ROLES:
            return Refused(RefusalReason.UNKNOWN_ROLE, f"message {number} has role "
                           f"{role[:40]!r}; roles are {', '.join(ROLES)}")
        found.append((role, content))
    return found


def _alpaca_messages(record: dict[str, object]) -> list[Message] | Refused:
    """Alpaca's instruction, optional input and output as one user and one assistant turn."""
    texts = []
    for name in ("instruction", "input", "output"):
        value = record.get(name)
        if name == "input" and value is None:  # absent or null: no input
            value = ""
        if not isinstance(value, str):
            problem = f"a JSON {_json_type(value)}, not a string" if name in record else "missing"
            return Refused(RefusalReason.BAD_RECORD, f"Alpaca field \"{name}\" is {problem}")
        texts.append(value)
    instruction, extra, output = texts
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [("user", prompt), ("assistant", output)]


def _structure_problem(messages: list[Message], max_turns: int) -> Refused | None:
    """An optional system message first, then user, assistant, user, ..., assistant."""
    systems = [number for number, (role, _) in enumerate(messages, start=1) if role == "system"]
    if len(systems) > 1:
        return Refused(RefusalReason.SEVERAL_SYSTEM_MESSAGES, f"{len(systems)} system "
                       f"messages (messages {', '.join(map(str, systems[:5]))}); at most one")
    if systems and systems[0] != 1:
        return Refused(RefusalReason.SYSTEM_NOT_FIRST, f"message {systems[0]} is the system "
                       "message; it must come first")
    offset = len(systems)
    turns = len(messages) - offset
    if turns > max_turns:
        return Refused(RefusalReason.TOO_MANY_TURNS, f"{turns:,} turns; max_turns is "
                       f"{max_turns:,}")
    for index, (role, _) in enumerate(messages[offset:]):
        expected = ("user", "assistant")[index % 2]
        if role != expected:
            return Refused(RefusalReason.NOT_ALTERNATING, f"message {offset + index + 1} is "
                           f"{role}; expected {expected} (turns alternate, user first)")
    if turns == 0 or messages[-1][0] != "assistant":
        return Refused(RefusalReason.NO_ASSISTANT_TURN, "no assistant turn" if turns < 2
                       else "ends with a user turn; the last turn must be the assistant's")
    return None


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type: `{} -> 'object'`, `None -> 'null'`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string"}.get(type(value), "number")


# ------------------------------------------------------------ identity and report


def conversation_sha256(conversation: Conversation) -> str:
    """The sha256 of a conversation's canonical JSON (system prompt, then each turn's
    role and text): the same conversation from any file or format has the same hash."""
    canonical = {"system": conversation.system,
                 "turns": [[turn.role, turn.text] for turn in conversation.turns]}
    text = json.dumps(canonical, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def report_document(found: ConversationSet) -> dict[str, JsonValue]:
    """What was read, as JSON for provenance: every input with its sha256 and size
    (sorted by path), the accepted conversations' count and combined hash, the refusal
    counts by reason and the first refusals. The same inputs give the same document."""
    sources: list[JsonValue] = [
        {"path": item.path, "sha256": item.sha256, "bytes": item.bytes,
         "records": item.records, "accepted": item.accepted,
         "refused_reason": item.refused_reason}
        for item in sorted(found.sources, key=lambda item: item.path)]
    refused: list[JsonValue] = [
        {"source": item.source, "record": item.record, "reason": item.reason,
         "detail": item.detail} for item in found.refused[:REPORT_REFUSALS]]
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "conversations": len(found.conversations),
        # In order: the same conversations in another order are another training set.
        "conversations_sha256": hashlib.sha256(
            "\n".join(found.hashes).encode("ascii")).hexdigest(),
        "sources": sources,
        "refused_counts": dict(found.refused_counts),
        "refused": refused,
    }
