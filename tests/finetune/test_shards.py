"""Conversation shards: ids and loss mask rendered by the chat template chat uses (a
property over random conversations), the cache and its key, the manifest's mask fields,
the verified loader's refusals, and the split by conversation hash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fragment_llm.data.shards import MANIFEST, TokenShards, is_validation, mask_name
from fragment_llm.errors import DatasetError
from fragment_llm.finetune.conversations import (
    ConversationSet,
    clean_content,
    conversation_sha256,
    read_conversations,
)
from fragment_llm.finetune.shards import (
    REPORT_FILE,
    build_conversation_shards,
    report_bytes,
    validation_set,
)
from fragment_llm.tokenizer.chat_template import (
    Conversation,
    SpecialTokenTemplate,
    render,
    render_prompt,
)
from fragment_llm.tokenizer.tokenizer import Tokenizer

BIG_BUDGET = 1 << 20  # chat's context budget, large enough never to drop a turn


@pytest.fixture(scope="module")
def tok(chat_tokenizer) -> Tokenizer:
    return Tokenizer.load(chat_tokenizer)


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def chat_record(system: str | None, exchanges: list[tuple[str, str]]) -> dict[str, object]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for question, answer in exchanges:
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
    return {"messages": messages}


def conversations_by_split(folder: Path, vocab: int) -> dict[str, list[tuple[list[int],
                                                                           list[bool]]]]:
    """Each split's conversations as written: (ids, mask) per conversation, cut at the
    `<|endoftext|>` each one starts with (text cannot produce that id)."""
    shards = TokenShards.open(folder, vocab)
    eot = shards.manifest.eot_id
    found = {}
    for name in ("train", "val"):
        split = getattr(shards, name)
        ids = [int(i) for shard in split.shards for i in shard]
        mask = [bool(m) for shard in split.masks for m in shard]
        starts = [i for i, token in enumerate(ids) if token == eot] + [len(ids)]
        assert not ids or starts[0] == 0
        found[name] = [(ids[a:b], mask[a:b]) for a, b in zip(starts, starts[1:])]
    return found


def true_runs(mask: list[bool]) -> list[tuple[int, int]]:
    """`[F, T, T, F, T] -> [(1, 3), (4, 5)]`."""
    runs, start = [], None
    for i, on in enumerate([*mask, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def answers_by_markers(ids: list[int], tok: Tokenizer) -> list[bool]:
    """True after each `<|assistant|>` up to its `<|end|>` included: what the mask must
    be, worked out from the special ids alone."""
    opening, end = tok.special_id("<|assistant|>"), tok.special_id("<|end|>")
    inside, mask = False, []
    for token in ids:
        mask.append(inside)
        inside = token == opening or (inside and token != end)
    return mask


# ------------------------------------------------------------ the rendered conversations

# Text that spells special tokens is text: it must neither close a turn nor be masked apart.
PIECES = ["<|end|>", "<|assistant|>", "<|user|>", "<|endoftext|>", "<|end", "hello",
          "how are you?", "Café", "日本語", "🙂", "\n", "  ", "thank you kindly."]
TEXT = (st.lists(st.sampled_from(PIECES) | st.text(max_size=8), min_size=1, max_size=6)
        .map("".join).filter(lambda text: bool(clean_content(text))))
CONVERSATION = st.tuples(st.none() | TEXT,
                         st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4))


@settings(max_examples=40, deadline=None)
@given(st.lists(CONVERSATION, min_size=1, max_size=5))
def test_written_ids_and_masks_are_the_chat_templates(tok, drawn):
    """Every conversation written is `render`'s ids and mask; the mask is True exactly on
    each answer and the `<|end|>` closing it, and decodes to them; and the ids before the
    last answer are what chat feeds the model to get it (`render_prompt`)."""
    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(Path(tmp) / "chat.jsonl",
                           [chat_record(system, exchanges) for system, exchanges in drawn])
        found = read_conversations(data)
        folder = build_conversation_shards(found, tok, Path(tmp) / "tokens", 0.4)
        written = conversations_by_split(folder, tok.vocab_size)
    distinct = {conversation_sha256(c) for c in found.conversations}
    assert len(found.conversations) == len(distinct)  # only duplicates were refused
    assert found.refused_counts.keys() <= {"duplicate"}
    held_out = validation_set(found.hashes, 0.4)
    queues = {name: list(items) for name, items in written.items()}
    for conversation, digest in zip(found.conversations, found.hashes, strict=True):
        ids, mask = queues["val" if digest in held_out else "train"].pop(0)
        rendered = render(conversation, SpecialTokenTemplate(), tok)
        assert (ids, mask) == (rendered.ids, rendered.mask)
        assert mask == answers_by_markers(ids, tok)
        answers = [turn.text for turn in conversation.turns if turn.role == "assistant"]
        runs = true_runs(mask)
        assert [tok.decode(ids[a:b]) for a, b in runs] == [f"{a}<|end|>" for a in answers]
        asked = Conversation(conversation.system, conversation.turns[:-1])
        prompt = render_prompt(asked, SpecialTokenTemplate(), tok, BIG_BUDGET)
        assert ids[:runs[-1][0]] == prompt
    assert queues == {"train": [], "val": []}  # nothing written but the conversations


# ----------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def built(conversations_file, tok, tmp_path_factory) -> Path:
    """The shards of `conversations_file`, built once. Read only: tests copy it."""
    found = read_conversations(conversations_file)
    return build_conversation_shards(found, tok, tmp_path_factory.mktemp("built"), 0.1)


def file_identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_ino, info.st_mtime_ns


def test_the_same_inputs_reuse_the_cached_folder_untouched(conversations_file, tok, tmp_path):
    root = tmp_path / "tokens"
    first = build_conversation_shards(read_conversations(conversations_file), tok, root, 0.1)
    files = sorted(first.iterdir())
    before = {path.name: file_identity(path) for path in files}
    again = build_conversation_shards(read_conversations(conversations_file), tok, root, 0.1)
    assert again == first and sorted(root.iterdir()) == [first]
    assert {path.name: file_identity(path) for path in sorted(again.iterdir())} == before


@pytest.mark.parametrize("change", ["an extra key", "another answer", "another file name"])
def test_changed_input_bytes_make_a_new_cache_key(conversations_file, tok, tmp_path, change):
    lines = conversations_file.read_text(encoding="utf-8").splitlines(keepends=True)
    record = json.loads(lines[3])
    name = "chat.jsonl"
    if change == "an extra key":  # the same conversations, other bytes: other provenance
        record["id"] = "x"
    elif change == "another answer":
        record["messages"][-1]["content"] += "!"
    else:
        name = "renamed.jsonl"
    lines[3] = json.dumps(record) + "\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(conversations_file, tmp_path / "a" / "chat.jsonl")
    (tmp_path / "b" / name).write_text("".join(lines), encoding="utf-8")
    root = tmp_path / "tokens"
    first = build_conversation_shards(read_conversations(tmp_path / "a"), tok, root, 0.1)
    second = build_conversation_shards(read_conversations(tmp_path / "b"), tok, root, 0.1)
    assert first != second and first.parent == second.parent == root


def test_a_changed_split_or_tokenizer_makes_a_new_cache_key(conversations_file, tok, tmp_path,
                                                            tokenizer_file):
    found = read_conversations(conversations_file)
    root = tmp_path / "tokens"
    folders = {build_conversation_shards(found, tok, root, 0.1),
               build_conversation_shards(found, tok, root, 0.2),
               build_conversation_shards(found, Tokenizer.load(tokenizer_file), root, 0.1)}
    assert len(folders) == 3


def test_the_manifest_records_the_masks_the_template_and_the_report(built, tok):
    manifest = json.loads((built / MANIFEST).read_text())
    assert manifest["chat_format"] == "special_tokens"
    report = (built / REPORT_FILE).read_bytes()
    assert manifest["processed_manifest_sha256"] == hashlib.sha256(report).hexdigest()
    assert json.loads(report)["conversations"] == 40
    for name in ("train", "val"):
        split = manifest[name]
        assert split["shards"], name
        masks = [np.fromfile(built / mask_name(entry["file"]), dtype=np.uint8)
                 for entry in split["shards"]]
        for entry, mask in zip(split["shards"], masks, strict=True):
            raw = (built / mask_name(entry["file"])).read_bytes()
            assert entry["mask_sha256"] == hashlib.sha256(raw).hexdigest()
            assert len(mask) == entry["tokens"]
        assert split["loss_tokens"] == sum(int(mask.sum()) for mask in masks) > 0
    assert TokenShards.open(built, tok.vocab_size).manifest.masked


def test_a_damaged_cache_is_rebuilt_not_trusted(conversations_file, tok, tmp_path):
    found = read_conversations(conversations_file)
    folder = build_conversation_shards(found, tok, tmp_path, 0.1)
    (folder / "train-00000.mask").write_bytes(b"\x00" * 3)
    assert build_conversation_shards(found, tok, tmp_path, 0.1) == folder
    TokenShards.open(folder, tok.vocab_size)


# ------------------------------------------------------------------- the loader refuses


def broken_copy(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / built.name))


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def rewrite_mask(folder: Path, edit) -> None:
    """Edit train-00000.mask with `edit(array)`, then re-seal its sha256 and loss_tokens
    in the manifest, as a careful forger would: only the mask's own rules are left."""
    path = folder / "train-00000.mask"
    mask = np.fromfile(path, dtype=np.uint8)
    edit(mask)
    path.write_bytes(mask.tobytes())

    def reseal(manifest):
        manifest["train"]["shards"][0]["mask_sha256"] = hashlib.sha256(
            mask.tobytes()).hexdigest()
        manifest["train"]["loss_tokens"] = sum(
            int(np.fromfile(folder / mask_name(entry["file"]), dtype=np.uint8).sum())
            for entry in manifest["train"]["shards"])
    edit_manifest(folder, reseal)


