"""Byte-level BPE: counting chunks, learning merges, and applying them to a chunk.

This module owns the algorithm only: it takes chunk counts and returns merges, and turns
text into token ids. It knows nothing about files, special tokens or the CLI (see
`tokenizer.py`), how text is split (`pretokenize.py`) or how chunks are counted
(`chunk_count.py`).

Representation. A chunk's tokens are held as a `str` whose characters are token ids:
`chr(id)`. Bytes are ids 0-255 and merge k creates id 256 + k, so a chunk starts as its
UTF-8 bytes decoded as Latin-1 and applying merge (a, b) -> t is one C-level call:

    >>> "the".encode("utf-8").decode("latin-1").replace("th", chr(256))
    'Āe'                                            # ids [256, 101]

`str.replace` works left to right without overlaps, which is exactly how BPE applies a
merge, so `"aaa".replace("aa", X) == X + "a"`. Ids stay below 0x110000 (vocab_size is
capped at 2**20); surrogate code points are fine inside a `str` and never leave it.

Training keeps, for every adjacent pair (a 2-character str): its count weighted by chunk
frequency, the list of chunks that may contain it (stale entries are checked with `in`),
and a max-heap with lazy invalidation. A merge only creates pairs that contain the new
token; every other count can only fall. So each pair is pushed once, when it is created,
and an entry popped with a stale (too high) count is pushed back with its current count:
the first entry popped whose count is current is the true maximum.

Tie-break: the highest count wins; among equal counts, the smallest pair (a, b) by ids,
compared as (a, then b). A merge whose bytes equal an existing token's bytes is skipped
and never considered again, so every token's byte string is unique; so is one that would
make a token longer than `max_token_bytes`, and training stops before the table of all
tokens' bytes passes `max_table_bytes` (the loader's caps, in tokenizer.py).
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain, islice, repeat
from multiprocessing.pool import Pool
from operator import add
from typing import Final

from fragment_llm.events import ProgressFn, no_progress
from fragment_llm.safety.signals import uninterrupted
from fragment_llm.safety.workers import die_with_parent
from fragment_llm.tokenizer.chunk_count import worker_context
from fragment_llm.tokenizer.pretokenize import SplitPattern, Splitter

BYTES: Final = 256
Merge = tuple[int, int]

_SURROGATES = re.compile("[\ud800-\udfff]")


def to_symbols(chunk: str) -> str:
    """A chunk's UTF-8 bytes as a str of byte ids: `"é" -> "\\xc3\\xa9"`.

    A lone surrogate cannot be encoded as UTF-8; it is encoded as U+FFFD instead.
    """
    try:
        return chunk.encode("utf-8").decode("latin-1")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", chunk).encode("utf-8").decode("latin-1")


def token_bytes_table(merges: Iterable[Merge]) -> list[bytes]:
    """The bytes of every token: `[(104, 105)] -> [b"\\x00", ..., b"\\xff", b"hi"]`."""
    table = [bytes([i]) for i in range(BYTES)]
    for a, b in merges:
        table.append(table[a] + table[b])
    return table


# --------------------------------------------------------------------------- training

PROGRESS_EVERY = 128


@dataclass(frozen=True)
class TrainedMerges:
    merges: list[Merge]
    skipped_duplicates: int
    stop_reason: str
    skipped_long: int = 0  # merges that would have made a token past max_token_bytes


def train_merges(chunks: Counter[str], n_merges: int, min_frequency: int,
                 progress: ProgressFn = no_progress, *, max_token_bytes: int | None = None,
                 max_table_bytes: int | None = None) -> TrainedMerges:
    """Learn up to `n_merges` merges from chunk frequencies.

    `Counter({"aaab": 2})`, 2 merges -> `[(97, 97), (97, 98)]`: "aa" sits at two
    positions (count 4); then "ab" and "Āa" both have count 2 and the smaller pair wins.
    """
    trainer = _MergeTrainer(chunks, min_frequency, max_token_bytes, max_table_bytes)
    return trainer.run(n_merges, progress)


class _MergeTrainer:
    """The incremental state of one training run (see the module docstring)."""

    def __init__(self, chunks: Counter[str], min_frequency: int,
                 max_token_bytes: int | None = None,
                 max_table_bytes: int | None = None) -> None:
        self.max_token_bytes = max_token_bytes
        self.max_table_bytes = max_table_bytes
        self.words = [to_symbols(chunk) for chunk in chunks]
        self.freqs = list(chunks.values())
        self.min_frequency = max(1, min_frequency)
        self.where = _index_pairs(self.words)
        # A pair's count is the frequency-weighted number of positions holding it; the
        # index lists a chunk once per position, so summing frequencies over it is exact.
        get_freq = self.freqs.__getitem__
        self.counts = {pair: sum(map(get_freq, holders)) for pair, holders in self.where.items()}
        self.heap = [(-count, pair) for pair, count in self.counts.items()
                     if count >= self.min_frequency]
        heapq.heapify(self.heap)
        self.vocab = token_bytes_table(())
        self.known = set(self.vocab)
        self.banned: set[str] = set()

    def run(self, n_merges: int, progress: ProgressFn) -> TrainedMerges:
        merges: list[Merge] = []
        skipped = too_long = 0
        table_bytes = BYTES
        reason = "vocab_size reached"
        while len(merges) < n_merges:
            pair = self._pop_best()
            if pair is None:
                reason = "no pair occurs min_frequency times"
                break
            merged = self.vocab[ord(pair[0])] + self.vocab[ord(pair[1])]
            long = self.max_token_bytes is not None and len(merged) > self.max_token_bytes
            if long or merged in self.known:
                self.banned.add(pair)  # a duplicate or over-long token: never merge it
                too_long += long
                skipped += not long
                continue
            if self.max_table_bytes is not None \
                    and table_bytes + len(merged) > self.max_table_bytes:
                reason = "token table size cap reached"
                break
            table_bytes += len(merged)
            merges.append((ord(pair[0]), ord(pair[1])))
            self.vocab.append(merged)
            self.known.add(merged)
            self._apply(pair, chr(BYTES + len(merges) - 1))
            if len(merges) % PROGRESS_EVERY == 0:
                progress("merging", len(merges), n_merges)
        progress("merging", len(merges), n_merges)
        return TrainedMerges(merges, skipped, reason, too_long)

    def _pop_best(self) -> str | None:
        """The pair with the highest current count (ties: smallest pair), or None."""
        heap, counts = self.heap, self.counts
        while heap:
            stored, pair = heapq.heappop(heap)
            count = counts.get(pair, 0)
            if pair in self.banned or count < self.min_frequency:
                self.where.pop(pair, None)  # counts never grow back: this pair is done
                continue
            if count == -stored:
                return pair
            heapq.heappush(heap, (-count, pair))
        return None

    def _apply(self, pair: str, token: str) -> None:
        """Replace `pair` by `token` in every chunk holding it, updating counts and index."""
        words, freqs, counts = self.words, self.freqs, self.counts
        first, second = pair
        created: defaultdict[str, list[int]] = defaultdict(list)
        holders_of = created.__getitem__
        for i in self.where.pop(pair):
            word = words[i]
            at = word.find(pair)
            if at < 0:
                continue  # stale entry, or a second listing of a chunk already done
            new = word.replace(pair, token)
            if len(new) + 1 != len(word):
                self._apply_many(i, pair, token, created)
                continue
            # One occurrence: only its two neighbours change (L a b R -> L t R).
            words[i] = new
            freq = freqs[i]
            if at:
                left = new[at - 1]
                counts[left + first] -= freq
                holders_of(left + token).append(i)
            if at + 1 < len(new):
                right = new[at + 1]
                counts[second + right] -= freq
                holders_of(token + right).append(i)
        del counts[pair]
        self._register(created)

    def _apply_many(self, i: int, pair: str, token: str,
                    created: defaultdict[str, list[int]]) -> None:
        """Several occurrences in one chunk: recount the chunk's pairs from scratch."""
        word, freq, counts = self.words[i], self.freqs[i], self.counts
        new = self.words[i] = word.replace(pair, token)
        for old_pair in map(add, word, word[1:]):
            counts[old_pair] -= freq
        for new_pair in map(add, new, new[1:]):
            if token in new_pair:
                created[new_pair].append(i)
            else:
                counts[new_pair] += freq
        counts[pair] = 0

    def _register(self, created: defaultdict[str, list[int]]) -> None:
        """Count the pairs the merge created; index and queue those that could win."""
        get_freq = self.freqs.__getitem__
        for pair, holders in created.items():
            count = self.counts[pair] = sum(map(get_freq, holders))
            if count >= self.min_frequency:
                self.where[pair] = holders
                heapq.heappush(self.heap, (-count, pair))


