"""The link checks every loader runs: what a checkpoint or a token-shard folder records
it was made from, against what is here.

`train` (fresh and resumed), `eval`, `chat` and `generate` run these on load, and
`fragment verify` runs the same ones while it follows the whole chain (verify.py). Each
check is a `Check`; `require` turns the first failure into the stage's error. This
module reads records and hashes; it loads no weights and follows no chain.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from fragment_llm.checkpoint.layout import CONFIG_FILE
from fragment_llm.checkpoint.records import model_config_sha256
from fragment_llm.data.shards import MANIFEST, TokenShards, cache_key
from fragment_llm.errors import CheckpointError, FragmentError
from fragment_llm.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from fragment_llm.checkpoint.load import Checkpoint

HINT_RESUME = ("resume with the tokenizer and processed folder this run was trained with "
               "(`fragment verify OUT` shows the chain), or train into a new --out")


class Kind(StrEnum):
    """The artifacts of the pipeline, each made from the one before."""

    INPUTS = "inputs"
    PROCESSED = "processed"
    TOKENIZER = "tokenizer"
    TOKENS = "tokens"
    CHECKPOINT = "checkpoint"
    RUN = "run"


class Status(StrEnum):
    OK = "ok"
    FAILED = "FAILED"
    ABSENT = "not present"  # an upstream artifact that is not here: not a failure
    REMOVED = "removed"  # a step folder pruned while being checked: gone, not damaged


@dataclass(frozen=True)
class Check:
    """One thing checked: `artifact` is the path it was checked on; `upstream` is the
    kind of artifact a link leads to (for a link that could not be followed)."""

    kind: Kind
    artifact: str
    check: str
    status: Status
    detail: str
    upstream: Kind | None = None

    @property
    def ok(self) -> bool:
        return self.status is not Status.FAILED


def require(checks: Iterable[Check], error: type[FragmentError], hint: str) -> None:
    """Raise `error` for the first failed check: how loaders run verify's link checks."""
    for check in checks:
        if not check.ok:
            raise error(check.detail, hint=hint)


def short(digest: str | None) -> str:
    return "-" if digest is None else f"{digest[:16]}…"


def link(kind: Kind, artifact: str, check: str, recorded: str | None, actual: str,
         where: str) -> Check:
    """Compare a recorded hash with the hash of what is here."""
    if recorded is None:  # upstream None: nothing anyone can point verify at
        return Check(kind, artifact, check, Status.ABSENT, "no hash recorded")
    if recorded == actual:
        return Check(kind, artifact, check, Status.OK, f"sha256 {short(actual)} matches")
    return Check(kind, artifact, check, Status.FAILED,
                 f"{where} has sha256 {short(actual)} but {artifact} records "
                 f"{short(recorded)}")


# ------------------------------------------------------------------- checkpoints


def checkpoint_links(checkpoint: Checkpoint, tokenizer: Tokenizer) -> list[Check]:
    """The checkpoint's own tokenizer copy and config against its manifest's provenance."""
    art, recorded = str(checkpoint.path), checkpoint.provenance
    return [link(Kind.CHECKPOINT, art, "tokenizer copy hash", recorded.tokenizer_sha256,
                 tokenizer.sha256, str(checkpoint.tokenizer_path)),
            link(Kind.CHECKPOINT, art, "model config hash", recorded.model_config_sha256,
                 model_config_sha256(checkpoint.config.model),
                 str(checkpoint.path / CONFIG_FILE))]


def checked_tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    """Load a checkpoint's tokenizer copy; refuse it unless it is the one trained with."""
    tokenizer = Tokenizer.load(checkpoint.tokenizer_path)
    require(checkpoint_links(checkpoint, tokenizer), CheckpointError,
            hint="the checkpoint was edited after it was saved; use another checkpoint")
    return tokenizer


def resume_links(checkpoint: Checkpoint, tokenizer: Tokenizer,
                 shards: TokenShards | None = None) -> list[Check]:
    """What a resumed run uses (tokenizer, then token shards) against what it was trained on."""
    art, recorded = str(checkpoint.path), checkpoint.provenance
    checks = [link(Kind.CHECKPOINT, art, "tokenizer in use", recorded.tokenizer_sha256,
                   tokenizer.sha256, "the --tokenizer file")]
    if shards is not None:
        checks += [link(Kind.CHECKPOINT, art, "token shards in use",
                        recorded.tokens_manifest_sha256, shards.manifest_sha256,
                        str(shards.folder / MANIFEST)),
                   link(Kind.CHECKPOINT, art, "processed folder in use",
                        recorded.processed_manifest_sha256,
                        shards.manifest.processed_manifest_sha256, "the --data folder")]
    return checks


def recorded_tokens_folder(tokens: Path, checkpoint: Checkpoint) -> Path | None:
    """The token-shard folder a checkpoint trained on: `tokens` itself when it holds a
    manifest, else `tokens/<cache key>` of the hashes the checkpoint records and the
    run's val_fraction; None when the checkpoint does not record what the key is made of."""
    if os.path.lexists(tokens / MANIFEST):
        return tokens
    recorded = checkpoint.provenance
    fraction = (checkpoint.config.train or {}).get("val_fraction")
    if (recorded.processed_manifest_sha256 is None or recorded.tokenizer_sha256 is None
            or not isinstance(fraction, float)):
        return None
    return tokens / cache_key(recorded.processed_manifest_sha256, recorded.tokenizer_sha256,
                              fraction)


# ------------------------------------------------------------------ token shards


def cache_key_check(shards: TokenShards) -> Check:
    """A shard folder is named by the cache key of its manifest's inputs, so an edited
    manifest (which has no checksum of its own) no longer matches its folder."""
    manifest = shards.manifest
    key = cache_key(manifest.processed_manifest_sha256, manifest.tokenizer_sha256,
                    manifest.val_fraction)
    if shards.folder.name == key:
        return Check(Kind.TOKENS, str(shards.folder), "cache key", Status.OK,
                     f"folder name is the key {key}")
    return Check(Kind.TOKENS, str(shards.folder), "cache key", Status.FAILED,
                 f"folder name is not the cache key {key} of its manifest (manifest edited "
                 f"or folder renamed), in {shards.folder}")


def tokens_links(shards: TokenShards, tokenizer: Tokenizer, where: str) -> list[Check]:
    """A shard folder against the tokenizer it is about to be used with."""
    return [cache_key_check(shards),
            link(Kind.TOKENS, str(shards.folder), "tokenizer",
                 shards.manifest.tokenizer_sha256, tokenizer.sha256, where)]
