"""The `train-tokenizer` stage: a processed folder in, a tokenizer file out.

Streams documents from `ProcessedCorpus` (one row group in memory at a time; only the
chunk counts grow with the corpus), holds back an evenly spread `holdout_fraction` of
documents to measure bytes per token, trains, and writes the file atomically with the
processed manifest's sha256 recorded in it. It does not print: the CLI renders the
returned `TokenizerReport`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fragment_llm.config import TokenizerConfig
from fragment_llm.errors import OutputError
from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.safety.files import make_dirs
from fragment_llm.safety.workers import cap_workers, tokenizer_bytes
from fragment_llm.tokenizer.tokenizer import Tokenizer

# Held-back documents are kept (to measure bytes per token) up to this many characters.
HOLDOUT_SAMPLE_CHARS = 8 << 20


@dataclass(frozen=True)
class TokenizerReport:
    out: Path
    vocab_size: int
    requested_vocab_size: int
    merges: int
    stop_reason: str
    documents_trained: int
    chars_trained: int
    documents_held_out: int
    bytes_per_token: float | None
    seconds: float
    sha256: str
    note: str | None = None  # why fewer workers ran than were asked for

    def as_json(self) -> dict[str, Any]:
        """`fragment train-tokenizer --json`: every field, the path as a string."""
        return {**asdict(self), "out": str(self.out)}

    def summary_rows(self) -> list[tuple[str, object]]:
        vocab = f"{self.vocab_size:,}"
        if self.vocab_size != self.requested_vocab_size:
            vocab += f" (asked for {self.requested_vocab_size:,}: {self.stop_reason})"
        held = _count(self.documents_held_out, "held-back document")
        bpt = ("n/a (no document held back)" if self.bytes_per_token is None
               else f"{self.bytes_per_token:.3f} on {held}")
        return [("written", self.out), ("vocab size", vocab), ("merges", f"{self.merges:,}"),
                ("bytes per token", bpt),
                ("trained on", f"{self.chars_trained:,} chars in "
                               f"{_count(self.documents_trained, 'document')}"),
                ("time", f"{self.seconds:.1f} s"), ("sha256", self.sha256[:16] + "…"),
                *([("note", self.note)] if self.note else [])]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


class Holdout:
    """Which documents are held back: `count` of `documents`, spread evenly by index.

    `Holdout(10, 0.2)` holds back documents 4 and 9. A fraction above zero holds back at
    least one document once there are two or more.
    """

    def __init__(self, documents: int, fraction: float) -> None:
        self.documents = documents
        self.count = 0 if fraction <= 0 or documents < 2 else max(1, round(documents * fraction))
        self.sample: list[str] = []
        self._sample_chars = 0
        self._scanned = 0  # documents already seen by `training_texts`

    def is_held(self, index: int) -> bool:
        n, k = self.documents, self.count
        return (index + 1) * k // n > index * k // n

    def training_texts(self, texts: Iterable[str]) -> Iterator[str]:
        """Yield the training documents; keep (a capped sample of) the held-back ones."""
        for index, text in enumerate(texts):
            self._scanned = index + 1
            if not self.is_held(index):
                yield text
            else:
                self._keep(text)

    def finish_sample(self, texts: Iterable[str]) -> None:
        """Collect held-back documents that training never reached (a `max_chars` stop)."""
        if self._scanned >= self.documents or self._sample_chars >= HOLDOUT_SAMPLE_CHARS:
            return
        for index, text in enumerate(texts):
            if index >= self._scanned and self.is_held(index) and not self._keep(text):
                return

    def _keep(self, text: str) -> bool:
        if self._sample_chars + len(text) > HOLDOUT_SAMPLE_CHARS:
            return False
        self.sample.append(text)
        self._sample_chars += len(text)
        return True

    def bytes_per_token(self, tok: Tokenizer) -> float | None:
        tokens = sum(map(len, tok.encode_batch(self.sample, workers=1)))
        if not tokens:
            return None
        return sum(len(text.encode("utf-8")) for text in self.sample) / tokens


def check_output(out: Path, overwrite: bool, data: Path | None = None) -> None:
    """Refuse `out` before any work: an existing file without `overwrite`, a folder, or a
    place inside the processed folder (which `preprocess --overwrite` replaces whole)."""
    if out.is_dir():
        raise OutputError(f"output is a folder: {out}", hint="--out must be a file path")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputError(f"output already exists: {out}",
                          hint="pass --overwrite to replace it, or choose another --out")
    if data is not None and out.resolve().is_relative_to(data.resolve()):
        raise OutputError(f"output {out} is inside the processed folder {data}",
                          hint="write the tokenizer next to it, e.g. data/tokenizer.json")


def train_tokenizer(data: Path, out: Path, config: TokenizerConfig, *, overwrite: bool,
                    progress: ProgressFn | None = None) -> TokenizerReport:
    """Train on the processed folder `data` and write the tokenizer file `out`."""
    from fragment_llm.data.processed import ProcessedCorpus  # pyarrow: only when needed

    check_output(out, overwrite, data)
    started = time.perf_counter()
    workers = cap_workers(config.workers, tokenizer_bytes(config.vocab_size))
    corpus = ProcessedCorpus.open(data)
    holdout = Holdout(corpus.documents, config.holdout_fraction)
    tok = Tokenizer.train(holdout.training_texts(corpus.iter_texts()), config,
                          progress or no_progress, corpus_sha256=corpus.manifest_sha256,
                          total_chars=corpus.total_chars, workers=workers.count)
    holdout.finish_sample(corpus.iter_texts())
    bytes_per_token = holdout.bytes_per_token(tok)
    check_output(out, overwrite, data)  # again: it may have appeared while we trained
    make_dirs(out.parent)
    tok.save(out, replace=overwrite)  # and at the rename itself, without --overwrite
    info = tok.training
    assert info is not None  # set by Tokenizer.train
    return TokenizerReport(
        out=out, vocab_size=tok.vocab_size, requested_vocab_size=config.vocab_size,
        merges=len(tok.merges), stop_reason=info.stop_reason, documents_trained=info.documents,
        chars_trained=info.chars, documents_held_out=holdout.count,
        bytes_per_token=bytes_per_token, seconds=time.perf_counter() - started,
        sha256=tok.sha256, note=workers.note)
