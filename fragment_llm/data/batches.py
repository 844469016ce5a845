"""Blocks and batches: how token arrays are cut into training examples, and in what order.

Owns the one block slicer (`slice_block`: T+1 tokens, T inputs plus their shifted targets),
the one place those become (inputs, targets) tensors (`inputs_and_targets`), and the
deterministic, resumable orders built on them: `TokenStream` (training, one rank),
`TokenBlockDataset` (the same order over DataLoader workers), `eval_batches` (a spread
sample of a split) and `consecutive_batches` (the first blocks of a flat array).

Knows nothing of files, manifests or models: `TokenSplit` is handed memory-mapped
arrays by `shards.py` (and, for conversations, a loss mask beside each: a target whose
mask is False becomes `IGNORED`, which the loss skips), and batches are plain int64
tensors. The orders are part of a
run's resumable state: changing them breaks an exact resume.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fragment_llm.errors import DatasetError


def slice_block(tokens: np.ndarray, index: int, block_size: int) -> np.ndarray:
    """Block `index` of a flat token array: tokens [index*T, index*T + T + 1), the T
    inputs and the one more token their targets need; consecutive blocks share one token.
    `slice_block(arange(10), 1, 4) -> [4, 5, 6, 7, 8]`."""
    start = index * block_size
    return tokens[start:start + block_size + 1]


IGNORED = -1  # a target the loss does not count (model/loss.py's default ignore_index)


def inputs_and_targets(blocks: np.ndarray, masks: np.ndarray | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of T+1 tokens, (..., T+1), as int64 inputs and their next-token targets,
    each (..., T): the targets are the inputs shifted by one. With `masks` (the blocks'
    loss masks, same shape), a target whose mask is False is `IGNORED`."""
    data = torch.from_numpy(blocks.astype(np.int64))
    inputs, targets = data[..., :-1], data[..., 1:]
    if masks is not None:
        keep = torch.from_numpy(np.asarray(masks[..., 1:], dtype=np.bool_))
        targets = targets.where(keep, IGNORED)
    return inputs, targets


