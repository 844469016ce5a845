"""Validated conversations -> token shards with a loss mask, cached like pretraining's.

Each conversation is rendered by `tokenizer.chat_template.render`, the one template chat
uses at inference (special tokens), so what the model is trained on is what it is fed:
ids and a mask that is True on each assistant answer and the `<|end|>` closing it.
Conversations go to train or validation by their content hash. The folder is the same
format as pretraining shards (data/shards.py: same manifest, hashes, verified loader),
plus a `.mask` file per shard and `conversations.json`, the report of what was read
(each input's sha256, what was refused and why); the manifest's
`processed_manifest_sha256` is that report's, so the cache key changes with any input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fragment_llm import __version__
from fragment_llm.checkpoint.provenance import Check, Kind, Status, link
from fragment_llm.data.shards import (
    DEFAULT_SHARD_TOKENS,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    TOKENS_FORMAT,
    TOKENS_VERSION,
    ShardWriter,
    TokenShards,
    TokensManifest,
    cache_key,
    dump_manifest,
    is_validation,
    shard_dtype,
)
from fragment_llm.errors import DatasetError, OutputError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.finetune.conversations import ConversationSet, report_document
from fragment_llm.safety.files import (
    atomic_write_bytes,
    dump_json,
    make_dirs,
    read_capped,
    refuse_oversized,
    sha256_bytes,
    staged_dir,
)
from fragment_llm.tokenizer.chat_template import SpecialTokenTemplate, render

if TYPE_CHECKING:
    from fragment_llm.tokenizer.tokenizer import Tokenizer

REPORT_FILE = "conversations.json"
MAX_REPORT_BYTES = 64 << 20


def report_bytes(found: ConversationSet) -> bytes:
    return dump_json(report_document(found)).encode("ascii")


def build_conversation_shards(found: ConversationSet, tokenizer: Tokenizer, out_root: Path,
                              val_fraction: float, progress: ProgressFn | None = None,
                              shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Path:
    """Render and write the shards once; reuse `out_root/<cache key>/` while the inputs
    (the report's bytes, the tokenizer, the split) are the same. Returns the folder."""
    report = report_bytes(found)
    key = cache_key(sha256_bytes(report), tokenizer.sha256, val_fraction)
    folder = out_root / key
    if (folder / MANIFEST).is_file():
        try:
            TokenShards.open(folder, tokenizer.vocab_size)
            return folder
        except DatasetError:
            pass  # a damaged cache is rebuilt, not trusted
    damaged = os.path.lexists(folder)
    make_dirs(out_root, hint="choose another --tokens-dir")
    try:
        with staged_dir(folder, overwrite=damaged) as tmp:
            atomic_write_bytes(tmp / REPORT_FILE, report)
            manifest = _write(tmp, found, tokenizer, val_fraction, sha256_bytes(report),
                              progress or no_progress, shard_tokens)
            data = dump_manifest(manifest).encode("ascii")
            refuse_oversized(data, MAX_MANIFEST_BYTES, tmp / MANIFEST, DatasetError)
            atomic_write_bytes(tmp / MANIFEST, data)
    except OutputError:
        if damaged or not (folder / MANIFEST).is_file():
            raise
        # Another process built the same cache meanwhile: the same inputs, the same bytes.
    return folder


def _write(tmp: Path, found: ConversationSet, tokenizer: Tokenizer, val_fraction: float,
           report_sha256: str, progress: ProgressFn, shard_tokens: int) -> TokensManifest:
    dtype = shard_dtype(tokenizer.vocab_size)
    writers = {split: ShardWriter(tmp, split, dtype, shard_tokens, masked=True)
               for split in ("train", "val")}
    template = SpecialTokenTemplate()
    held_out = validation_set(found.hashes, val_fraction)
    total = len(found.conversations)
    for done, (conversation, digest) in enumerate(zip(found.conversations, found.hashes,
                                                      strict=True), start=1):
        rendered = render(conversation, template, tokenizer)
        answered = sum(len(turn.text.encode("utf-8")) for turn in conversation.turns
                       if turn.role == "assistant")
        writers["val" if digest in held_out else "train"].add(
            np.asarray(rendered.ids, dtype=np.int64), answered,
            np.asarray(rendered.mask, dtype=np.bool_))
        if done % 256 == 0 or done == total:
            progress("rendering conversations", done, total)
    return TokensManifest(
        format=TOKENS_FORMAT, version=TOKENS_VERSION, fragment_version=__version__,
        dtype=dtype.name, vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
        val_fraction=val_fraction, tokenizer_sha256=tokenizer.sha256,
        processed_manifest_sha256=report_sha256, train=writers["train"].entry(),
        val=writers["val"].entry(), chat_format=template.chat_format)


def validation_set(hashes: tuple[str, ...], val_fraction: float) -> set[str]:
    """The conversations held out, by content hash; with none hashed out of at least two,
    the one with the smallest hash, so there is always something to evaluate on."""
    chosen = {digest for digest in hashes if is_validation(digest, val_fraction)}
    if not chosen and val_fraction > 0 and len(hashes) >= 2:
        chosen = {min(hashes)}
    return chosen


def report_check(shards: TokenShards) -> Check:
    """Conversation shards record their read report's sha256 where document shards
    record the processed folder's: the report beside them must still hash to it."""
    path, recorded = shards.folder / REPORT_FILE, shards.manifest.processed_manifest_sha256
    try:
        actual = sha256_bytes(read_capped(path, MAX_REPORT_BYTES, DatasetError))
    except DatasetError as exc:
        return Check(Kind.TOKENS, str(shards.folder), "conversations report", Status.FAILED,
                     exc.message)
    return link(Kind.TOKENS, str(shards.folder), "conversations report", recorded, actual,
                str(path))
