"""`fragment verify`: check any artifact, and the chain of hashes back to its inputs.

Every artifact records the sha256 of what it was made from:

    processed manifest.json   -> each input file (`files[].sha256`, at `root`/`path`)
    tokenizer.json            -> the processed manifest (`training.corpus_sha256`)
    tokens/<key>/manifest.json -> the tokenizer and the processed manifest
    step-NNNNNNN/manifest.json -> tokenizer, token-shard manifest, processed manifest and
                                  model config (`provenance`)

`verify(path)` works out which artifact `path` is, checks it with the stage's own
loader (format, every hash, internal consistency), then follows each recorded hash to
the upstream artifact where it is present: in the standard layout (`processed/`,
`tokenizer.json` and `tokens/<key>/` side by side in one data folder, a run folder next
to that data folder) or where `Upstream` hints say. An upstream that is absent is
reported as "not present"; one that is present but different is a failure. The report
says in words whether every link was followed (`VerifyReport.note`; `--strict` fails
otherwise). Weights are never built into a model: checkpoint headers are compared with
a model built on the `meta` device, and the values are streamed once to refuse NaN/inf.
A step folder that a running trainer prunes while it is being checked is "removed".

The links of a checkpoint and a token-shard folder are checked by the same functions
the loaders run (checkpoint/provenance.py). This module is the verb: it returns typed
results and prints nothing; cli/ renders them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from fragment_llm.checkpoint.layout import (
    ABSENT,
    CONFIG_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STEP_NAME,
    TRAINER_STATE_FILE,
    folder_identity,
)
from fragment_llm.checkpoint.load import Checkpoint, load_checkpoint
from fragment_llm.checkpoint.provenance import (
    Check,
    Kind,
    Status,
    cache_key_check,
    checkpoint_links,
    link,
    recorded_tokens_folder,
    short,
)
from fragment_llm.checkpoint.trained import check_weights_layout, checkpoint_model_config
from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, ModelConfig
from fragment_llm.data.processed import InputFile, ProcessedCorpus
from fragment_llm.data.shards import TokenShards
from fragment_llm.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    FragmentError,
    InputDataError,
    ProcessedDataError,
    TokenizerError,
)
from fragment_llm.finetune.artifact import adapter_layout, base_step, recorded_base
from fragment_llm.finetune.shards import report_check
from fragment_llm.model.size import check_inference_memory, default_memory_limit
from fragment_llm.safety.files import parse_json_guarded, read_capped, sha256_bytes, sha256_file
from fragment_llm.tokenizer.tokenizer import Tokenizer

T = TypeVar("T")
MAX_LISTED_INPUTS = 20  # failing input files listed one per row; the count is always exact
RUN_LISTINGS = 5  # times a run folder is listed while a trainer prunes steps under verify


ERRORS: dict[Kind, type[FragmentError]] = {
    Kind.INPUTS: InputDataError, Kind.PROCESSED: ProcessedDataError,
    Kind.TOKENIZER: TokenizerError, Kind.TOKENS: DatasetError,
    Kind.CHECKPOINT: CheckpointError, Kind.RUN: CheckpointError,
}


@dataclass(frozen=True)
class Upstream:
    """Where upstream artifacts are, when not in the standard layout."""

    processed: Path | None = None
    tokenizer: Path | None = None
    tokens: Path | None = None  # a shard folder, or the `tokens/` folder holding them
    base: Path | None = None  # the checkpoint a fine-tuning run started from


# How to point verify at each kind of upstream artifact it did not find.
_POINT_AT = {Kind.PROCESSED: "--processed DIR", Kind.TOKENIZER: "--tokenizer FILE",
             Kind.TOKENS: "--tokens DIR", Kind.CHECKPOINT: "--base DIR"}


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    kind: Kind
    checks: tuple[Check, ...]
    latest_valid: Path | None = None  # for a run folder

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def unfollowed(self) -> list[Check]:
        """Links of the chain that were not checked: "not present" upstream artifacts."""
        return [check for check in self.checks if check.status is Status.ABSENT]

    @property
    def complete(self) -> bool:
        """Every link was followed and checked (what `--strict` requires)."""
        return not self.unfollowed

    @property
    def gap(self) -> str | None:
        """In words, what was not verified (None when the whole chain was)."""
        skipped = self.unfollowed
        if not skipped:
            return None
        names = ", ".join(dict.fromkeys(check.check for check in skipped))
        return (f"chain NOT verified: {len(skipped)} link(s) not followed ({names}: not "
                f"present)")

    @property
    def gap_hint(self) -> str:
        """How to point verify at what it did not find."""
        upstream = {check.upstream for check in self.unfollowed}
        options = [option for kind, option in _POINT_AT.items() if kind in upstream]
        hints = []
        if options:
            layout = ("data/ beside the run folder" if self.kind in (Kind.RUN, Kind.CHECKPOINT)
                      else "processed/, tokenizer.json and tokens/ in one data folder")
            hints.append(f"point at the inputs with {', '.join(options)} (or keep {layout})")
        if Kind.INPUTS in upstream:
            hints.append("input files are looked for where the processed manifest records "
                         "them (a relative root is relative to where verify runs)")
        if None in upstream:
            hints.append("an artifact written by an older version records no hash to follow")
        return "; ".join(hints)

    @property
    def note(self) -> str:
        """The summary line: how far the chain was verified, and steps pruned meanwhile."""
        parts = []
        if self.failures:
            parts.append(f"{len(self.failures)} check(s) FAILED: the chain is broken there "
                         f"(nothing past a failed artifact is followed)")
        if self.gap is not None:
            parts.append(f"{self.gap}; {self.gap_hint}")
        removed = sum(check.status is Status.REMOVED for check in self.checks)
        if removed:
            parts.append(f"{removed} step folder(s) removed while being verified (a running "
                         f"trainer pruning old checkpoints), not checked")
        if not self.failures and self.gap is None:
            parts.insert(0, "every link of the chain was followed and checked")
        return "; ".join(parts)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def raise_for_failure(self) -> None:
        """Raise the first failure as its stage's error (one line naming the file)."""
        if self.ok:
            return
        first, count = self.failures[0], len(self.failures)
        raise ERRORS[first.kind](
            f"{first.check}: {first.detail}",
            hint=f"{count} of {len(self.checks)} checks failed on {self.path}")

    def raise_if_incomplete(self) -> None:
        """`--strict`: a link that was not followed is a failure too."""
        if self.gap is not None:
            raise ERRORS[self.kind](f"{self.gap}, for {self.path} (--strict)",
                                    hint=self.gap_hint)

    def as_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind.value, "ok": self.ok,
                "complete": self.complete, "note": self.note,
                "latest_valid": None if self.latest_valid is None else str(self.latest_valid),
                "checks": [{"kind": c.kind.value, "artifact": c.artifact, "check": c.check,
                            "status": c.status.value, "detail": c.detail}
                           for c in self.checks]}


