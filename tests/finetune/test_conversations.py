"""The conversation data boundary of `fragment finetune`: each format, each refusal with
its record number, cleaning, hostile files, discovery, duplicates, the report, and a
round-trip property over random conversations."""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fragment_llm.data.processed import SKIP_REASONS, Reason
from fragment_llm.errors import ConfigError, DatasetError
from fragment_llm.finetune.conversations import (
    MAX_LISTED_REFUSALS,
    ConversationLimits,
    ConversationSet,
    RefusalReason,
    clean_content,
    conversation_sha256,
    read_conversations,
    report_document,
)
from fragment_llm.safety.files import dump_json
from fragment_llm.tokenizer.chat_template import Conversation, Turn

GOOD = {"messages": [{"role": "user", "content": "Who are you?"},
                     {"role": "assistant", "content": "A small model."}]}
GOOD_CONVERSATION = Conversation(None, [Turn("user", "Who are you?"),
                                        Turn("assistant", "A small model.")])


def chat(*turns: tuple[str, str], **extra: object) -> dict[str, object]:
    return {"messages": [{"role": role, "content": content} for role, content in turns],
            **extra}


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records),
                    encoding="utf-8")
    return path


def read(path: Path, **limits: int) -> ConversationSet:
    return read_conversations(path, ConversationLimits(**limits))


def refusals(found: ConversationSet) -> list[tuple[int, str]]:
    return [(item.record, item.reason) for item in found.refused]


# ------------------------------------------------------------------------- formats


def test_openai_jsonl_keeps_the_system_prompt_and_ignores_extra_keys(tmp_path):
    record = chat(("system", "Answer briefly."), ("user", "Hi"), ("assistant", "Hello."),
                  ("user", "Bye"), ("assistant", "Goodbye."), id="x1", model="m")
    record["messages"][1]["name"] = "ann"  # type: ignore[index]
    found = read(write_jsonl(tmp_path / "chat.jsonl", [record]))
    assert found.conversations == (Conversation("Answer briefly.", [
        Turn("user", "Hi"), Turn("assistant", "Hello."),
        Turn("user", "Bye"), Turn("assistant", "Goodbye.")]),)
    assert found.refused == () and found.refused_counts == {}
    assert found.hashes == (conversation_sha256(found.conversations[0]),)


def test_alpaca_json_array_folds_a_non_empty_input_into_the_user_turn(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say bye.", "output": "Bye!"},
        {"instruction": "Say yes.", "input": None, "output": "Yes."}], indent=2))
    found = read(path)
    assert [[(turn.role, turn.text) for turn in c.turns] for c in found.conversations] == [
        [("user", "Add the numbers.\n\n2 and 3"), ("assistant", "5")],
        [("user", "Say hi."), ("assistant", "Hi!")],
        [("user", "Say bye."), ("assistant", "Bye!")],
        [("user", "Say yes."), ("assistant", "Yes.")]]
    assert all(c.system is None for c in found.conversations)


