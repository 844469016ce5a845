"""data: token-shard loader rules, deterministic resumable order, rank/worker sharding."""

from __future__ import annotations

import json

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
from fragment_llm.data.shards import MANIFEST, TokenShards, cache_key, is_validation
from fragment_llm.errors import DatasetError
from fragment_llm.safety.files import sha256_bytes

SHA = "0" * 64


def write_shards(folder, train: list[np.ndarray], val: list[np.ndarray], vocab=300,
                 dtype="uint16", **overrides):
    """A token-shard folder built by hand, so loader tests need no tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)

    def split(name, arrays):
        shards = []
        for i, array in enumerate(arrays):
            raw = np.asarray(array, dtype=dtype).tobytes()
            (folder / f"{name}-{i:05d}.bin").write_bytes(raw)
            shards.append({"file": f"{name}-{i:05d}.bin", "tokens": len(array),
                           "sha256": sha256_bytes(raw)})
        return {"documents": len(arrays), "tokens": sum(len(a) for a in arrays),
                "text_bytes": 4 * sum(len(a) for a in arrays), "shards": shards}

    manifest = {"format": "fragment-tokens", "version": 1, "fragment_version": "test",
                "dtype": dtype, "vocab_size": vocab, "eot_id": vocab - 1, "val_fraction": 0.1,
                "tokenizer_sha256": SHA, "processed_manifest_sha256": SHA,
                "train": split("train", train), "val": split("val", val)}
    manifest.update(overrides)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    folder = write_shards(tmp_path / "tok", [rng.integers(0, 300, 1000), rng.integers(0, 300, 517)],
                          [rng.integers(0, 300, 200)])
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
    folder = write_shards(tmp_path / "tok", [np.arange(100)], [np.zeros(161), np.ones(161)])
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


def test_split_and_cache_key_are_deterministic():
    assert is_validation("00000000" + "f" * 56, 0.1) and not is_validation("f" * 64, 0.1)
    assert cache_key("a", "b", 0.1) == cache_key("a", "b", 0.1) != cache_key("a", "b", 0.2)


@pytest.mark.parametrize("mutate,rule", [
    (lambda f: (f / "train-00000.bin").write_bytes(b"\x01" * 2000), "sha256 mismatch"),
    (lambda f: (f / "train-00000.bin").write_bytes(b"\x01" * 2001), "does not hold"),
    (lambda f: (f / MANIFEST).write_text("[" * 100_000), "nested deeper"),
    (lambda f: (f / MANIFEST).write_text('{"format": "x"}'), "invalid token manifest"),
    (lambda f: (f / "train-00000.bin").unlink(), "file not found"),
])
def test_tampered_shards_are_refused(tmp_path, mutate, rule):
    folder = write_shards(tmp_path / "tok", [np.arange(1000) % 300], [np.arange(100)])
    mutate(folder)
    with pytest.raises(DatasetError, match=rule):
        TokenShards.open(folder, 300)


def test_token_id_beyond_vocab_is_refused(tmp_path):
    folder = write_shards(tmp_path / "tok", [np.full(100, 299)], [np.arange(10)], vocab=299)
    with pytest.raises(DatasetError, match="token id 299 is not below"):
        TokenShards.open(folder, 299)


def test_manifest_path_escaping_the_folder_is_refused(tmp_path):
    folder = write_shards(tmp_path / "tok", [np.arange(100)], [np.arange(10)])
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["train"]["shards"][0]["file"] = "../train-00000.bin"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="invalid token manifest"):
        TokenShards.open(folder, 300)


def test_symlinked_shard_is_refused(tmp_path):
    folder = write_shards(tmp_path / "tok", [np.arange(100)], [np.arange(10)])
    real = tmp_path / "elsewhere.bin"
    (folder / "train-00000.bin").rename(real)
    (folder / "train-00000.bin").symlink_to(real)
    with pytest.raises(DatasetError, match="symlink"):
        TokenShards.open(folder, 300)


def test_vocab_mismatch_is_refused(tmp_path):
    folder = write_shards(tmp_path / "tok", [np.arange(100)], [np.arange(10)])
    with pytest.raises(DatasetError, match="vocab size 300"):
        TokenShards.open(folder, 512)


def test_too_few_tokens_for_a_block_is_refused(tmp_path):
    folder = write_shards(tmp_path / "tok", [np.arange(10)], [np.arange(10)])
    with pytest.raises(DatasetError, match="not enough tokens"):
        TokenStream(TokenShards.open(folder, 300).train, 64, seed=0)