@dataclass(frozen=True)
class TokenSplit:
    """One split as memory-mapped shards, addressed as non-overlapping blocks.

    Block k of size T is a `slice_block` of one shard: T inputs plus the shifted targets.
    Blocks never straddle shards. `masks`, when given, hold one loss-mask array per shard
    (same length, nonzero: the token is one the model is trained to produce).
    """

    shards: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        if self.masks and [len(m) for m in self.masks] != [len(s) for s in self.shards]:
            raise DatasetError("each token shard needs a loss mask of its own length")

    @property
    def masked(self) -> bool:
        return bool(self.masks)

    def block_counts(self, block_size: int) -> list[int]:
        return [max(0, (len(s) - 1) // block_size) for s in self.shards]

    def num_blocks(self, block_size: int) -> int:
        return sum(self.block_counts(block_size))

    def block(self, index: int, block_size: int, starts: list[int]) -> np.ndarray:
        """Block `index`, given `starts` = cumulative block counts (see `block_starts`)."""
        shard = bisect.bisect_right(starts, index) - 1
        return slice_block(self.shards[shard], index - starts[shard], block_size)

    def mask_block(self, index: int, block_size: int, starts: list[int]) -> np.ndarray:
        """The loss mask of block `index` (a masked split only)."""
        shard = bisect.bisect_right(starts, index) - 1
        return slice_block(self.masks[shard], index - starts[shard], block_size)

    def examples(self, indices: list[int], block_size: int, starts: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks `indices` as inputs (B, T) and targets (B, T), masked targets IGNORED."""
        blocks = np.stack([self.block(k, block_size, starts) for k in indices])
        masks = (np.stack([self.mask_block(k, block_size, starts) for k in indices])
                 if self.masked else None)
        return inputs_and_targets(blocks, masks)

    def block_starts(self, block_size: int) -> list[int]:
        starts, total = [], 0
        for count in self.block_counts(block_size):
            starts.append(total)
            total += count
        return starts


# --------------------------------------------------------------------- batch ordering

_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64's finaliser: a cheap, well-spread 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def permuted_index(index: int, size: int, seed: int, epoch: int) -> int:
    """Position `index` of a seeded pseudo-random permutation of range(size).

    A 4-round Feistel network over the next even power of two, cycle-walking until
    the result lands inside the range: a bijection with O(1) memory, so the order of
    any corpus is reproducible from (seed, epoch) alone.
    """
    half_bits = max(1, math.ceil(max(1, (size - 1).bit_length()) / 2))
    half_mask = (1 << half_bits) - 1
    key = _mix64(seed * 1_000_003 + epoch)
    while True:
        left, right = index >> half_bits, index & half_mask
        for round_no in range(4):
            left, right = right, left ^ (_mix64(key + round_no * 7919 + right) & half_mask)
        index = (left << half_bits) | right
        if index < size:
            return index


class TokenStream:
    """Deterministic, resumable batches of training blocks for one rank.

    Global item k is block `permuted_index(k % n, n, seed, k // n)`: every epoch a new
    permutation. Each `next_batch(B)` call takes items [cursor + rank*B, ... + B) and
    advances the shared cursor by world*B, so all ranks stay in lock step and the
    whole position is one integer.
    """

    def __init__(self, split: TokenSplit, block_size: int, seed: int,
                 rank: int = 0, world: int = 1) -> None:
        self.split, self.block_size, self.seed = split, block_size, seed
        self.rank, self.world = rank, world
        self.starts = split.block_starts(block_size)
        self.num_blocks = split.num_blocks(block_size)
        if self.num_blocks == 0:
            raise DatasetError(f"not enough tokens for one block of {block_size}",
                               hint="add text, or lower block_size")
        self.cursor = 0

    def block_index(self, k: int) -> int:
        return permuted_index(k % self.num_blocks, self.num_blocks, self.seed,
                              k // self.num_blocks)

    def item(self, k: int) -> np.ndarray:
        return self.split.block(self.block_index(k), self.block_size, self.starts)

    def examples(self, items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of global items `items`, (len(items), T) each."""
        return self.split.examples([self.block_index(k) for k in items], self.block_size,
                                   self.starts)

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs (B, T) and targets (B, T) of this rank's next B items."""
        first = self.cursor + self.rank * batch_size
        batch = self.examples(list(range(first, first + batch_size)))
        self.cursor += self.world * batch_size
        return batch

    @property
    def epoch(self) -> float:
        return self.cursor / self.num_blocks

    def state_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "seed": self.seed, "block_size": self.block_size,
                "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state.get("seed"), state.get("block_size")) != (self.seed, self.block_size):
            raise DatasetError("data position was saved with another seed or block size",
                               hint="resume with the same --seed and model block_size")
        cursor = state.get("cursor")
        if not isinstance(cursor, int) or cursor < 0:
            raise DatasetError(f"invalid data cursor {cursor!r} in the saved trainer state")
        self.cursor = cursor


class TokenBlockDataset(torch.utils.data.IterableDataset):
    """The same global order as `TokenStream`, split over DDP ranks and DataLoader workers.

    Worker w of rank r yields items k = start + r*W + w, start + (R*W) + r*W + w, ...
    (R ranks, W workers each), so no item is seen twice and none is skipped.
    """

    def __init__(self, split: TokenSplit, block_size: int, seed: int, rank: int = 0,
                 world: int = 1, start: int = 0, limit: int | None = None) -> None:
        super().__init__()
        self.stream = TokenStream(split, block_size, seed)
        self.rank, self.world, self.start, self.limit = rank, world, start, limit

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stride = self.world * workers
        k = self.start + self.rank * workers + worker
        while self.limit is None or k < self.start + self.limit:
            x, y = self.stream.examples([k])
            yield x[0], y[0]  # inputs (T,), targets (T,)
            k += stride


# ------------------------------------------------------------------------ evaluation


def spread_indices(total: int, count: int) -> list[int]:
    """`count` of the indices 0..total-1, evenly spaced, in order (all when count >= total).

    Evaluation samples blocks this way rather than taking the first ones: those all come
    from the first held-out document, and one document is not the held-out set.
    """
    count = min(total, count)
    return [k * total // count for k in range(count)]


def eval_batches(split: TokenSplit, block_size: int, batch_size: int, max_blocks: int,
                 rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`max_blocks` blocks spread evenly over the split (all of it when they fit), this
    rank's share, in batches."""
    starts = split.block_starts(block_size)
    mine = spread_indices(split.num_blocks(block_size), max_blocks)[rank::world]
    for first in range(0, len(mine), batch_size):
        yield split.examples(mine[first:first + batch_size], block_size, starts)


def consecutive_batches(tokens: np.ndarray, block_size: int, batch_size: int,
                        count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` blocks of a flat token array, in order, in batches."""
    for first in range(0, count, batch_size):
        last = min(count, first + batch_size)
        yield inputs_and_targets(np.stack([slice_block(tokens, k, block_size)
                                           for k in range(first, last)]))