def test_alpaca_jsonl_and_a_messages_array_read_like_the_others(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q1", "output": "A1"}])
    (tmp_path / "b.json").write_text(json.dumps([chat(("user", "Q2"), ("assistant", "A2"))]))
    found = read(tmp_path)
    assert [c.turns for c in found.conversations] == [
        [Turn("user", "Q1"), Turn("assistant", "A1")],
        [Turn("user", "Q2"), Turn("assistant", "A2")]]
    assert [(s.path.rsplit("/", 1)[1], s.records, s.accepted) for s in found.sources] == [
        ("a.jsonl", 1, 1), ("b.json", 1, 1)]


def test_the_same_conversation_in_either_format_has_the_same_hash(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Who are you?", "output": "A small model."}])
    write_jsonl(tmp_path / "b.jsonl", [GOOD])
    found = read(tmp_path)
    assert found.conversations == (GOOD_CONVERSATION,)
    assert refusals(found) == [(1, "duplicate")]
    assert found.refused[0].source.endswith("b.jsonl")


# ------------------------------------------------------------------------ refusals

U, A, S = "user", "assistant", "system"
REFUSED_RECORDS = [
    (chat((U, "hi"), ("tool", "x"), (A, "yo")), "unknown_role"),
    (chat((A, "yo"), (U, "hi"), (A, "yo")), "not_alternating"),
    (chat((U, "hi"), (U, "again"), (A, "yo")), "not_alternating"),
    (chat((U, "hi")), "no_assistant_turn"),
    (chat((U, "hi"), (A, "yo"), (U, "and?")), "no_assistant_turn"),
    (chat(), "no_assistant_turn"),
    (chat((U, " \u200b\x1b \n"), (A, "yo")), "empty_content"),
    ({"instruction": "", "output": "yo"}, "empty_content"),
    (chat((U, "x" * 41), (A, "yo")), "message_too_long"),
    (chat(*[(U, "q" * 30), (A, "a" * 30)] * 2), "conversation_too_long"),
    (chat(*[(U, "q"), (A, "a")] * 3), "too_many_turns"),
    (chat((S, "one"), (S, "two"), (U, "hi"), (A, "yo")), "several_system_messages"),
    (chat((U, "hi"), (S, "late"), (A, "yo")), "system_not_first"),
    ([GOOD], "bad_record"),
    ({"messages": "hi"}, "bad_record"),
    ({"messages": [{"role": "user", "content": 5}]}, "bad_record"),
    ({"messages": [["user", "hi"]]}, "bad_record"),
    ({"instruction": "hi", "output": None}, "bad_record"),
    ({"instruction": "hi"}, "bad_record"),
    ({"instruction": "hi", "input": 3, "output": "yo"}, "bad_record"),
    ({"text": "a document"}, "bad_record"),
]


@pytest.mark.parametrize(("record", "reason"), REFUSED_RECORDS)
def test_a_record_is_refused_with_its_reason_and_line_the_others_still_count(
        tmp_path, record, reason):
    path = tmp_path / "data.jsonl"
    # Line 2 is blank: record numbers are line numbers.
    path.write_text(f"{json.dumps(GOOD)}\n\n{json.dumps(record)}\n")
    found = read(path, max_message_chars=40, max_conversation_chars=100, max_turns=4)
    assert refusals(found) == [(3, reason)]
    assert found.refused_counts == {reason: 1}
    assert found.conversations == (GOOD_CONVERSATION,)
    assert found.sources[0].records == 2 and found.sources[0].accepted == 1


@pytest.mark.parametrize(("line", "reason", "detail"), [
    ('{"messages": [}', "bad_json", "invalid JSON"),
    ('{"messages": [], "messages": []}', "bad_json", "duplicate key 'messages'"),
    ('{"instruction": "hi", "output": NaN}', "bad_json", "NaN"),
    (json.dumps(GOOD) + " {}", "bad_json", "Extra data"),
    ('{"messages": [], "x": ' + "[" * 20 + "]" * 20 + "}", "too_deep", "max_json_depth=16"),
    ('{"x": ' + "[" * 3000 + "]" * 3000 + "}", "too_deep", "max_json_depth"),
    ('{"instruction": "' + "x" * 9000 + '", "output": "y"}', "record_too_long",
     "max_record_chars is 8192"),
])
def test_a_line_that_is_not_a_safe_json_object_is_refused_alone(tmp_path, line, reason,
                                                                 detail):
    path = tmp_path / "data.jsonl"
    path.write_text(f"{json.dumps(GOOD)}\n{line}\n")
    found = read(path, max_record_chars=8192)
    assert refusals(found) == [(2, reason)]
    assert detail in found.refused[0].detail
    assert found.conversations == (GOOD_CONVERSATION,)


def test_array_elements_are_numbered_from_one_and_refused_alone(tmp_path):
    deep = {"instruction": "deep", "output": "x", "extra": json.loads("[" * 18 + "]" * 18)}
    path = tmp_path / "data.json"
    path.write_text(f"[{json.dumps(GOOD)}, 7, {json.dumps(chat((U, 'hi')))}, "
                    f'{json.dumps(deep)}, {{"instruction": "a", "output": Infinity}}]')
    found = read(path)
    assert refusals(found) == [(2, "bad_record"), (3, "no_assistant_turn"), (4, "too_deep"),
                               (5, "bad_json")]
    assert found.conversations == (GOOD_CONVERSATION,)


def test_an_array_element_longer_than_the_first_slice_is_read_whole(tmp_path):
    long_answer = "word " * 3000  # 15 000 characters: parsed from 4, 8 then 16 KiB
    path = tmp_path / "data.json"
    path.write_text(json.dumps([chat((U, "Say a lot."), (A, long_answer)), GOOD]))
    found = read(path)
    assert [c.turns[-1].text for c in found.conversations] == [long_answer.strip(),
                                                              "A small model."]


@pytest.mark.parametrize(("text", "reason", "detail"), [
    ("[" + json.dumps(GOOD) + ", {broken}]", "not_json", "element 2"),
    ("[" + json.dumps(GOOD) + " " + json.dumps(GOOD) + "]", "not_json", "expected ','"),
    ("[" + json.dumps(GOOD) + "] []", "not_json", "data after its end"),
    ("[" + json.dumps(GOOD) + ', {"x": "' + "y" * 5000 + '"}]', "record_too_long",
     "element 2"),
    ("[" * 100_000, "too_deep", "element 1"),
    ('{\n  "messages": []\n}\n', "not_json", "neither a JSON array nor JSON Lines"),
])
def test_a_file_whose_records_cannot_be_told_apart_is_refused_whole(tmp_path, text, reason,
                                                                    detail):
    write_jsonl(tmp_path / "a.jsonl", [GOOD])
    bad = tmp_path / "b.json"
    bad.write_text(text)
    found = read(tmp_path, max_record_chars=4096)
    assert refusals(found) == [(0, reason)]
    assert detail in found.refused[0].detail
    assert found.conversations == (GOOD_CONVERSATION,)  # nothing of b.json, even element 1
    assert found.sources[1].refused_reason == reason
    assert found.sources[1].sha256 == hashlib.sha256(bad.read_bytes()).hexdigest()


# ------------------------------------------------------------------------ cleaning


def test_contents_are_cleaned_like_preprocessed_documents(tmp_path):
    record = chat((S, "  Be kind.\u202e  "), (U, "Cafe\u0301\x1b[2J\u200b?\r\n\r\n\r\n\r\nOk"),
                  (A, "Oui\u2066.\x00 \t\n"))
    found = read(write_jsonl(tmp_path / "a.jsonl", [record]))
    (conversation,) = found.conversations
    assert conversation.system == "Be kind."
    assert [turn.text for turn in conversation.turns] == ["Café[2J?\n\nOk", "Oui."]
    assert unicodedata.is_normalized("NFC", conversation.turns[0].text)


def test_a_file_name_that_holds_escapes_is_shown_escaped(tmp_path):
    write_jsonl(tmp_path / "evil\x1b[2J\u202e.jsonl", [chat((U, "hi"))])
    with pytest.raises(DatasetError) as error:
        read(tmp_path)
    message = str(error.value)
    assert "\x1b" not in message and "\u202e" not in message
    assert "evil\\x1b[2J\\u202e.jsonl record 1: no_assistant_turn" in message


# ------------------------------------------------------------------- hostile files


def test_a_symlink_out_of_the_root_is_refused_and_the_rest_is_read(tmp_path):
    outside = write_jsonl(tmp_path / "secret.jsonl", [chat((U, "secret"), (A, "leak"))])
    root = tmp_path / "data"
    root.mkdir()
    write_jsonl(root / "a.jsonl", [GOOD])
    (root / "b.jsonl").symlink_to(outside)
    found = read(root)
    assert found.conversations == (GOOD_CONVERSATION,)
    assert [(r.source, r.record, r.reason) for r in found.refused] == [
        (f"{root}/b.jsonl", 0, "symlink_escapes_root")]
    assert found.sources[1].sha256 is None


def test_a_file_that_is_not_utf8_is_refused_with_the_byte_offset(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD])
    (tmp_path / "b.jsonl").write_bytes(b'{"instruction": "caf\xe9", "output": "x"}\n')
    found = read(tmp_path)
    assert refusals(found) == [(0, "invalid_utf8")]
    assert "byte 20" in found.refused[0].detail
    assert found.conversations == (GOOD_CONVERSATION,)


def test_a_file_over_the_byte_cap_is_refused_unread(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD])
    write_jsonl(tmp_path / "b.jsonl", [chat((U, "x" * 500), (A, "y"))])
    found = read(tmp_path, max_file_bytes=200)
    assert refusals(found) == [(0, "too_large")]
    assert found.sources[1].sha256 is None and found.sources[1].records == 0


