"""The processed-folder contract: manifest schema, its file text, and the hostile-folder reader."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fragment_llm.data.processed import (
    FORMAT,
    MANIFEST_NAME,
    VERSION,
    InputFile,
    ProcessedCorpus,
    ProcessedManifest,
    manifest_json,
    shard_name,
)
from fragment_llm.errors import ProcessedDataError
from tests.helpers import DOCS


def rewrite_manifest(folder: Path, change) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_open_reads_every_document_in_order(processed):
    corpus = ProcessedCorpus.open(processed)
    texts = list(corpus.iter_texts())
    assert texts == DOCS
    assert corpus.documents == len(DOCS)
    assert corpus.total_chars == sum(map(len, DOCS))
    assert corpus.manifest.format == FORMAT and corpus.manifest.version == VERSION
    raw = (processed / MANIFEST_NAME).read_bytes()
    assert corpus.manifest_sha256 == hashlib.sha256(raw).hexdigest()
    assert corpus.shard_paths == [processed / "shard-00000.parquet"]


def test_iter_documents_gives_source_and_hash(processed):
    docs = list(ProcessedCorpus.open(processed).iter_documents())
    assert [d.source for d in docs] == [f"doc{i:02d}.txt" for i in range(len(DOCS))]
    assert all(d.sha256 == hashlib.sha256(d.text.encode()).hexdigest() for d in docs)


def test_manifest_text_is_stable_and_round_trips(processed):
    manifest = ProcessedCorpus.open(processed).manifest
    text = manifest_json(manifest)
    assert text == (processed / MANIFEST_NAME).read_text()
    assert ProcessedManifest.model_validate(json.loads(text)) == manifest
    assert text.isascii() and text.count("\n") == len(manifest.files) + 11


def test_shard_names():
    assert shard_name(0) == "shard-00000.parquet" and shard_name(123) == "shard-00123.parquet"


def test_kept_file_has_no_reason_and_rejected_needs_one():
    with pytest.raises(ValueError, match="no reason"):
        InputFile(path="a", root="r", size=1, status="rejected")
    with pytest.raises(ValueError, match="no reason"):
        InputFile(path="a", root="r", size=1, status="kept", reason="binary")


# ------------------------------------------------------------------ refusals


def test_missing_folder_says_run_preprocess(tmp_path):
    with pytest.raises(ProcessedDataError, match="not found") as caught:
        ProcessedCorpus.open(tmp_path / "nope")
    assert "fragment preprocess" in caught.value.hint


def test_missing_manifest_says_run_preprocess(tmp_path):
    with pytest.raises(ProcessedDataError, match="no manifest.json") as caught:
        ProcessedCorpus.open(tmp_path)
    assert "fragment preprocess" in caught.value.hint


def test_manifest_symlink_refused(processed, tmp_path):
    real = tmp_path / "elsewhere.json"
    (processed / MANIFEST_NAME).rename(real)
    (processed / MANIFEST_NAME).symlink_to(real)
    with pytest.raises(ProcessedDataError, match="symlink"):
        ProcessedCorpus.open(processed)


def test_manifest_not_json(processed):
    (processed / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ProcessedDataError, match="invalid JSON"):
        ProcessedCorpus.open(processed)


def test_manifest_unknown_field(processed):
    rewrite_manifest(processed, lambda d: d.update(surprise=1))
    with pytest.raises(ProcessedDataError, match="surprise"):
        ProcessedCorpus.open(processed)


def test_manifest_newer_version(processed):
    rewrite_manifest(processed, lambda d: d.update(version=2))
    with pytest.raises(ProcessedDataError, match="version 2"):
        ProcessedCorpus.open(processed)


@pytest.mark.parametrize("name", ["../escape.parquet", "shard-0.parquet", "/etc/passwd",
                                  "shard-00000.parquet/../x", "shard-00001.parquet"])
def test_shard_name_outside_the_pattern(processed, name):
    rewrite_manifest(processed, lambda d: d["shards"][0].update(file=name))
    with pytest.raises(ProcessedDataError, match=r"shards\.0|shards must be named"):
        ProcessedCorpus.open(processed)


def test_counts_inconsistent_with_shards(processed):
    rewrite_manifest(processed, lambda d: d["counts"].update(documents=999))
    with pytest.raises(ProcessedDataError, match="counts.documents"):
        ProcessedCorpus.open(processed)


def test_tampered_shard(processed):
    shard = processed / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ProcessedDataError, match="sha256 differs"):
        ProcessedCorpus.open(processed)


def test_truncated_shard(processed):
    shard = processed / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ProcessedDataError, match="size"):
        ProcessedCorpus.open(processed)


def test_missing_shard(processed):
    (processed / "shard-00000.parquet").unlink()
    with pytest.raises(ProcessedDataError, match="not found"):
        ProcessedCorpus.open(processed)


def test_shard_symlink_refused(processed, tmp_path):
    shard = processed / "shard-00000.parquet"
    moved = tmp_path / "moved.parquet"
    shard.rename(moved)
    shard.symlink_to(moved)
    with pytest.raises(ProcessedDataError, match="symlink"):
        ProcessedCorpus.open(processed)


def test_shard_fifo_refused_without_blocking(processed):
    shard = processed / "shard-00000.parquet"
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(ProcessedDataError, match="not a regular file"):
        ProcessedCorpus.open(processed)


def _replace_shard(folder: Path, table: pa.Table, **changes) -> None:
    """Write `table` as shard 0 and make the manifest agree on size and hash."""
    shard = folder / "shard-00000.parquet"
    pq.write_table(table, shard)
    data = shard.read_bytes()
    fields = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **changes}
    rewrite_manifest(folder, lambda d: d["shards"][0].update(fields))


def test_shard_with_wrong_columns(processed):
    table = pa.table({"text": ["x"] * len(DOCS), "source": ["s"] * len(DOCS)})
    _replace_shard(processed, table)
    with pytest.raises(ProcessedDataError, match="columns"):
        ProcessedCorpus.open(processed)


def test_shard_with_wrong_type(processed):
    n = len(DOCS)
    table = pa.table({"text": list(range(n)), "source": ["s"] * n, "sha256": ["h"] * n})
    _replace_shard(processed, table)
    with pytest.raises(ProcessedDataError, match="type"):
        ProcessedCorpus.open(processed)


def test_shard_row_count_differs(processed):
    table = pa.table({"text": ["x"], "source": ["s"], "sha256": ["h"]})
    _replace_shard(processed, table)
    with pytest.raises(ProcessedDataError, match="rows"):
        ProcessedCorpus.open(processed)


def test_shard_with_nulls(processed):
    n = len(DOCS)
    table = pa.table({"text": [None] * n, "source": ["s"] * n, "sha256": ["h"] * n},
                     schema=pa.schema([(c, pa.string()) for c in ("text", "source", "sha256")]))
    _replace_shard(processed, table)
    with pytest.raises(ProcessedDataError, match="null"):
        list(ProcessedCorpus.open(processed).iter_texts())


def test_shard_garbage_with_matching_hash(processed):
    shard = processed / "shard-00000.parquet"
    shard.write_bytes(b"not parquet at all" * 10)
    data = shard.read_bytes()
    rewrite_manifest(processed, lambda d: d["shards"][0].update(
        size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(ProcessedDataError, match="not a valid Parquet"):
        ProcessedCorpus.open(processed)


def test_shard_swapped_after_open_is_caught_while_reading(processed):
    corpus = ProcessedCorpus.open(processed)
    shard = processed / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ProcessedDataError, match="sha256 differs"):
        next(corpus.iter_texts())


def test_shard_that_expands_while_decoded_is_refused(processed, monkeypatch):
    """A re-sealed shard whose text column is 600 references to one 200 KB dictionary
    value: 120 MB decoded from ~100 KB, with an honest footer. Decoding is bounded per
    row group (here lowered to 8 MiB), measured before the dictionary is expanded."""
    import fragment_llm.data.processed as processed_module

    value = "".join(chr(97 + (i * 7919) % 26) for i in range(200_000))
    digest = hashlib.sha256(value.encode()).hexdigest()
    rows = 600
    text = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array([value]))
    shard = processed / "shard-00000.parquet"
    pq.write_table(pa.table({"text": text, "source": ["doc.txt"] * rows,
                             "sha256": [digest] * rows}), shard, store_schema=False)

    def reseal(data):
        data["shards"] = [{"file": shard.name, "size": shard.stat().st_size,
                           "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
                           "documents": rows, "chars": rows * len(value),
                           "text_bytes": rows * len(value)}]
        data["counts"].update(documents=rows, chars=rows * len(value))

    rewrite_manifest(processed, reseal)
    monkeypatch.setattr(processed_module, "MAX_ROW_GROUP_BYTES", 8 << 20)
    corpus = ProcessedCorpus.open(processed)  # the footer's claims are all within the caps
    with pytest.raises(ProcessedDataError, match="row group 0: text would decode to more "
                                                 "than 8,388,608 bytes by row 64") as info:
        sum(map(len, corpus.iter_texts()))
    assert str(shard) in info.value.message
