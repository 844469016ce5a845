"""Turn the bundled plays into chat conversations for the quick start's fine-tuning demo.

    .venv/bin/python scripts/make_conversations.py    # writes data/conversations/plays.jsonl

(data/conversations/fragment.jsonl, the conversations that teach the model to answer a
person, is written by hand; this script does not touch it.)

A play is already a dialogue. Consecutive speeches that alternate between exactly two
characters, A B A B ..., become one conversation in the OpenAI chat format: A speaks as
the user, B as the assistant, 2 to `--max-turns` turns ending on B (a longer exchange
is cut into several), and the same exchange is taken again from B's side (B as the
user). About half the conversations open with a system line ("You are JULIET,
speaking with ROMEO."), so the model also learns to heed one.

How the Project Gutenberg texts are read:
- The Gutenberg header and footer (`*** START OF ...`, `*** END OF ...`) go, then
  everything before the first `ACT I` (title, dramatis personae). A file without an
  `ACT I` is not a play (the sonnets) and yields nothing.
- Blocks are separated by blank lines. A block whose first line is a speech heading
  (`ROMEO.`, `Ham.`, `THESEUS`, `1 Clown.`, `ANTONIO. Draw together:`) starts a speech;
  a block without one continues the speech before it (one broken by a stage direction).
  `ACT`, `SCENE` and `EPILOGUE` lines end a scene: no conversation crosses them.
- Stage directions (`[Exit.]`, `[Aside.] ...`, `_Enter Romeo._`) are removed wherever
  they stand.
- Abbreviated headings are spelled out from the dramatis personae when exactly one
  name there starts with them (Hamlet's `Ber.` -> BERNARDO); names are upper case.
- Group speakers (ALL, BOTH, CITIZENS, `Ros. and Guil.`) take part in no conversation.
- A speech's lines are joined with single spaces: the files wrap prose at ~70 columns,
  so their newlines carry no meaning a model should learn, and one line per turn
  matches the hand-written conversations in data/conversations/fragment.jsonl.
- A speech over `--max-chars` is cut after its last whole sentence that fits; one that
  cannot keep at least a quarter of the limit that way ends the exchange instead.
- A conversation identical to an earlier one is dropped (short exchanges repeat).

Deterministic: plays in file-name order, conversations in the order they are spoken,
the same input gives the same bytes. The output is written atomically.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fragment_llm.errors import FragmentError, InputDataError
from fragment_llm.safety.files import atomic_write_text, make_dirs, read_capped
from fragment_llm.safety.text import sanitize_prompt

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RAW = ROOT / "data" / "raw"
DEFAULT_OUT = ROOT / "data" / "conversations" / "plays.jsonl"
MAX_PLAY_BYTES = 16 << 20  # the longest play is under 200 kB

GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.M | re.I)
FIRST_ACT = re.compile(r"^[ \t]*ACT[ \t]+(I|1)\b", re.M | re.I)
SCENE_BREAK = re.compile(r"^(ACT|SCENE)([ \t]+[IVXLC\d]+\b|\.)|^(EPILOGUE|THE END)\.?$", re.I)
# Within one paragraph: `[...]` (the texts' typos include `{...]`, and a `[` whose `]`
# never comes), or `_..._` (italics, in other editions).
STAGE_DIRECTION = re.compile(r"[\[{][^\[\]{}]*(?:[\]}]|\Z)|(?<!\w)_[^_]+_(?!\w)")
# What remains before a `]` without its `[`: the end of a direction begun a paragraph ago.
DIRECTION_TAIL = re.compile(r"\A.*[\]}]", re.S)
BLOCK_BREAK = re.compile(r"\n[ \t]*\n")
# `ROMEO.`, `Lady Capulet.`, `THESEUS`, `1 Clown.`, `P. King.`, `APPARITION.--`
HEADING = re.compile(r"(?P<name>(?:[1-3] )?[A-Za-z][A-Za-z'. ]{0,40}?)(?P<dot>\.)?(?:--)?")
INLINE_HEADING = re.compile(r"(?P<name>[A-Z][A-Z' ]{1,40})\.\s+(?P<text>\S.*)")
ROMAN_NUMERAL = re.compile(r"[IVXLC]+")
SENTENCE_END = re.compile(r"[.!?](?:['\")]|--)?(?=\s|$)")
ORDINALS = {"1": "FIRST", "2": "SECOND", "3": "THIRD", "I": "FIRST"}
SMALL_WORDS = {"and", "of"}
GROUPS = {"ALL", "ATTENDANTS", "BOTH", "CHORUS", "CITIZENS", "DANES", "FAIRIES", "GENTLEMEN",
          "LORDS", "MARINERS", "NYMPHS", "OFFICERS", "OTHERS", "PLAYERS", "REAPERS", "SENATORS",
          "SERVANTS", "SOLDIERS", "SONG", "WITCHES"}
# Abbreviations the dramatis personae cannot spell out (they list "A Captain", not a name).
ABBREVIATIONS = {"CAPT": "CAPTAIN", "GENT": "GENTLEMAN", "MESS": "MESSENGER", "SERV": "SERVANT",
                 "PRO": "PROLOGUE", "FIRST PLAY": "FIRST PLAYER", "P. KING": "PLAYER KING",
                 "P. QUEEN": "PLAYER QUEEN"}


@dataclass(frozen=True)
class Speech:
    speaker: str  # upper case, abbreviations spelled out: "LADY MACBETH", "BERNARDO"
    text: str  # one line, never empty, stage directions removed


@dataclass(frozen=True)
class Conversation:
    turns: tuple[Speech, ...]  # user, assistant, user, ..., assistant

    def record(self, with_system: bool) -> dict[str, list[dict[str, str]]]:
        user, assistant = self.turns[0].speaker, self.turns[1].speaker
        messages = [{"role": "system", "content": f"You are {assistant}, speaking with {user}."}
                    ] if with_system else []
        messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": turn.text}
                     for i, turn in enumerate(self.turns)]
        return {"messages": messages}


@dataclass(frozen=True)
class Limits:
    max_chars: int = 600
    max_turns: int = 8


# ----------------------------------------------------------------------- reading a play


def read_play(path: Path) -> str:
    data = read_capped(path, MAX_PLAY_BYTES, InputDataError)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputDataError(f"{path} is not UTF-8 (byte {exc.start})",
                             hint="convert it to UTF-8, or move it out of the folder") from None
    return sanitize_prompt(text)  # \r\n -> \n, controls and bidi characters gone, NFC


def without_boilerplate(text: str) -> str:
    """The text between Project Gutenberg's start and end markers, if it has them."""
    if start := GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := GUTENBERG_END.search(text):
        text = text[:end.start()]
    return text