def test_the_record_cap_stops_reading_and_refuses_later_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [chat((U, f"q{i}"), (A, "a")) for i in range(3)])
    write_jsonl(tmp_path / "b.jsonl", [GOOD])
    found = read(tmp_path, max_records=2)
    assert len(found.conversations) == 2
    assert refusals(found) == [(3, "too_many_records"), (0, "too_many_records")]


def test_every_file_refusal_of_discovery_and_reading_has_a_code():
    for reason in Reason:
        if reason not in SKIP_REASONS and not reason.startswith(("parquet", "nul", "binary")):
            assert RefusalReason.of_file(reason) == reason.value.replace("-", "_")


def test_limits_must_be_positive_integers():
    with pytest.raises(ConfigError, match="max_turns"):
        ConversationLimits(max_turns=0)
    with pytest.raises(ConfigError, match="max_records"):
        ConversationLimits(max_records=True)


# ---------------------------------------------------------------------- discovery


def test_a_folder_is_walked_in_order_and_other_extensions_are_ignored(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [chat((U, "b"), (A, "b"))])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.JSON").write_text(json.dumps([chat((U, "a"), (A, "a"))]))
    write_jsonl(tmp_path / "notes.txt", [chat((U, "t"), (A, "t"))])
    (tmp_path / "README.md").write_text("# data")
    os.link(tmp_path / "b.jsonl", tmp_path / "c.jsonl")  # the same file: read once
    found = read(tmp_path)
    assert [s.path for s in found.sources] == [f"{tmp_path}/b.jsonl",
                                               f"{tmp_path}/sub/a.JSON"]
    assert [c.turns[0].text for c in found.conversations] == ["b", "a"]
    assert found.refused == ()