def flip_a_byte(folder: Path) -> None:
    path = folder / "train-00000.mask"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 1
    path.write_bytes(bytes(raw))


def set_a_two(mask: np.ndarray) -> None:
    mask[int(np.flatnonzero(mask)[0])] = 2


def drop_mask_hashes(manifest: dict) -> None:
    for entry in manifest["train"]["shards"] + manifest["val"]["shards"]:
        del entry["mask_sha256"]


def drop_loss_tokens(manifest: dict) -> None:
    del manifest["train"]["loss_tokens"], manifest["val"]["loss_tokens"]


def miscount(manifest: dict) -> None:
    manifest["train"]["loss_tokens"] += 1


@pytest.mark.parametrize("damage, rule", [
    (flip_a_byte, "sha256 mismatch .*train-00000.mask"),
    (lambda folder: rewrite_mask(folder, set_a_two),
     "a loss mask holds a value other than 0 and 1, in .*train-00000.mask"),
    (lambda folder: os.remove(folder / "train-00000.mask"), "file not found: .*train-00000.mask"),
    (lambda folder: edit_manifest(folder, drop_mask_hashes),
     "loss masks, loss_tokens and chat_format must come together"),
    (lambda folder: edit_manifest(folder, drop_loss_tokens),
     "loss masks, loss_tokens and chat_format must come together"),
    (lambda folder: edit_manifest(folder, lambda m: m.pop("chat_format")),
     "loss masks, loss_tokens and chat_format must come together"),
    (lambda folder: edit_manifest(folder, miscount),
     r"the loss masks count other than loss_tokens \(\d+\)"),
], ids=["flipped byte", "value 2", "missing mask", "no mask_sha256", "no loss_tokens",
        "no chat_format", "loss_tokens off by one"])
