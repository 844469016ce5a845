"""data batches: deterministic resumable order, rank/worker sharding, one block slicer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fragment_llm.data.batches import (
    TokenBlockDataset,
    TokenSplit,
    TokenStream,
    consecutive_batches,
    eval_batches,
    permuted_index,
    slice_block,
    spread_indices,
)
from fragment_llm.data.shards import TokenShards
from fragment_llm.errors import DatasetError
from tests.helpers import write_token_shards


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 300, 1000), rng.integers(0, 300, 517)]
    folder = write_token_shards(tmp_path / "tok", train, [rng.integers(0, 300, 200)])
    return TokenShards.open(folder, 300)


@given(st.integers(1, 5000), st.integers(0, 2**32), st.integers(0, 5))
@settings(max_examples=30, deadline=None)
def test_permuted_index_is_a_bijection(size, seed, epoch):
    assert sorted(permuted_index(i, size, seed, epoch) for i in range(size)) == list(range(size))


def test_stream_batches_are_shifted_blocks(shards):
    stream = TokenStream(shards.train, block_size=16, seed=1)
    x, y = stream.next_batch(4)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_blocks_never_straddle_shards(shards):
    assert shards.train.num_blocks(16) == (999 // 16) + (516 // 16)


def test_stream_resumes_exactly(shards):
    first = TokenStream(shards.train, 16, seed=3)
    for _ in range(5):
        first.next_batch(4)
    saved = first.state_dict()
    expected = [first.next_batch(4)[0] for _ in range(20)]  # crosses an epoch boundary
    second = TokenStream(shards.train, 16, seed=3)
    second.load_state_dict(saved)
    assert all(torch.equal(a, second.next_batch(4)[0]) for a in expected)


def test_resume_with_another_seed_is_refused(shards):
    stream = TokenStream(shards.train, 16, seed=3)
    with pytest.raises(DatasetError, match="another seed"):
        TokenStream(shards.train, 16, seed=4).load_state_dict(stream.state_dict())


def test_ranks_partition_the_global_order(shards):
    single = TokenStream(shards.train, 16, seed=5)
    rows = [single.next_batch(2)[0] for _ in range(4)]  # items 0..7
    rank0, rank1 = (TokenStream(shards.train, 16, seed=5, rank=r, world=2) for r in (0, 1))
    for step in range(2):
        assert torch.equal(rank0.next_batch(2)[0], rows[2 * step])
        assert torch.equal(rank1.next_batch(2)[0], rows[2 * step + 1])


def test_dataloader_workers_and_ranks_cover_items_once(shards):
    seen = []
    for rank in range(2):
        dataset = TokenBlockDataset(shards.train, 16, seed=9, rank=rank, world=2, limit=40)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        seen += [tuple(x.tolist()) for x, _ in loader]
    stream = TokenStream(shards.train, 16, seed=9)
    expected = [tuple(stream.item(k)[:-1].tolist()) for k in range(40)]
    assert sorted(seen) == sorted(expected)


def test_eval_batches_cover_validation_in_order(shards):
    batches = list(eval_batches(shards.val, 16, batch_size=5, max_blocks=100))
    assert sum(len(x) for x, _ in batches) == 199 // 16


def test_eval_batches_sample_the_whole_split_not_its_first_blocks(tmp_path):
    # two val shards (documents): a 4-block sample must reach into the second one
    folder = write_token_shards(tmp_path / "tok", [np.arange(100)], [np.zeros(161), np.ones(161)])
    firsts = [int(x[0, 0]) for x, _ in eval_batches(TokenShards.open(folder).val, 16, 1, 4)]
    assert firsts == [0, 0, 1, 1]


def test_the_order_is_pinned():
    """The permutation is part of every saved run's position: an exact resume of a run
    started by an earlier release needs these very numbers."""
    assert [permuted_index(i, 10, 1, 0) for i in range(10)] == [3, 4, 6, 7, 2, 9, 0, 1, 5, 8]
    assert [permuted_index(i, 1000, 7, 3) for i in range(8)] == [241, 789, 640, 265, 920,
                                                                 376, 282, 677]


@given(st.integers(1, 300), st.integers(1, 40), st.integers(1, 9), st.integers(0, 60))
def test_every_order_cuts_blocks_the_same_way(length, block_size, batch_size, count):
    """One slicer: a split's blocks, the first blocks of a flat array and the targets of
    every batch are `slice_block`s, shifted by one."""
    tokens = np.arange(length, dtype=np.uint16)
    split = TokenSplit((tokens,))
    count = min(count, split.num_blocks(block_size))
    starts = split.block_starts(block_size)
    expected = [tokens[k * block_size:(k + 1) * block_size + 1].tolist() for k in range(count)]
    assert [split.block(k, block_size, starts).tolist() for k in range(count)] == expected
    assert [slice_block(tokens, k, block_size).tolist() for k in range(count)] == expected
    batches = list(consecutive_batches(tokens, block_size, batch_size, count))
    assert all(x.dtype == y.dtype == torch.int64 for x, y in batches)
    assert [row for x, _ in batches for row in x.tolist()] == [e[:-1] for e in expected]
    assert [row for _, y in batches for row in y.tolist()] == [e[1:] for e in expected]


@given(st.integers(0, 100_000), st.integers(1, 5_000))
def test_spread_indices_are_distinct_in_range_and_even(total, count):
    picked = spread_indices(total, count)
    assert len(picked) == min(total, count)
    assert picked == sorted(set(picked)) and all(0 <= k < total for k in picked)
    if picked:
        gaps = np.diff([*picked, total])
        assert picked[0] == 0 and gaps.max() - gaps.min() <= 1