def test_nothing_usable_raises_one_line_with_the_counts(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [chat((U, "hi"))] * 2 + [chat((A, "yo"))])
    with pytest.raises(DatasetError) as error:
        read(tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "no_assistant_turn 2, not_alternating 1" in message
    assert "a.jsonl record 1: no_assistant_turn" in message
    assert error.value.hint is not None and "assistant" in error.value.hint


def test_no_input_at_all_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="conversation data not found"):
        read(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="no .jsonl or .json file in"):
        read(tmp_path)  # an empty folder
    (tmp_path / "notes.txt").write_text(json.dumps(GOOD))
    with pytest.raises(DatasetError, match="no .jsonl or .json file in"):
        read(tmp_path / "notes.txt")


def test_refusals_are_listed_up_to_the_cap_and_counted_exactly(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + "{}\n" * (MAX_LISTED_REFUSALS + 5))
    found = read(path)
    assert len(found.refused) == MAX_LISTED_REFUSALS
    assert found.refused_counts == {"bad_record": MAX_LISTED_REFUSALS + 5}


# ------------------------------------------------------------------------- report


def test_the_report_is_deterministic_and_names_each_input_by_sha256(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [GOOD, chat((U, "hi"))])
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    (tmp_path / "c.json").write_bytes(b"\xff")
    first, second = (dump_json(report_document(read(tmp_path))) for _ in range(2))
    assert first == second
    report = json.loads(first)
    assert [(s["path"].rsplit("/", 1)[1], s["sha256"]) for s in report["sources"]] == [
        (name, hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
        for name in ("a.json", "b.jsonl", "c.json")]
    assert report["conversations"] == 2
    assert report["refused_counts"] == {"invalid_utf8": 1, "no_assistant_turn": 1}
    assert [(r["record"], r["reason"]) for r in report["refused"]] == [
        (2, "no_assistant_turn"), (0, "invalid_utf8")]


# ----------------------------------------------------------------------- property

CONTENT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(
    lambda text: clean_content(text) != "")
CONVERSATIONS = st.lists(st.tuples(st.none() | CONTENT,
                                   st.lists(st.tuples(CONTENT, CONTENT), min_size=1,
                                            max_size=3)), max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                                 HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(CONVERSATIONS)
def test_random_valid_conversations_read_back_cleaned_and_in_order(tmp_path, drawn):
    records, expected = [], []
    for index, (system, exchanges) in enumerate(drawn):
        exchanges = [(f"#{index} {exchanges[0][0]}", exchanges[0][1]), *exchanges[1:]]
        messages = [(S, system)] if system is not None else []
        messages += [message for user, assistant in exchanges
                     for message in ((U, user), (A, assistant))]
        records.append(chat(*messages))
        expected.append(Conversation(
            None if system is None else clean_content(system),
            [Turn(role, clean_content(text)) for role, text in messages if role != S]))
    path = write_jsonl(tmp_path / "random.jsonl", [GOOD, *records])
    found = read(path)
    assert found.conversations == (GOOD_CONVERSATION, *expected)
    assert found.refused == ()
    assert all(unicodedata.is_normalized("NFC", turn.text)
               for conversation in found.conversations for turn in conversation.turns)