# ------------------------------------------------------------------ kind detection


_ARTIFACTS_HINT = ("pass a processed folder, a tokenizer file, a token-shard folder "
                   "(data/tokens/<key>), a checkpoint step folder or a run folder")
_MANIFEST_FORMATS = {"fragment-processed": Kind.PROCESSED, "fragment-tokens": Kind.TOKENS,
                     "fragment-checkpoint": Kind.CHECKPOINT}


def detect_kind(path: Path) -> Kind:
    """Which artifact `path` is, from its type and names (ConfigError when none fits)."""
    try:
        info = os.lstat(path)
    except OSError:
        raise ConfigError(f"not found: {path}", hint=_ARTIFACTS_HINT) from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"refusing to follow a symlink: {path}", hint="pass the real path")
    if not stat.S_ISDIR(info.st_mode):
        return Kind.TOKENIZER if stat.S_ISREG(info.st_mode) else _unknown(path)
    try:
        names = set(os.listdir(path))
    except OSError as exc:
        raise ConfigError(f"cannot list {path}: {exc.strerror}") from None
    if STEP_NAME.fullmatch(path.name) or MODEL_FILE in names:
        return Kind.CHECKPOINT
    if any(STEP_NAME.fullmatch(name) for name in names) or METRICS_FILE in names:
        return Kind.RUN
    if any(name.endswith(".parquet") for name in names):
        return Kind.PROCESSED
    if any(name.endswith(".bin") for name in names):
        return Kind.TOKENS
    if MANIFEST_FILE not in names:
        return _unknown(path)
    # Processed folders, token shards and checkpoints all name theirs manifest.json.
    raw = read_capped(path / MANIFEST_FILE, 256 << 20, ConfigError)
    doc = parse_json_guarded(raw, str(path / MANIFEST_FILE), ConfigError)
    kind = _MANIFEST_FORMATS.get(doc.get("format")) if isinstance(doc, dict) else None
    return kind if kind is not None else _unknown(path)