def _index_pairs(words: list[str]) -> defaultdict[str, list[int]]:
    """pair -> indices of the chunks holding it, once per position (C-level appends)."""
    where: defaultdict[str, list[int]] = defaultdict(list)
    get_list = where.__getitem__
    for i, word in enumerate(words):
        deque(map(list.append, map(get_list, map(add, word, word[1:])), repeat(i)), 0)
    return where


# --------------------------------------------------------------------------- encoding

# Chunks up to this many symbols take the simple loop (merge the lowest-ranked pair,
# update its neighbours, repeat): O(n^2) but fast for words. Longer ones take a pass over
# candidate merges in rank order, O(n) per merge that can apply (see `Merger.merge`).
SHORT_CHUNK = 64


class Merger:
    """Applies merges to one chunk by pair rank: lowest rank first, leftmost on ties.

    `Merger([(104, 105)]).merge("hih") == "\\u0100h"`  (ids [256, 104])

    Why rank order can be applied as a single pass: a merge creating token 256+r can only
    be used by later merges, so after applying rank r every pair left has a higher rank.
    Applying each merge's occurrences left to right in rank order therefore gives exactly
    the ids of the heap-based algorithm in HF tokenizers.
    """

    def __init__(self, merges: list[Merge]) -> None:
        self.pairs = [chr(a) + chr(b) for a, b in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.pairs)}
        self.tokens = [chr(BYTES + rank) for rank in range(len(merges))]
        self._by_left: dict[str, list[int]] | None = None
        self._by_right: dict[str, list[int]] = {}

    def merge(self, symbols: str) -> str:
        if len(symbols) <= SHORT_CHUNK:
            return self._merge_short(symbols)
        return self._merge_long(symbols)

    def _merge_short(self, symbols: str) -> str:
        """One merge at a time: the lowest rank, leftmost first (HF's order exactly).

        `ranks[i]` is the rank of the pair at (i, i + 1); after a merge only its two
        neighbours change, so each step is a C-level `min` + `index` and two lookups.
        """
        get, none, tokens = self.ranks.get, len(self.pairs), self.tokens
        parts = list(symbols)
        ranks = list(map(get, map(add, symbols, symbols[1:]), repeat(none)))
        while ranks:
            rank = min(ranks)
            if rank == none:
                break
            at = ranks.index(rank)
            new = parts[at] = tokens[rank]
            del parts[at + 1], ranks[at]
            if at:
                ranks[at - 1] = get(parts[at - 1] + new, none)
            if at < len(ranks):
                ranks[at] = get(new + parts[at + 1], none)
        return "".join(parts)

    def _merge_long(self, symbols: str) -> str:
        """Rank-order pass over the merges whose two symbols occur: each costs one C scan.

        Near-linear: 1 MB of one letter applies ~20 merges. `present` (a superset of the
        chunk's symbols: merged-away ones are not removed) only limits the candidates.
        """
        by_left, by_right = self._symbol_index()
        pairs, tokens = self.pairs, self.tokens
        present = set(symbols)
        heap = [rank for a in present for rank in by_left.get(a, ()) if pairs[rank][1] in present]
        heapq.heapify(heap)
        last = -1
        while heap:
            rank = heapq.heappop(heap)
            if rank == last or pairs[rank] not in symbols:
                continue
            last = rank
            symbols = symbols.replace(pairs[rank], tokens[rank])
            new = tokens[rank]
            present.add(new)
            for later in by_left.get(new, ()):
                if pairs[later][1] in present:
                    heapq.heappush(heap, later)
            for later in by_right.get(new, ()):
                if pairs[later][0] in present:
                    heapq.heappush(heap, later)
        return symbols

    def _symbol_index(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """symbol -> ranks of the merges it starts / ends (built on first long chunk)."""
        if self._by_left is None:
            by_left: defaultdict[str, list[int]] = defaultdict(list)
            by_right: defaultdict[str, list[int]] = defaultdict(list)
            for rank, (a, b) in enumerate(self.pairs):
                by_left[a].append(rank)
                by_right[b].append(rank)
            self._by_left, self._by_right = dict(by_left), dict(by_right)
        return self._by_left, self._by_right


# A cached chunk costs ~150 bytes; long chunks are rare and would pin their text.
CACHE_ENTRIES = 1 << 17
MAX_CACHED_CHUNK_CHARS = 256


class ChunkCache(dict[str, tuple[int, ...]]):
    """chunk -> its token ids; a miss runs the merges.

    Hits are plain C-level dict lookups (`map(cache.__getitem__, chunks)`); only misses
    run Python. Eviction is honest FIFO, not LRU: when `max_entries` is reached the older
    half (by insertion) is dropped; hits do not refresh an entry, because tracking
    recency would put Python code on the hit path.
    """

    def __init__(self, merger: Merger, max_entries: int = CACHE_ENTRIES) -> None:
        super().__init__()
        self._merger = merger
        self._max_entries = max(2, max_entries)

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        ids = tuple(map(ord, self._merger.merge(to_symbols(chunk))))
        if len(chunk) <= MAX_CACHED_CHUNK_CHARS:
            if len(self) >= self._max_entries:
                old = list(islice(self, len(self) // 2))
                deque(map(self.__delitem__, old), 0)
            self[chunk] = ids
        return ids


class ChunkEncoder:
    """Text -> token ids with one splitter and one merge table; no special tokens.

    `encode` is C-level on cache hits: split, look every chunk up, chain the id tuples.
    """

    def __init__(self, splitter: Splitter, merges: list[Merge],
                 cache_entries: int = CACHE_ENTRIES) -> None:
        self.splitter = splitter
        self.cache = ChunkCache(Merger(merges), cache_entries)

    def encode(self, text: str) -> list[int]:
        return list(chain.from_iterable(map(self.cache.__getitem__, self.splitter.split(text))))


# Batches smaller than this are encoded in-process: starting workers would cost more.
MIN_PARALLEL_CHARS = 1 << 20
_WORKER_ENCODER: ChunkEncoder | None = None


def _init_encode_worker(spec: SplitPattern, merges: list[Merge]) -> None:
    global _WORKER_ENCODER
    die_with_parent()
    _WORKER_ENCODER = ChunkEncoder(Splitter(spec), merges)  # validated by the parent


def encode_in_worker(text: str) -> list[int]:
    """What an `encoder_pool` maps over texts."""
    if _WORKER_ENCODER is None:  # an invariant of the pool's initializer, not user input
        raise RuntimeError("encode worker used before its initializer ran")
    return _WORKER_ENCODER.encode(text)


def encoder_pool(spec: SplitPattern, merges: list[Merge], workers: int) -> Pool:
    """A `multiprocessing.Pool` of `workers` encoders (map `encode_in_worker` with it).

    Workers rebuild the encoder from the merges and the pattern (nothing else crosses),
    import neither torch nor pyarrow, and end with this process.
    """
    with uninterrupted():  # multiprocessing's constructors must not be split by a signal
        return worker_context().Pool(workers, _init_encode_worker, (spec, merges))


def encode_many(encoder: ChunkEncoder, merges: list[Merge], texts: list[str],
                workers: int) -> list[list[int]]:
    """Encode `texts` in order, on `workers` processes when the batch is big enough."""
    if workers <= 1 or len(texts) < 2 or sum(map(len, texts)) < MIN_PARALLEL_CHARS:
        return list(map(encoder.encode, texts))
    chunksize = max(1, len(texts) // (workers * 8))
    with encoder_pool(encoder.splitter.spec, merges, workers) as pool:
        return pool.map(encode_in_worker, texts, chunksize=chunksize)
