"""Masked batches: a target whose loss-mask entry is 0 becomes IGNORED, in the one place
blocks become tensors and in every order built on it (training stream, DataLoader
dataset, evaluation); a mask that does not fit its shard is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fragment_llm.data.batches import (
    IGNORED,
    TokenBlockDataset,
    TokenSplit,
    TokenStream,
    eval_batches,
    inputs_and_targets,
    spread_indices,
)
from fragment_llm.errors import DatasetError

BLOCK = 8


@st.composite
def blocks_and_masks(draw) -> tuple[np.ndarray, np.ndarray]:
    """Token blocks (B, T+1) and 0/1 masks of the same shape."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(2, 12)))
    blocks = draw(arrays(np.uint16, shape, elements=st.integers(0, 299)))
    masks = draw(arrays(np.uint8, shape, elements=st.integers(0, 1)))
    return blocks, masks


@settings(max_examples=60, deadline=None)
@given(blocks_and_masks())
def test_masked_targets_are_ignored_exactly_where_the_mask_is_zero(drawn):
    blocks, masks = drawn
    inputs, targets = inputs_and_targets(blocks, masks)
    plain_inputs, plain_targets = inputs_and_targets(blocks)
    assert torch.equal(inputs, plain_inputs)  # the mask never touches the inputs
    assert torch.equal(plain_targets, torch.from_numpy(blocks[:, 1:].astype(np.int64)))
    # target t predicts token t+1, so it is counted when that token's mask is 1
    for b, t in np.ndindex(*targets.shape):
        expected = int(blocks[b, t + 1]) if masks[b, t + 1] else IGNORED
        assert int(targets[b, t]) == expected


def masked_split(seed: int = 0, lengths: tuple[int, ...] = (75, 41, 9, 60)
                 ) -> tuple[TokenSplit, list[np.ndarray], list[np.ndarray]]:
    """A split of several shards (one too short for a block), each with a random mask."""
    rng = np.random.default_rng(seed)
    shards = [rng.integers(0, 300, n).astype(np.uint16) for n in lengths]
    masks = [(rng.random(n) < 0.4).astype(np.uint8) for n in lengths]
    return TokenSplit(tuple(shards), tuple(masks)), shards, masks


def block_of(shards: list[np.ndarray], masks: list[np.ndarray], index: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Block `index` of the split and its mask, found by walking the shards here (not
    through the split's own bookkeeping)."""
    for shard, mask in zip(shards, masks, strict=True):
        count = max(0, (len(shard) - 1) // BLOCK)
        if index < count:
            start = index * BLOCK
            return shard[start:start + BLOCK + 1], mask[start:start + BLOCK + 1]
        index -= count
    raise AssertionError("block index past the split")


def expected_targets(block: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(mask[1:] == 1, block[1:].astype(np.int64), IGNORED))


def test_the_training_stream_ignores_targets_where_the_next_token_is_masked_out():
    split, shards, masks = masked_split()
    stream = TokenStream(split, BLOCK, seed=3)
    total = split.num_blocks(BLOCK)
    ignored = counted = 0
    for _ in range(2 * total // 3 + 1):  # past an epoch: the second permutation too
        first = stream.cursor
        inputs, targets = stream.next_batch(3)
        for row, k in enumerate(range(first, first + 3)):
            block, mask = block_of(shards, masks, stream.block_index(k))
            assert torch.equal(inputs[row], torch.from_numpy(block[:-1].astype(np.int64)))
            assert torch.equal(targets[row], expected_targets(block, mask))
            ignored += int((targets[row] == IGNORED).sum())
            counted += int((targets[row] != IGNORED).sum())
    assert ignored and counted  # both kinds were seen, so the check compared something


def test_the_dataloader_dataset_masks_as_the_stream_does():
    split, shards, masks = masked_split(seed=1)
    dataset = TokenBlockDataset(split, BLOCK, seed=5, limit=12)
    stream = TokenStream(split, BLOCK, seed=5)
    for k, (inputs, targets) in enumerate(dataset):
        block, mask = block_of(shards, masks, stream.block_index(k))
        assert torch.equal(inputs, torch.from_numpy(block[:-1].astype(np.int64)))
        assert torch.equal(targets, expected_targets(block, mask))


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_evaluation_batches_ignore_targets_where_the_next_token_is_masked_out(rank, world):
    split, shards, masks = masked_split(seed=2)
    mine = spread_indices(split.num_blocks(BLOCK), 7)[rank::world]
    rows = [row for inputs, targets in eval_batches(split, BLOCK, 2, 7, rank, world)
            for row in zip(inputs, targets, strict=True)]
    assert len(rows) == len(mine)
    for (inputs, targets), index in zip(rows, mine, strict=True):
        block, mask = block_of(shards, masks, index)
        assert torch.equal(inputs, torch.from_numpy(block[:-1].astype(np.int64)))
        assert torch.equal(targets, expected_targets(block, mask))


def test_an_unmasked_split_ignores_nothing():
    _, shards, _ = masked_split()
    split = TokenSplit(tuple(shards))
    assert not split.masked
    for _, targets in eval_batches(split, BLOCK, 4, 100):
        assert bool((targets != IGNORED).all())


@pytest.mark.parametrize("mask_lengths", [
    (75, 41, 9, 59),  # one mask a token short
    (75, 41, 9, 61),  # one a token long
    (75, 41, 9),  # a shard without its mask
    (75, 41, 9, 60, 5),  # a mask without its shard
])
def test_masks_that_do_not_match_the_shards_are_refused(mask_lengths):
    _, shards, _ = masked_split()
    masks = tuple(np.ones(n, dtype=np.uint8) for n in mask_lengths)
    with pytest.raises(DatasetError, match="loss mask of its own length"):
        TokenSplit(tuple(shards), masks)