def personae_and_body(text: str) -> tuple[set[str], str] | None:
    """The one-word names of the dramatis personae, and the play from `ACT I` on;
    None for a text without an `ACT I`."""
    act = FIRST_ACT.search(text)
    if act is None:
        return None
    names = {re.split(r"[,}]", line)[0].strip(" .").upper()
             for line in text[:act.start()].splitlines()}
    personae = {name for name in names if re.fullmatch(r"[A-Z']{2,}", name)} - GROUPS
    return personae, text[act.start():]


# ------------------------------------------------------------------------ speech headings


def confident_heading(line: str) -> str | None:
    """The speaker a line names when it can only be a heading: all capitals (`THESEUS`),
    or capitalised words ending in a period (`Lady Capulet.`). `None` otherwise."""
    match = HEADING.fullmatch(line)
    if match is None:
        return None
    name = match["name"].strip(" .")
    words = name.split()
    if not words or len(words) > 5 or len(name) < 2 or ROMAN_NUMERAL.fullmatch(name):
        return None
    if name == name.upper() and any(c.isalpha() for c in name):
        return name
    if match["dot"] and all(w[0].isupper() or w[0].isdigit() or w in SMALL_WORDS
                            for w in words):
        return name
    return None


def heading(line: str, known: set[str]) -> tuple[str, str] | None:
    """(speaker as written, text after it on the same line) if `line` opens a speech.

    `known` holds the play's confident headings, in their upper-case form: they also
    recognise a heading without its period (`Lady Capulet`) or with text after it.
    """
    if name := confident_heading(line):
        return name, ""
    if (match := HEADING.fullmatch(line)) and normal_name(match["name"]) in known:
        return match["name"].strip(" ."), ""
    if (match := INLINE_HEADING.fullmatch(line)) and normal_name(match["name"]) in known:
        return match["name"], match["text"]
    return None


