"""data shards: the token-shard folder's cache key and split, and the loader's refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fragment_llm.data.batches import TokenStream
from fragment_llm.data.shards import MANIFEST, TokenShards, cache_key, is_validation
from fragment_llm.errors import DatasetError
from tests.helpers import write_token_shards


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
    folder = write_token_shards(tmp_path / "tok", [np.arange(1000) % 300], [np.arange(100)])
    mutate(folder)
    with pytest.raises(DatasetError, match=rule):
        TokenShards.open(folder, 300)


def test_token_id_beyond_vocab_is_refused(tmp_path):
    folder = write_token_shards(tmp_path / "tok", [np.full(100, 299)], [np.arange(10)], vocab=299)
    with pytest.raises(DatasetError, match="token id 299 is not below"):
        TokenShards.open(folder, 299)


def test_manifest_path_escaping_the_folder_is_refused(tmp_path):
    folder = write_token_shards(tmp_path / "tok", [np.arange(100)], [np.arange(10)])
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["train"]["shards"][0]["file"] = "../train-00000.bin"
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="invalid token manifest"):
        TokenShards.open(folder, 300)


def test_symlinked_shard_is_refused(tmp_path):
    folder = write_token_shards(tmp_path / "tok", [np.arange(100)], [np.arange(10)])
    real = tmp_path / "elsewhere.bin"
    (folder / "train-00000.bin").rename(real)
    (folder / "train-00000.bin").symlink_to(real)
    with pytest.raises(DatasetError, match="symlink"):
        TokenShards.open(folder, 300)


def test_vocab_mismatch_is_refused(tmp_path):
    folder = write_token_shards(tmp_path / "tok", [np.arange(100)], [np.arange(10)])
    with pytest.raises(DatasetError, match="vocab size 300"):
        TokenShards.open(folder, 512)


def test_too_few_tokens_for_a_block_is_refused(tmp_path):
    folder = write_token_shards(tmp_path / "tok", [np.arange(10)], [np.arange(10)])
    with pytest.raises(DatasetError, match="not enough tokens"):
        TokenStream(TokenShards.open(folder, 300).train, 64, seed=0)