def _unknown(path: Path) -> Kind:
    raise ConfigError(f"cannot tell which artifact {path} is", hint=_ARTIFACTS_HINT)


def verify(path: Path, hints: Upstream | None = None) -> VerifyReport:
    """Check the artifact at `path` and its chain; see the module docstring."""
    kind = detect_kind(path)
    verifier = _Verifier(hints or Upstream())
    latest = None
    if kind is Kind.RUN:
        latest = verifier.run(path)
    else:
        {Kind.PROCESSED: verifier.processed, Kind.TOKENIZER: verifier.tokenizer,
         Kind.TOKENS: verifier.tokens, Kind.CHECKPOINT: verifier.checkpoint}[kind](path)
    checks = verifier.checks
    if kind is Kind.CHECKPOINT:  # the one step asked about is gone: nothing was verified
        checks = [replace(c, status=Status.FAILED) if c.status is Status.REMOVED else c
                  for c in checks]
    return VerifyReport(path, kind, tuple(checks), latest)


# ------------------------------------------------------------------------ verifier


@dataclass
class _Verifier:
    """Runs checks, collecting `Check`s; each upstream artifact is verified once."""

    hints: Upstream
    checks: list[Check] = field(default_factory=list)
    _done: dict[tuple[Kind, str], Any] = field(default_factory=dict)  # each kind its type
    loadable: dict[str, bool] = field(default_factory=dict)  # step folder -> own checks hold

    def add(self, kind: Kind, artifact: str, check: str, status: Status, detail: str) -> None:
        self.checks.append(Check(kind, artifact, check, status, detail))

    def attempt(self, kind: Kind, artifact: str, check: str,
                action: Callable[[], tuple[T, str]]) -> T | None:
        """Run one loader step: its detail on success, its error message on failure."""
        try:
            value, detail = action()
        except FragmentError as exc:
            self.add(kind, artifact, check, Status.FAILED, exc.message)
            return None
        self.add(kind, artifact, check, Status.OK, detail)
        return value

    def chain(self, kind: Kind, artifact: str, check: str, recorded: str | None,
              upstream: Path | None, upstream_kind: Kind,
              open_upstream: Callable[[Path], T | None], sha_of: Callable[[T], str]
              ) -> T | None:
        """Follow one recorded hash to an upstream artifact, verifying that one too."""
        if recorded is None:
            self.add(kind, artifact, check, Status.ABSENT, "no hash recorded")
            return None
        if upstream is None or not os.path.lexists(upstream):
            self.checks.append(Check(kind, artifact, check, Status.ABSENT,
                                     f"{upstream or 'upstream'} not present; recorded "
                                     f"{short(recorded)}", upstream_kind))
            return None
        key = (upstream_kind, os.path.abspath(upstream))
        if key not in self._done:  # each upstream artifact is verified once
            self._done[key] = None
            self._done[key] = open_upstream(upstream)
        loaded = self._done[key]
        if loaded is None:
            self.add(kind, artifact, check, Status.FAILED,
                     f"{upstream} is present but fails its own checks")
            return None
        self.checks.append(link(kind, artifact, check, recorded, sha_of(loaded), str(upstream)))
        return loaded

    # ----------------------------------------------------------------- processed

    def processed(self, folder: Path) -> ProcessedCorpus | None:
        art = str(folder)
        corpus = self.attempt(Kind.PROCESSED, art, "manifest and shards",
                              lambda: _open_processed(folder))
        if corpus is not None:
            self.attempt(Kind.PROCESSED, art, "document hashes",
                         lambda: (None, _check_documents(corpus)))
            self._inputs(art, corpus.manifest.files)
        return corpus

    def _inputs(self, art: str, files: Iterable[InputFile]) -> None:
        outcomes = [(entry, _input_outcome(entry)) for entry in files
                    if entry.status == "kept" and entry.sha256 is not None]
        failed = [(entry, detail) for entry, (status, detail) in outcomes
                  if status is Status.FAILED]
        present = sum(status is Status.OK for _, (status, _) in outcomes)
        absent = len(outcomes) - present - len(failed)
        for entry, detail in failed[:MAX_LISTED_INPUTS]:
            self.add(Kind.INPUTS, entry.location, "input file", Status.FAILED, detail)
        summary = f"{present} match, {absent} not present, {len(failed)} differ"
        status = Status.FAILED if failed else Status.ABSENT if absent else Status.OK
        self.checks.append(Check(Kind.INPUTS, art, "input files", status, summary,
                                 Kind.INPUTS))

    # ----------------------------------------------------------------- tokenizer

    def tokenizer(self, path: Path) -> Tokenizer | None:
        art = str(path)
        tok = self.attempt(Kind.TOKENIZER, art, "format", lambda: _load_tokenizer(path))
        if tok is not None:
            recorded = tok.training.corpus_sha256 if tok.training else None
            self.chain(Kind.TOKENIZER, art, "trained on processed", recorded,
                       self.hints.processed or path.parent / "processed", Kind.PROCESSED,
                       self.processed, lambda corpus: corpus.manifest_sha256)
        return tok

    # -------------------------------------------------------------------- tokens

    def tokens(self, folder: Path) -> TokenShards | None:
        art = str(folder)
        shards = self.attempt(Kind.TOKENS, art, "manifest and shards",
                              lambda: _open_tokens(folder))
        if shards is None:
            return None
        self.attempt(Kind.TOKENS, art, "documents", lambda: (None, shards.count_documents()))
        self.checks.append(cache_key_check(shards))
        manifest = shards.manifest
        # data/tokens/<key>: data/; a fine-tuning run's RUN/tokens/<key>: the data/ beside RUN.
        data = folder.parent.parent / ("../data" if manifest.masked else "")
        tok = self.chain(Kind.TOKENS, art, "tokenizer", manifest.tokenizer_sha256,
                         self.hints.tokenizer or data / "tokenizer.json", Kind.TOKENIZER,
                         self.tokenizer, lambda t: t.sha256)
        if tok is not None and (tok.vocab_size, tok.eot_id) != (manifest.vocab_size,
                                                                 manifest.eot_id):
            self.add(Kind.TOKENS, art, "vocabulary", Status.FAILED,
                     f"shards were built for vocab {manifest.vocab_size} / eot "
                     f"{manifest.eot_id}, the tokenizer has {tok.vocab_size} / {tok.eot_id}")
        if manifest.masked:  # conversations: their read report, not a processed folder
            self.checks.append(report_check(shards))
            return shards
        corpus = self.chain(Kind.TOKENS, art, "processed", manifest.processed_manifest_sha256,
                            self.hints.processed or data / "processed", Kind.PROCESSED,
                            self.processed, lambda c: c.manifest_sha256)
        if corpus is not None:
            split_docs = manifest.train.documents + manifest.val.documents
            status = Status.OK if split_docs == corpus.documents else Status.FAILED
            self.add(Kind.TOKENS, art, "document count", status,
                     f"{split_docs} documents in the shards, {corpus.documents} in "
                     f"{corpus.folder}")
        return shards

    # ---------------------------------------------------------------- checkpoint

    def checkpoint(self, folder: Path) -> Checkpoint | None:
        art, before = str(folder), len(self.checks)
        identity = folder_identity(folder)
        ckpt = self._own_checks(folder)
        # A trainer pruning old steps renames the folder away, and whatever was being
        # read then fails ("file not found"): that is a step gone, not a damaged one.
        if ABSENT in (identity, folder_identity(folder)):
            del self.checks[before:]
            self.add(Kind.CHECKPOINT, art, "step folder", Status.REMOVED,
                     f"{folder} was removed while being verified (a running trainer "
                     f"prunes old checkpoints); nothing left to check")
            self.loadable[art] = False
            return None
        # Loadable means its own checks hold; a changed upstream does not stop chat.
        self.loadable[art] = ckpt is not None and all(c.ok for c in self.checks[before:])
        if ckpt is not None:
            self._checkpoint_upstream(art, ckpt)
        return ckpt

    def _own_checks(self, folder: Path) -> Checkpoint | None:
        """The step folder itself: files, config, weights, state, tokenizer copy."""
        art = str(folder)
        ckpt = self.attempt(Kind.CHECKPOINT, art, "files and manifest",
                            lambda: _load_checkpoint(folder))
        if ckpt is None:
            return None
        config = self.attempt(Kind.CHECKPOINT, art, "model config",
                              lambda: _model_config(ckpt))
        if config is not None:
            layout = adapter_layout if ckpt.is_adapter else check_weights_layout
            self.attempt(Kind.CHECKPOINT, art, "weights layout",
                         lambda: (None, layout(ckpt, config)))
            self.attempt(Kind.CHECKPOINT, art, "memory plan",
                         lambda: (None, _check_memory(ckpt, config)))
        self.attempt(Kind.CHECKPOINT, art, "trainer state", lambda: (None, _check_state(ckpt)))
        tok = self.attempt(Kind.CHECKPOINT, art, "tokenizer copy",
                           lambda: _load_tokenizer(ckpt.tokenizer_path))
        if tok is not None:
            self.checks += checkpoint_links(ckpt, tok)
            if config is not None and tok.vocab_size != config.vocab_size:
                self.add(Kind.CHECKPOINT, art, "vocabulary", Status.FAILED,
                         f"tokenizer copy has {tok.vocab_size} tokens, {CONFIG_FILE} "
                         f"{config.vocab_size}, in {folder}")
        return ckpt

    def _checkpoint_upstream(self, art: str, ckpt: Checkpoint) -> None:
        recorded, data = ckpt.provenance, ckpt.path.parent.parent / "data"
        base = recorded.document().get("base_manifest_sha256")
        if isinstance(base, str):  # fine-tuned or --init-from: the weights it started from
            where = self.hints.base or recorded_base(ckpt)
            self.chain(Kind.CHECKPOINT, art, "base checkpoint", base,
                       where and base_step(where, base), Kind.CHECKPOINT,
                       self.checkpoint, lambda c: c.manifest_sha256)
        self.chain(Kind.CHECKPOINT, art, "tokenizer", recorded.tokenizer_sha256,
                   self.hints.tokenizer or data / "tokenizer.json", Kind.TOKENIZER,
                   self.tokenizer, lambda t: t.sha256)
        # The shard folder the run trained on is named by the cache key of the hashes
        # the checkpoint records and the run's val_fraction; fine-tuning keeps its own.
        beside = ckpt.path.parent / "tokens"
        tokens = self.hints.tokens or (beside if beside.is_dir() else data / "tokens")
        shards = self.chain(Kind.CHECKPOINT, art, "token shards",
                            recorded.tokens_manifest_sha256, recorded_tokens_folder(tokens, ckpt),
                            Kind.TOKENS, self.tokens, lambda s: s.manifest_sha256)
        if (shards.manifest.masked if shards is not None
                else ckpt.config.chat_format == SPECIAL_TOKENS_CHAT_FORMAT):
            return  # conversations: the shards' own report is the end of the chain
        self.chain(Kind.CHECKPOINT, art, "processed", recorded.processed_manifest_sha256,
                   self.hints.processed or data / "processed", Kind.PROCESSED,
                   self.processed, lambda c: c.manifest_sha256)

    # ----------------------------------------------------------------------- run

    def run(self, folder: Path) -> Path | None:
        """Verify every step folder; return the newest whose own checks all hold."""
        seen: set[str] = set()
        valid = []
        # A running trainer prunes steps while they are checked and saves newer ones
        # after the listing: list again while steps keep disappearing (a few times).
        for _ in range(RUN_LISTINGS):
            steps = sorted(name for name in os.listdir(folder)
                           if STEP_NAME.fullmatch(name) and name not in seen)
            removed = sum(check.status is Status.REMOVED for check in self.checks)
            for name in steps:
                seen.add(name)
                if self._step(folder / name):
                    valid.append(folder / name)
            if sum(check.status is Status.REMOVED for check in self.checks) == removed:
                break
        if not seen:
            self.add(Kind.RUN, str(folder), "step folders", Status.FAILED,
                     f"no step-NNNNNNN folders in {folder}")
        latest = max(valid, default=None)
        gone = seen and all(not os.path.lexists(folder / name) for name in seen)
        self.add(Kind.RUN, str(folder), "latest valid", Status.OK if latest else Status.FAILED,
                 f"{latest.name}: the newest step whose own checks all hold" if latest
                 else f"no step stayed long enough to be verified: each one listed was "
                      f"pruned while being checked (the trainer saves faster than verify "
                      f"checks); run verify again, in {folder}" if gone
                 else f"no loadable checkpoint in {folder}")
        return latest

    def _step(self, path: Path) -> bool:
        try:
            mode = os.lstat(path).st_mode  # one lstat: no race between two questions
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISDIR(mode):  # lstat: a symlink is no folder
            self.add(Kind.RUN, str(path), "step folder", Status.FAILED,
                     f"{path} is a symlink or not a folder; never followed")
            return False
        self.checkpoint(path)  # one removed since the listing is reported as removed
        return self.loadable.get(str(path), False)