def normal_name(name: str) -> str:
    """`Lady  Montague.` -> LADY MONTAGUE, `1 Clown` -> FIRST CLOWN."""
    words = name.strip(" .").upper().split()
    if len(words) > 1 and words[0] in ORDINALS:
        words[0] = ORDINALS[words[0]]
    return " ".join(words)


def spelled_out(name: str, personae: set[str]) -> str:
    """`HAM` -> HAMLET when exactly one of the dramatis personae starts with it,
    `CAPT` -> CAPTAIN from the table of common abbreviations."""
    if name in ABBREVIATIONS:
        return ABBREVIATIONS[name]
    if " " in name or name in personae:
        return name
    matches = [person for person in personae if person.startswith(name)]
    return matches[0] if len(matches) == 1 and len(name) >= 3 else name


def is_group(name: str) -> bool:
    words = name.split()
    return (" AND " in f" {name} " or words[0] in ("ALL", "BOTH") or name in GROUPS
            or re.search(r"[A-Z]{3,}\. [A-Z]", name) is not None)  # "VARRO. CLAUDIUS"


# ------------------------------------------------------------------------- speeches


def without_directions(paragraph: str) -> str:
    """`'ROMEO.\\n[Aside.] Peace!'` -> `'ROMEO.\\n  Peace!'`: stage directions go, and
    with them the rest of a paragraph whose direction is never closed."""
    removed = 1
    while removed:  # innermost first: `[Enter [a] Boy]`
        paragraph, removed = STAGE_DIRECTION.subn(" ", paragraph)
    return DIRECTION_TAIL.sub(" ", paragraph)


def scenes_of(body: str, personae: set[str]) -> list[list[Speech]]:
    """The play's speeches, scene by scene, in the order they are spoken."""
    blocks = [cleaned.split("\n") for paragraph in BLOCK_BREAK.split(body)
              if (cleaned := without_directions(paragraph).strip())]
    known = {normal_name(name) for lines in blocks
             if (name := confident_heading(lines[0].strip())) and len(lines) > 1}
    scenes: list[list[tuple[str, list[str]]]] = [[]]
    for lines in blocks:
        first = lines[0].strip()
        if SCENE_BREAK.match(first):
            scenes.append([])
        elif opened := heading(first, known):
            speaker = spelled_out(normal_name(opened[0]), personae)
            scenes[-1].append((speaker, [opened[1], *lines[1:]]))
        elif scenes[-1]:  # the speech goes on after a stage direction
            scenes[-1][-1][1].extend(lines)
    return [merged(scene) for scene in scenes if scene]


def merged(scene: list[tuple[str, list[str]]]) -> list[Speech]:
    """One Speech per turn: a speaker's speeches with nothing said between are one."""
    speeches: list[Speech] = []
    for speaker, lines in scene:
        text = " ".join(" ".join(lines).split())
        if not text:
            continue
        if speeches and speeches[-1].speaker == speaker:
            text = f"{speeches[-1].text} {text}"
            speeches.pop()
        speeches.append(Speech(speaker, text))
    return speeches


def fitted(text: str, max_chars: int) -> str | None:
    """`text` cut after its last whole sentence within `max_chars`; None if that keeps
    less than a quarter of the limit (a long speech with hardly a full stop)."""
    if len(text) <= max_chars:
        return text
    ends = [m.end() for m in SENTENCE_END.finditer(text) if m.end() <= max_chars]
    if not ends or ends[-1] < max_chars // 4:
        return None
    return text[:ends[-1]]


# ----------------------------------------------------------------------- conversations


def alternating_runs(scene: list[Speech], max_chars: int) -> Iterator[list[Speech]]:
    """Maximal stretches in which two speakers take turns, A B A B ...

    A third speaker ends a stretch, and the next one starts with the speech before it
    (A B A C: A B A, then A C). A group speaker or a speech that cannot be fitted ends
    a stretch outright.
    """
    run: list[Speech] = []
    for speech in scene:
        text = fitted(speech.text, max_chars)
        if text is None or is_group(speech.speaker):
            yield run
            run = []
            continue
        speech = Speech(speech.speaker, text)
        if len(run) >= 2 and speech.speaker != run[-2].speaker:
            yield run
            run = [run[-1]]
        run.append(speech)
    yield run