def test_the_loader_refuses_a_damaged_or_forged_mask(built, tok, tmp_path, damage, rule):
    folder = broken_copy(built, tmp_path)
    TokenShards.open(folder, tok.vocab_size)  # the copy opens before it is damaged
    damage(folder)
    with pytest.raises(DatasetError, match=rule) as info:
        TokenShards.open(folder, tok.vocab_size)
    assert "\n" not in info.value.message


def test_a_mask_resealed_with_only_zeros_and_ones_still_opens(built, tok, tmp_path):
    """The forger's re-sealing above is complete: a 0/1 edit it re-seals is accepted, so
    the refusal of a 2 comes from the value rule alone."""
    folder = broken_copy(built, tmp_path)
    rewrite_mask(folder, lambda mask: mask.__setitem__(int(np.flatnonzero(mask)[0]), 0))
    TokenShards.open(folder, tok.vocab_size)


# ---------------------------------------------------------------- the split by hash


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())
            if path.suffix in (".bin", ".mask")}


def test_the_split_follows_the_conversation_hash_not_the_order(conversations_file, tok,
                                                                tmp_path):
    found = read_conversations(conversations_file)
    reordered = ConversationSet(found.conversations[::-1], found.hashes[::-1], found.sources,
                                found.refused, found.refused_counts)
    folders = [build_conversation_shards(item, tok, tmp_path / name, 0.2)
               for item, name in ((found, "a"), (found, "a2"), (reordered, "b"))]
    assert shard_bytes(folders[0]) == shard_bytes(folders[1])  # deterministic
    held_out = validation_set(found.hashes, 0.2)
    assert held_out == {h for h in found.hashes if is_validation(h, 0.2)} != set()
    vocab = tok.vocab_size
    for folder, conversations, hashes in ((folders[0], found.conversations, found.hashes),
                                          (folders[2], reordered.conversations,
                                           reordered.hashes)):
        written = conversations_by_split(folder, vocab)
        val = [c for c, h in zip(conversations, hashes, strict=True) if h in held_out]
        assert [ids for ids, _ in written["val"]] == [
            render(c, SpecialTokenTemplate(), tok).ids for c in val]
        assert len(written["train"]) == len(conversations) - len(val)


