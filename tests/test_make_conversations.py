"""scripts/make_conversations.py, and the conversations committed in data/conversations/.

The script turns plays into chat conversations; these tests run it on a small play
written here (with the Gutenberg boilerplate, a third speaker, stage directions) and
check what it yields, then hold every committed conversation file to the rules the
fine-tuning input boundary applies: roles that alternate and end on the assistant, no
empty or control-character content, no duplicates. The tests live at the top of tests/
because tests/ mirrors the package and scripts/ is not part of it.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_conversations.py"
CONVERSATIONS = ROOT / "data" / "conversations"
COMMITTED = ["plays.jsonl", "fragment.jsonl"]
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_conversations", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


mc = load_script()

PLAY = """\
The Project Gutenberg EBook of The Test of Words, by Nobody

*** START OF THIS PROJECT GUTENBERG EBOOK THE TEST OF WORDS ***

THE TEST OF WORDS

PERSONS REPRESENTED

Alonzo, a lord.
Bertram, his friend.
Gaoler.

ACT I.

SCENE I. A hall.

[Enter Alonzo and Bertram.]

Alo.
Good morrow, Bertram.

BERTRAM.
Good morrow, my lord. [Aside.] He looks
pale to-day.

Alo.
I slept but ill.

BERTRAM.
I am sorry for it.

[Enter Gaoler.]

GAOLER.
News, my lords!

Alo.
What news?

GAOLER.
_Aside._ The king is come.
He waits below.

[Exit Gaoler.]

SCENE II. A garden.

BERTRAM.
A fair garden.

Alo.
Fair indeed.

*** END OF THIS PROJECT GUTENBERG EBOOK THE TEST OF WORDS ***