# --------------------------------------------------------------- stage loaders


def _open_processed(folder: Path) -> tuple[ProcessedCorpus, str]:
    corpus = ProcessedCorpus.open(folder)
    return corpus, (f"{len(corpus.manifest.shards)} shard(s), {corpus.documents:,} documents, "
                    f"manifest sha256 {short(corpus.manifest_sha256)}")


def _check_documents(corpus: ProcessedCorpus) -> str:
    """Each document's text against its sha256 column; totals against the manifest."""
    count = chars = 0
    for text, source, digest in corpus.iter_documents():
        count += 1
        chars += len(text)
        if sha256_bytes(text.encode("utf-8")) != digest:
            raise ProcessedDataError(f"document {count} (from {source}) does not match its "
                                     f"sha256, in {corpus.folder}")
    counts = corpus.manifest.counts
    if (count, chars) != (counts.documents, counts.chars):
        raise ProcessedDataError(f"shards hold {count} documents / {chars} chars, the manifest "
                                 f"says {counts.documents} / {counts.chars}, in {corpus.folder}")
    return f"{count:,} documents, {chars:,} chars"


def _input_outcome(entry: InputFile) -> tuple[Status, str]:
    """An input file still at `root/path`: same size and sha256 as when preprocessed?

    Symlinks are followed (preprocess follows those inside an input folder).
    """
    path = Path(entry.root) / entry.path
    if not os.path.lexists(path):
        return Status.ABSENT, f"{path} not present"
    try:  # capped at the recorded size: a huge replacement is refused unread
        digest = sha256_file(Path(os.path.realpath(path)), InputDataError, max_bytes=entry.size)
    except InputDataError as exc:
        return Status.FAILED, f"input file changed since preprocess ({exc.message})"
    if digest != entry.sha256:
        return Status.FAILED, f"input file changed since preprocess (sha256 differs), {path}"
    return Status.OK, str(path)


