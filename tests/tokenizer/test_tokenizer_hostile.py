"""Hostile tokenizer files: one case per loader rule, each a clean TokenizerError.

Every case starts from a valid file and breaks one rule; the error must name the rule
and the file, and never be a raw exception (RecursionError, KeyError, ValueError...).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import fragment_llm.tokenizer.tokenizer as tokenizer_module
from fragment_llm.errors import TokenizerError
from fragment_llm.tokenizer.tokenizer import Tokenizer

# A real (tiny) tokenizer: merges "ab" (256), "abc" (257), "dd" (258).
VALID_MERGES = [(97, 98), (256, 99), (100, 100)]


@pytest.fixture(scope="module")
def valid_doc() -> dict[str, Any]:
    tok = Tokenizer.from_merges(VALID_MERGES)
    return json.loads(tok._canonical_json())


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def refuse(path: Path, rule: str) -> None:
    with pytest.raises(TokenizerError) as info:
        Tokenizer.load(path)
    assert rule in info.value.message, info.value.message
    assert str(path) in info.value.message


def test_the_valid_file_loads(valid_doc, tmp_path):
    tok = Tokenizer.load(write(tmp_path, json.dumps(valid_doc)))
    assert tok.merges == VALID_MERGES and tok.vocab_size == 256 + 3 + 5
    assert tok.decode(tok.encode("abcdd")) == "abcdd"


def mutate(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], Any]:
    def apply(doc: dict[str, Any]) -> dict[str, Any]:
        doc = copy.deepcopy(doc)
        change(doc)
        return doc

    return apply


def set_key(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    return mutate(lambda doc: doc.__setitem__(key, value))


def set_special(name: str, value: int) -> Callable[[dict[str, Any]], Any]:
    return mutate(lambda doc: doc["special_tokens"].__setitem__(name, value))


CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "extra key": (set_key("surprise", 1), "unknown key 'surprise'"),
    "missing key": (mutate(lambda doc: doc.pop("merges")), "invalid field merges"),
    "wrong format": (set_key("format", "minbpe"), "wrong format 'minbpe'"),
    "missing format": (mutate(lambda doc: doc.pop("format")), "wrong format None"),
    "wrong version": (set_key("version", 2), "unsupported version 2"),
    "version as bool": (set_key("version", True), "unsupported version True"),
    "version as string": (set_key("version", "1"), "unsupported version '1'"),
    "not an object": (lambda doc: [doc], "expected a JSON object"),
    "merge uses a later id": (set_key("merges", [[97, 98], [257, 99], [100, 100]]),
                              "merge 1 (257, 99) uses an id not defined before it"),
    "merge uses its own id": (set_key("merges", [[97, 98], [256, 257], [100, 100]]),
                              "merge 1 (256, 257) uses an id not defined before it"),
    "negative id": (set_key("merges", [[97, -1], [256, 99], [100, 100]]),
                    "merge 0 (97, -1) uses an id not defined before it"),
    "huge id": (set_key("merges", [[97, 10**30], [256, 99], [100, 100]]),
                "uses an id not defined before it"),
    "duplicate byte strings": (set_key("merges", [[97, 98], [256, 99], [97, 98]]),
                               "duplicate byte string"),
    "merge of three ids": (set_key("merges", [[97, 98, 99], [256, 99], [100, 100]]),
                           "invalid field merges.0"),
    "id as float": (set_key("merges", [[97, 98.0], [256, 99], [100, 100]]),
                    "invalid field merges.0.1"),
    "id as bool": (set_key("merges", [[97, True], [256, 99], [100, 100]]),
                   "invalid field merges.0.1"),
    "id as string": (set_key("merges", [["97", 98], [256, 99], [100, 100]]),
                     "invalid field merges.0.0"),
    "merges as a string": (set_key("merges", "97 98"), "invalid field merges"),
    "vocab_size as string": (set_key("vocab_size", "264"), "invalid field vocab_size"),
    "vocab_size inconsistent": (set_key("vocab_size", 9000), "vocab_size 9000 does not match"),
    "special ids not contiguous": (set_special("<|end|>", 270),
                                   "special token <|end|> must have id 263"),
    "special ids swapped": (mutate(lambda doc: doc["special_tokens"].update(
        {"<|user|>": 262, "<|assistant|>": 261})), "must have id"),
    "special id inside the merges": (set_special("<|endoftext|>", 257), "must have id 259"),
    "special token missing": (mutate(lambda doc: doc["special_tokens"].pop("<|end|>")),
                              "special tokens must be exactly"),
    "special token added": (set_special("<|tool|>", 264), "special tokens must be exactly"),
    "unknown pattern name": (set_key("pattern_name", "gpt5"), "unknown split pattern 'gpt5'"),
    "named pattern altered": (set_key("pattern", r"\S+|\s+"),
                              "does not match the named pattern 'gpt4'"),
    "custom pattern does not compile": (
        mutate(lambda doc: doc.update(pattern_name="custom", pattern="(unclosed")),
        "does not compile"),
    "catastrophic custom pattern": (
        mutate(lambda doc: doc.update(pattern_name="custom", pattern=r"(?:a|aa)+b|[\s\S]")),
        "pathological-input probe"),
    "custom pattern with a huge repeat": (
        mutate(lambda doc: doc.update(pattern_name="custom", pattern=r"a{100000000}|[\s\S]")),
        "counted repeats"),
    "custom pattern recursing": (
        mutate(lambda doc: doc.update(pattern_name="custom", pattern=r"(?:a|(?R))+b|[\s\S]")),
        "pathological-input probe"),
    "custom pattern nested too deeply": (
        mutate(lambda doc: doc.update(pattern_name="custom", pattern="(" * 1500 + ")" * 1500)),
        "does not compile"),
    "custom pattern skipping text": (
        mutate(lambda doc: doc.update(pattern_name="custom", pattern=r"\w+")),
        "does not match every character"),
    "custom pattern too long": (
        mutate(lambda doc: doc.update(pattern_name="custom", pattern="a" * 5000)),
        "invalid field pattern"),
    "training with unknown key": (set_key("training", {"config": {}, "documents": 1,
                                                       "chars": 1, "stop_reason": "x",
                                                       "who": "me"}),
                                  "unknown key 'training.who'"),
    "training with a bad hash": (set_key("training", {"config": {}, "documents": 1,
                                                      "chars": 1, "stop_reason": "x",
                                                      "corpus_sha256": "not-a-hash"}),
                                 "invalid field training.corpus_sha256"),
    "training config out of range": (set_key("training", {"config": {"vocab_size": 1},
                                                          "documents": 1, "chars": 1,
                                                          "stop_reason": "x"}),
                                     "invalid field training.config.vocab_size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_loader_rule_refuses_a_hostile_file(valid_doc, tmp_path, case):
    change, rule = CASES[case]
    refuse(write(tmp_path, json.dumps(change(valid_doc))), rule)


@pytest.mark.parametrize(("content", "rule"), [
    ("[" * 100_000, "JSON nested deeper than 8 levels"),
    ('{"a": ' * 50_000, "JSON nested deeper than 8 levels"),
    ('{"format": "fragment-bpe", "format": "fragment-bpe"}', "duplicate key 'format'"),
    ('{"format": "fragment-bpe", "vocab_size": NaN}', "non-standard JSON constant NaN"),
    ('{"format": "fragment-bpe", "vocab_size": Infinity}', "non-standard JSON constant"),
    ("", "invalid JSON"),
    ("{'format': 'fragment-bpe'}", "invalid JSON"),
    (b'{"format": "fragment-bpe\xff"}', "invalid UTF-8"),
    (b"\x80\x81binary", "invalid UTF-8"),
])
def test_malformed_json_is_refused(tmp_path, content, rule):
    refuse(write(tmp_path, content), rule)


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path):
    path = tmp_path / "tokenizer.json"
    with open(path, "wb") as fh:
        fh.truncate(tokenizer_module.MAX_FILE_BYTES + 1)  # sparse: no disk used
    refuse(path, "file too large")


def test_the_size_cap_applies_to_real_content(valid_doc, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_FILE_BYTES", 100)
    refuse(write(tmp_path, json.dumps(valid_doc)), "file too large")


def test_too_many_merges_are_refused(valid_doc, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_VOCAB", 256 + 2 + 5)
    refuse(write(tmp_path, json.dumps(valid_doc)), "too many merges")


def test_missing_file_symlink_and_fifo_are_refused(valid_doc, tmp_path):
    refuse(tmp_path / "absent.json", "file not found")
    target = write(tmp_path, json.dumps(valid_doc))
    link = tmp_path / "link.json"
    link.symlink_to(target)
    refuse(link, "refusing to follow a symlink")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    refuse(fifo, "not a regular file")  # and it must not block


def test_a_folder_is_refused(tmp_path):
    refuse(tmp_path, "not a regular file")


def test_from_merges_applies_the_same_rules():
    with pytest.raises(TokenizerError, match="uses an id not defined before it"):
        Tokenizer.from_merges([(97, 300)])
    with pytest.raises(TokenizerError, match="pair of integer ids"):
        Tokenizer.from_merges([(97, 98, 99)])
    with pytest.raises(TokenizerError, match="duplicate byte string"):
        Tokenizer.from_merges([(97, 98), (97, 98)])
    with pytest.raises(TokenizerError, match="unknown split pattern"):
        Tokenizer.from_merges([], pattern="nope")


# ------------------------------------------------------------- token-length bombs


def doubling_bomb(merges: int = 30) -> dict[str, Any]:
    """Merge k joins the previous token with itself: token 256 + k is 2^(k+1) bytes, so
    30 merges (a file of under 1 KB) ask for a 2^30-byte token and a 2 GiB table."""
    pairs = [[97, 97]] + [[256 + k, 256 + k] for k in range(merges - 1)]
    doc = json.loads(Tokenizer.from_merges([])._canonical_json())
    n = 256 + len(pairs)
    doc.update(merges=pairs, vocab_size=n + len(tokenizer_module.SPECIAL_TOKENS),
               special_tokens={name: n + i
                               for i, name in enumerate(tokenizer_module.SPECIAL_TOKENS)})
    return doc


def test_a_token_length_bomb_is_refused_before_the_table_is_built(tmp_path, runner,
                                                                   monkeypatch):
    path = write(tmp_path, json.dumps(doubling_bomb(), separators=(",", ":")))
    assert path.stat().st_size < 1024
    # Measured from the merge list: the table is never built (building it would fail here).
    monkeypatch.setattr(tokenizer_module, "token_bytes_table", None)
    refuse(path, "merge 10 (265, 265) makes 2048 bytes, over the 1024-byte cap on one token")
    monkeypatch.undo()
    from fragment_llm.cli.app import cli

    result = runner.invoke(cli, ["verify", str(path)])
    assert result.exit_code == 1
    assert "1024-byte cap on one token" in result.stderr and "FAILED" in result.stderr


def test_the_token_table_total_is_capped(valid_doc, tmp_path, monkeypatch):
    # "ab", "abc", "dd": 256 + 2 + 3 + 2 bytes in all.
    monkeypatch.setattr(tokenizer_module, "MAX_TABLE_BYTES", 256 + 2 + 3 + 1)
    refuse(write(tmp_path, json.dumps(valid_doc)), "over the 262-byte cap")
    monkeypatch.setattr(tokenizer_module, "MAX_TABLE_BYTES", 256 + 2 + 3 + 2)
    assert Tokenizer.load(write(tmp_path, json.dumps(valid_doc))).vocab_size == 264


def test_train_tokenizer_never_writes_a_token_past_the_cap(tmp_path, runner):
    """BPE on a run of one letter doubles its longest token every merge: 5,000 "a"s in
    8,192-character chunks make tokens of 2,048 and 4,096 bytes unless training skips
    them, and the file written would then be one the loader refuses."""
    from fragment_llm.cli.app import cli

    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.txt").write_text("a" * 5000 + "\n")
    (tmp_path / "raw" / "b.txt").write_text("a" * 5000 + "\nthe end\n")
    (tmp_path / "cfg.toml").write_text(
        "[tokenizer]\nmax_chunk_chars = 8192\nmin_frequency = 1\nholdout_fraction = 0.0\n")
    assert runner.invoke(cli, ["-q", "preprocess", str(tmp_path / "raw"), "--out",
                               str(tmp_path / "processed")]).exit_code == 0
    result = runner.invoke(cli, ["-q", "train-tokenizer", "--data", str(tmp_path / "processed"),
                                 "--out", str(tmp_path / "tok.json"), "--vocab-size", "300",
                                 "--workers", "1", "--config", str(tmp_path / "cfg.toml")])
    assert result.exit_code == 0, result.output
    tok = Tokenizer.load(tmp_path / "tok.json")
    longest = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
    assert longest == tokenizer_module.MAX_TOKEN_BYTES  # merged up to the cap, never past
    assert tok.decode(tok.encode("a" * 5000)) == "a" * 5000