GAOLER.
This line is licence text, not the play.
"""

EXPECTED = [  # (user, assistant, ...) texts, in the order the script writes them
    ("Good morrow, Bertram.", "Good morrow, my lord. He looks pale to-day.",
     "I slept but ill.", "I am sorry for it."),
    ("Good morrow, my lord. He looks pale to-day.", "I slept but ill."),
    ("I am sorry for it.", "News, my lords!"),
    ("News, my lords!", "What news?"),
    ("What news?", "The king is come. He waits below."),
    ("A fair garden.", "Fair indeed."),
]
SPEAKER = {"Good morrow, Bertram.": "ALONZO", "I slept but ill.": "ALONZO",
           "What news?": "ALONZO", "Fair indeed.": "ALONZO",
           "Good morrow, my lord. He looks pale to-day.": "BERTRAM",
           "I am sorry for it.": "BERTRAM", "A fair garden.": "BERTRAM",
           "News, my lords!": "GAOLER", "The king is come. He waits below.": "GAOLER"}


def make(tmp_path: Path, play: str = PLAY, *args: str) -> list[dict[str, list[dict[str, str]]]]:
    raw = tmp_path / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "test_play.txt").write_text(play, encoding="utf-8")
    out = tmp_path / "out" / "plays.jsonl"
    assert mc.main(["--raw", str(raw), "--out", str(out), *args]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def turns(record: dict[str, list[dict[str, str]]]) -> tuple[str, ...]:
    return tuple(m["content"] for m in record["messages"] if m["role"] != "system")


# ------------------------------------------------------------------- the script, on a play


def test_a_play_becomes_the_conversations_its_two_speaker_exchanges_hold(tmp_path):
    assert [turns(record) for record in make(tmp_path)] == EXPECTED


def test_the_first_speaker_is_the_user_and_a_system_line_names_both(tmp_path):
    records = make(tmp_path)
    for record in records:
        roles = [m["role"] for m in record["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        said = turns(record)
        if record["messages"][0]["role"] == "system":
            assert record["messages"][0]["content"] == (
                f"You are {SPEAKER[said[1]]}, speaking with {SPEAKER[said[0]]}.")
    assert 0 < sum(r["messages"][0]["role"] == "system" for r in records) < len(records)


def test_stage_directions_and_boilerplate_are_gone(tmp_path):
    text = " ".join(m["content"] for record in make(tmp_path) for m in record["messages"])
    for gone in ("Enter", "Exit", "Aside", "[", "_", "licence", "Gutenberg", "PERSONS"):
        assert gone not in text


def test_the_output_is_the_same_bytes_every_time(tmp_path):
    make(tmp_path / "a")
    make(tmp_path / "b")
    first, second = (tmp_path / d / "out" / "plays.jsonl" for d in ("a", "b"))
    assert first.read_bytes() == second.read_bytes()


def test_a_long_exchange_is_cut_into_conversations_of_at_most_max_turns(tmp_path):
    lines = [f"{'ALONZO' if i % 2 == 0 else 'BERTRAM'}.\nLine number {i}.\n" for i in range(9)]
    play = "ACT I.\n\n" + "\n".join(lines)
    got = [turns(record) for record in make(tmp_path, play, "--max-turns", "4")]
    assert got == [tuple(f"Line number {i}." for i in range(start, start + 4))
                   for start in (0, 1, 4, 5)]


def test_a_speech_over_the_limit_is_cut_at_a_sentence_end_or_ends_the_exchange():
    assert mc.fitted("Short.", 50) == "Short."
    assert mc.fitted("First sentence here. Second one, which runs past the limit.", 30) \
        == "First sentence here."
    assert mc.fitted("A. " + "word " * 20, 40) is None  # keeps too little to be worth it


def test_a_text_without_an_act_is_not_read_as_a_play(tmp_path):
    assert make(tmp_path, "SONNET.\nShall I compare thee to a summer's day?\n") == []


def test_abbreviated_headings_are_spelled_out_from_the_persons_of_the_play():
    personae = {"HAMLET", "HORATIO", "BERNARDO"}
    assert [mc.spelled_out(n, personae) for n in ("HAM", "HOR", "BER", "KING", "H", "CAPT")
            ] == ["HAMLET", "HORATIO", "BERNARDO", "KING", "H", "CAPTAIN"]


@pytest.mark.parametrize(("line", "speaker"), [
    ("ROMEO.", "ROMEO"), ("Lady Capulet.", "Lady Capulet"), ("THESEUS", "THESEUS"),
    ("1 Clown.", "1 Clown"), ("APPARITION.--", "APPARITION"), ("II.", None),
    ("Farewell, my lord.", None), ("The raging rocks", None)])
def test_what_counts_as_a_speech_heading(line, speaker):
    assert mc.confident_heading(line) == speaker


def test_the_script_runs_from_the_command_line_and_says_what_it_wrote(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "p.txt").write_text(PLAY, encoding="utf-8")
    done = subprocess.run([sys.executable, str(SCRIPT), "--raw", str(tmp_path / "raw"),
                           "--out", str(tmp_path / "c.jsonl")], capture_output=True, text=True,
                          check=True)
    assert re.search(r"^p\s+6\s+14\s", done.stdout, re.M)
    assert "--max-turns" in subprocess.run([sys.executable, str(SCRIPT), "--help"],
                                           capture_output=True, text=True).stdout


@pytest.mark.parametrize("args", [["--max-turns", "3"], ["--max-turns", "0"],
                                  ["--max-chars", "10"]])
def test_limits_that_make_no_sense_are_refused(args):
    with pytest.raises(SystemExit):
        mc.parse_args(args)


def test_nested_and_unclosed_stage_directions_take_no_speech_with_them():
    assert mc.without_directions("Speak [Enter [a] Boy] on.").split() == ["Speak", "on."]
    assert mc.without_directions("Speak on. [Enter a Boy,\nand more").split() == ["Speak", "on."]
    assert mc.without_directions("who enters here.]\nSpeak on.").split() == ["Speak", "on."]


@given(st.lists(st.sampled_from("ABC"), max_size=30), st.sampled_from([2, 4, 8]))
def test_every_conversation_is_a_stretch_of_two_speakers_taking_turns(speakers, max_turns):
    scene = mc.merged([(s, [f"speech {i}"]) for i, s in enumerate(speakers)])
    for run in mc.alternating_runs(scene, max_chars=600):
        for conversation in mc.conversations_of(run, max_turns):
            said = conversation.turns
            assert 2 <= len(said) <= max_turns and len(said) % 2 == 0
            assert len({said[0].speaker, said[1].speaker}) == 2
            assert all(t.speaker == said[i % 2].speaker for i, t in enumerate(said))
            positions = [scene.index(t) for t in said]  # a contiguous slice of the scene
            assert positions == list(range(positions[0], positions[0] + len(said)))


# ------------------------------------------------------------ the committed conversations


def committed(name: str) -> list[list[dict[str, str]]]:
    text = (CONVERSATIONS / name).read_bytes().decode("utf-8")
    assert text.endswith("\n") and "\n\n" not in text
    records = [json.loads(line) for line in text.splitlines()]
    assert all(set(record) == {"messages"} for record in records)
    return [record["messages"] for record in records]


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_conversations_follow_the_rules(name):
    for messages in committed(name):
        roles = [m["role"] for m in messages]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and body, messages
        for message in messages:
            assert set(message) == {"role", "content"}
            content = message["content"]
            assert content and content == content.strip(), messages
            assert not CONTROL.search(content) and "<|" not in content, messages
            assert unicodedata.normalize("NFC", content) == content


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_files_hold_no_duplicate_conversation(name):
    keys = [json.dumps([m for m in messages if m["role"] != "system"])
            for messages in committed(name)]
    assert len(keys) == len(set(keys))


def test_committed_play_conversations_are_what_the_script_makes(tmp_path):
    out = tmp_path / "plays.jsonl"
    assert mc.main(["--out", str(out)]) == 0
    assert out.read_bytes() == (CONVERSATIONS / "plays.jsonl").read_bytes()


def test_committed_files_are_the_promised_size():
    plays, fragment = committed("plays.jsonl"), committed("fragment.jsonl")
    assert len(plays) >= 2000 and (CONVERSATIONS / "plays.jsonl").stat().st_size < 3 << 20
    assert all(len(m["content"]) <= 600 for messages in plays for m in messages)
    assert 120 <= len(fragment) <= 250