def conversations_of(run: list[Speech], max_turns: int) -> Iterator[Conversation]:
    """A stretch cut into pieces of at most `max_turns` (even) turns, each ending on the
    assistant, from both sides: A B A B as user A, then B A B as user B. So every
    speech but the first is an assistant turn once, whoever speaks it.

    `[a1 b1 a2 b2 a3]`, max_turns 8 -> `[a1 b1 a2 b2]`, `[b1 a2 b2 a3]`.
    """
    starts = sorted([*range(0, len(run), max_turns), *range(1, len(run), max_turns)])
    for start in starts:
        piece = run[start:start + max_turns]
        piece = piece[:len(piece) - len(piece) % 2]
        if piece:
            yield Conversation(tuple(piece))


def play_conversations(text: str, limits: Limits) -> list[Conversation]:
    parsed = personae_and_body(without_boilerplate(text))
    if parsed is None:
        return []
    personae, body = parsed
    return [conversation for scene in scenes_of(body, personae)
            for run in alternating_runs(scene, limits.max_chars)
            for conversation in conversations_of(run, limits.max_turns)]


# ------------------------------------------------------------------------------ output


@dataclass(frozen=True)
class PlaySummary:
    name: str
    conversations: int
    turns: int
    bytes: int


def render(plays: dict[str, list[Conversation]]) -> tuple[str, list[PlaySummary]]:
    """The JSONL text, plays in the order given, and what each play contributed.

    About half the conversations get a system line: those whose turns hash (CRC-32) to
    an even number, so the choice depends on nothing but the conversation itself.
    """
    lines: list[str] = []
    seen: set[str] = set()
    summaries = []
    for name, conversations in plays.items():
        kept = []
        for conversation in conversations:
            key = json.dumps(conversation.record(with_system=False), ensure_ascii=False)
            if key in seen:
                continue
            seen.add(key)
            with_system = zlib.crc32(key.encode()) % 2 == 0
            kept.append((json.dumps(conversation.record(with_system), ensure_ascii=False),
                         len(conversation.turns)))
        lines += [line for line, _ in kept]
        summaries.append(PlaySummary(name, len(kept), sum(turns for _, turns in kept),
                                     sum(len(line.encode()) + 1 for line, _ in kept)))
    return "".join(f"{line}\n" for line in lines), summaries


def print_summary(summaries: list[PlaySummary], out: Path) -> None:
    print(f"{'play':<28}{'conversations':>14}{'turns':>8}{'bytes':>12}")
    for s in summaries:
        print(f"{s.name:<28}{s.conversations:>14,}{s.turns:>8,}{s.bytes:>12,}"
              + ("   (no dialogue found)" if s.conversations == 0 else ""))
    total = PlaySummary("total", *(sum(getattr(s, f) for s in summaries)
                                   for f in ("conversations", "turns", "bytes")))
    print(f"{total.name:<28}{total.conversations:>14,}{total.turns:>8,}{total.bytes:>12,}")
    print(f"wrote {out}")


def turn_chars(value: str) -> int:
    chars = int(value)
    if chars < 40:
        raise argparse.ArgumentTypeError(f"{value} is too short for a turn (40 at least)")
    return chars


def even_turns(value: str) -> int:
    turns = int(value)
    if turns < 2 or turns % 2:
        raise argparse.ArgumentTypeError(f"{value} is not an even number of turns >= 2")
    return turns


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Turn plays (Project Gutenberg text files) into user/assistant "
                    "conversations, OpenAI chat JSONL, one per line.")
    parser.add_argument("--raw", type=Path, default=DEFAULT_RAW,
                        help="folder of plays, *.txt (default: data/raw)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSONL file to write (default: data/conversations/plays.jsonl)")
    parser.add_argument("--max-chars", type=turn_chars, default=Limits.max_chars,
                        help="longest turn; longer speeches are cut at a sentence end")
    parser.add_argument("--max-turns", type=even_turns, default=Limits.max_turns,
                        help="most turns in one conversation (even)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limits = Limits(args.max_chars, args.max_turns)
    try:
        paths = sorted(args.raw.glob("*.txt"))
        if not paths:
            raise InputDataError(f"no *.txt files in {args.raw}", hint="pass --raw FOLDER")
        plays = {path.stem: play_conversations(read_play(path), limits) for path in paths}
        text, summaries = render(plays)
        make_dirs(args.out.parent)
        atomic_write_text(args.out, text)
    except FragmentError as exc:
        print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""),
              file=sys.stderr)
        return 1
    print_summary(summaries, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