def test_a_validation_conversation_is_forced_when_the_hash_holds_none_out(tok, tmp_path):
    records = [chat_record(None, [(f"question {n}", f"answer {n}")]) for n in range(3)]
    found = read_conversations(write_jsonl(tmp_path / "chat.jsonl", records))
    fraction = 1e-9  # no hash is this small
    assert not any(is_validation(h, fraction) for h in found.hashes)
    assert validation_set(found.hashes, fraction) == {min(found.hashes)}
    written = conversations_by_split(
        build_conversation_shards(found, tok, tmp_path / "tokens", fraction), tok.vocab_size)
    forced = found.conversations[found.hashes.index(min(found.hashes))]
    assert [ids for ids, _ in written["val"]] == [render(forced, SpecialTokenTemplate(), tok).ids]
    assert len(written["train"]) == 2


def test_one_conversation_or_no_fraction_holds_nothing_out(tok, tmp_path):
    one = read_conversations(write_jsonl(tmp_path / "one.jsonl",
                                         [chat_record(None, [("hi", "hello")])]))
    assert validation_set(one.hashes, 1e-9) == set()  # nothing would be left to train on
    two = read_conversations(write_jsonl(tmp_path / "two.jsonl", [
        chat_record(None, [("hi", "hello")]), chat_record(None, [("bye", "goodbye")])]))
    assert validation_set(two.hashes, 0.0) == set()


def test_the_report_names_every_input_with_its_hash(conversations_file, built):
    report = json.loads((built / REPORT_FILE).read_bytes())
    digest = hashlib.sha256(conversations_file.read_bytes()).hexdigest()
    assert [source["sha256"] for source in report["sources"]] == [digest]
    assert report_bytes(read_conversations(conversations_file)) == (
        built / REPORT_FILE).read_bytes()