def _load_tokenizer(path: Path) -> tuple[Tokenizer, str]:
    tok = Tokenizer.load(path)
    return tok, (f"vocab {tok.vocab_size:,}, {tok.pattern_name} pattern, "
                 f"sha256 {short(tok.sha256)}")


def _open_tokens(folder: Path) -> tuple[TokenShards, str]:
    shards = TokenShards.open(folder)
    train, val = shards.manifest.train, shards.manifest.val
    return shards, (f"train {train.tokens:,} / val {val.tokens:,} tokens, manifest sha256 "
                    f"{short(shards.manifest_sha256)}")


def _load_checkpoint(folder: Path) -> tuple[Checkpoint, str]:
    ckpt = load_checkpoint(folder)
    return ckpt, f"step {ckpt.step}, {len(ckpt.files)} files hashed, every weight finite"


def _model_config(ckpt: Checkpoint) -> tuple[ModelConfig, str]:
    config = checkpoint_model_config(ckpt)
    return config, (f"{config.n_layer} layers, {config.n_embd} wide, vocab "
                    f"{config.vocab_size:,}")


def _check_memory(ckpt: Checkpoint, config: ModelConfig) -> str:
    """What `generate`/`chat` would plan before building this model (`load_trained`)."""
    device = torch.device("cpu")
    plan = check_inference_memory(config, ckpt.path, device)
    return (f"{plan.total / 2**20:,.0f} MiB to generate ({config.block_size:,}-token "
            f"context), within the {default_memory_limit(device) / 2**20:,.0f} MiB limit "
            f"on this machine")


def _check_state(ckpt: Checkpoint) -> str:
    step = ckpt.trainer_state.step
    if step != ckpt.step:
        raise CheckpointError(f"{TRAINER_STATE_FILE} says step {step!r}, the manifest "
                              f"{ckpt.step}, in {ckpt.path}")
    return f"step {step}"


def describe(checks: Iterable[Check]) -> Mapping[Status, int]:
    """How many checks ended in each status."""
    counts = dict.fromkeys(Status, 0)
    for check in checks:
        counts[check.status] += 1
    return counts
