"""`fragment preprocess`: formats, dedup, shards, determinism, the report, and the CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fragment_llm.data.preprocess as preprocess
import fragment_llm.data.read_pool as read_pool
from fragment_llm.cli.app import cli
from fragment_llm.config import PreprocessConfig
from fragment_llm.data.discovery import discover
from fragment_llm.data.preprocess import run_preprocess
from fragment_llm.data.processed import MANIFEST_NAME, ProcessedCorpus
from tests.helpers import REPO

PARAGRAPH = "The quality of mercy is not strained; it droppeth as the gentle rain."


def paragraph(i: int) -> str:
    return f"{i}: {PARAGRAPH}"


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """A folder with every format, nesting, an unsupported file and a duplicate."""
    raw = tmp_path / "raw"
    (raw / "plays" / "act1").mkdir(parents=True)
    (raw / "notes.md").write_text("# Notes\n\n" + paragraph(0) + "   \r\n\r\n\r\n\r\nend\n")
    (raw / "plays" / "act1" / "scene.txt").write_text(paragraph(1))
    (raw / "plays" / "dupe.txt").write_text(paragraph(1) + "\n\n")  # same after cleaning
    lines = [json.dumps({"text": paragraph(i), "id": i}) for i in range(2, 6)]
    (raw / "lines.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": [paragraph(i) for i in range(6, 9)]}), raw / "table.parquet")
    (raw / "data.csv").write_text("a,b\n1,2\n")
    return raw


def run(inputs: list[Path], out: Path, **config) -> preprocess.PreprocessReport:
    return run_preprocess(inputs, out, PreprocessConfig(**{"workers": 1, **config}))


def statuses(report: preprocess.PreprocessReport) -> dict[str, tuple[str, str | None]]:
    return {f.path: (f.status, f.reason) for f in report.manifest.files}


def test_mixed_folder(mixed, tmp_path):
    report = run([mixed], tmp_path / "out")
    assert statuses(report) == {
        "data.csv": ("skipped", "unsupported-extension"),
        "lines.jsonl": ("kept", None),
        "notes.md": ("kept", None),
        "plays/act1/scene.txt": ("kept", None),
        "plays/dupe.txt": ("kept", None),
        "table.parquet": ("kept", None),
    }
    counts = report.manifest.counts
    assert (counts.documents, counts.duplicates_dropped) == (9, 1)
    assert (counts.files_kept, counts.files_skipped, counts.files_rejected) == (5, 1, 0)
    assert counts.chars_removed.newlines == 4 and counts.chars_removed.trailing_whitespace == 3
    docs = list(ProcessedCorpus.open(tmp_path / "out").iter_documents())
    assert [d.source for d in docs] == ["lines.jsonl"] * 4 + ["notes.md", "plays/act1/scene.txt"] \
        + ["table.parquet"] * 3
    assert docs[4].text == f"# Notes\n\n{paragraph(0)}\n\nend"


def test_discovery_order_is_sorted_and_recursive(mixed):
    found = discover([mixed], PreprocessConfig())
    paths = [getattr(item, "source", None) or item.path for item in found]
    assert paths == ["data.csv", "lines.jsonl", "notes.md", "plays/act1/scene.txt",
                     "plays/dupe.txt", "table.parquet"]


def test_file_inputs_and_roots(mixed, tmp_path):
    report = run([mixed / "notes.md", mixed / "plays"], tmp_path / "out")
    files = {(f.root, f.path) for f in report.manifest.files}
    assert files == {(str(mixed), "notes.md"), (str(mixed / "plays"), "act1/scene.txt"),
                     (str(mixed / "plays"), "dupe.txt")}


def test_two_runs_give_identical_bytes(mixed, tmp_path):
    run([mixed], tmp_path / "a")
    run([mixed], tmp_path / "b")
    for name in ("shard-00000.parquet", MANIFEST_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_worker_processes_give_the_same_shards(mixed, tmp_path, monkeypatch):
    for i in range(20):  # enough files for the pool to interleave them
        (mixed / f"extra{i:02d}.txt").write_text(paragraph(100 + i) * (i + 1))
    run([mixed], tmp_path / "one")
    monkeypatch.setattr(read_pool, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(read_pool, "BATCH_FILES", 2)  # many small batches to share out
    slow_here, spooled = _slow_main_reads(monkeypatch)
    run([mixed], tmp_path / "two", workers=2)
    assert spooled and slow_here  # both this process and the helper read files
    shard = "shard-00000.parquet"
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [MANIFEST_NAME, shard]
    assert (tmp_path / "one" / shard).read_bytes() == (tmp_path / "two" / shard).read_bytes()
    one = json.loads((tmp_path / "one" / MANIFEST_NAME).read_text())
    two = json.loads((tmp_path / "two" / MANIFEST_NAME).read_text())
    assert one["files"] == two["files"] and one["shards"] == two["shards"]


def _slow_main_reads(monkeypatch) -> tuple[list[str], list[str]]:
    """Slow this process's own reads so the helper (still starting) gets files too, and
    record which files each side read."""
    here, spooled = [], []
    real_read, real_take = read_pool.read_input_file, preprocess.take_blob

    def read(task, config):
        time.sleep(0.1)
        here.append(task.source)
        return real_read(task, config)

    def take(result):
        if result.spool is not None:
            spooled.append(result.spool)
        return real_take(result)

    monkeypatch.setattr(read_pool, "read_input_file", read)
    monkeypatch.setattr(preprocess, "take_blob", take)
    return here, spooled


def test_shards_are_bounded_and_ordered(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    docs = [f"{i:04d} " + "x" * 300_000 for i in range(9)]  # 2.7 MB of text
    for i, doc in enumerate(docs):
        (raw / f"{i}.txt").write_text(doc)
    report = run([raw], tmp_path / "out", shard_max_bytes=1 << 20)
    shards = report.manifest.shards
    assert [s.file for s in shards] == ["shard-00000.parquet", "shard-00001.parquet",
                                        "shard-00002.parquet"]
    assert all(s.text_bytes <= 1 << 20 for s in shards)
    assert list(ProcessedCorpus.open(tmp_path / "out").iter_texts()) == docs


def test_shard_schema_is_pinned(mixed, tmp_path):
    run([mixed], tmp_path / "out")
    parquet = pq.ParquetFile(tmp_path / "out" / "shard-00000.parquet")
    assert parquet.schema_arrow.names == ["text", "source", "sha256"]
    assert all(field.type == pa.string() for field in parquet.schema_arrow)
    assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"


def test_short_and_long_documents_dropped(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "short.txt").write_text("tiny")
    (raw / "long.txt").write_text("y" * 500)
    (raw / "fine.txt").write_text("z" * 50)
    report = run([raw], tmp_path / "out", min_doc_chars=10, max_doc_chars=100)
    counts = report.manifest.counts
    assert (counts.documents, counts.too_short_dropped, counts.too_long_dropped) == (1, 1, 1)


def test_text_field_for_jsonl_and_parquet(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(json.dumps({"body": paragraph(1), "text": 5}) + "\n")
    pq.write_table(pa.table({"body": [paragraph(2)]}), raw / "b.parquet")
    report = run([raw], tmp_path / "out", text_field="body")
    assert report.manifest.counts.documents == 2


def test_invalid_utf8_replace_mode(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "latin1.txt").write_bytes(paragraph(1).encode() + b" caf\xe9")
    report = run([raw], tmp_path / "out", invalid_utf8="replace")
    (text,) = ProcessedCorpus.open(tmp_path / "out").iter_texts()
    assert text.endswith("caf\ufffd") and report.manifest.counts.files_kept == 1


def test_progress_counts_bytes(mixed, tmp_path):
    calls = []
    run_preprocess([mixed], tmp_path / "out", PreprocessConfig(workers=1),
                   progress=lambda *args: calls.append(args))
    assert {phase for phase, _, _ in calls} == {"reading"}
    _, done, total = calls[-1]
    assert done == total == sum(p.stat().st_size for p in mixed.rglob("*")
                                if p.is_file() and p.suffix != ".csv")


def test_report_rows(mixed, tmp_path):
    (mixed / "bad.jsonl").write_text('{"text": "' + PARAGRAPH + '"}\nnot json\n')
    report = run([mixed], tmp_path / "out")
    problems = report.problem_rows()
    assert (f"{mixed}/data.csv", "skipped",
            "unsupported-extension: not one of .txt, .md, .jsonl, .parquet") in problems
    assert any(row[0].endswith("bad.jsonl") and "line 2" in row[2] for row in problems)
    summary = dict(report.summary_rows())
    assert summary["documents written"] == "10"
    assert summary["files kept / rejected / skipped"] == "6 / 0 / 1"
    assert "MB/s" in summary["speed"]


def test_bundled_sample(tmp_path):
    report = run([REPO / "data" / "raw"], tmp_path / "out")
    assert report.manifest.counts.files_kept >= 1
    assert ProcessedCorpus.open(tmp_path / "out").documents == report.manifest.counts.documents


# ------------------------------------------------------------------------- the CLI


def test_cli_end_to_end(runner, mixed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # short relative names, so the tables do not cut them
    out = Path("out")
    result = runner.invoke(cli, ["preprocess", "raw", "--out", "out"])
    assert result.exit_code == 0, result.output
    assert "data.csv" in result.stderr and "unsupported-extension" in result.stderr
    assert "documents written" in result.stderr
    assert ProcessedCorpus.open(out).documents == 9


def test_cli_overwrite_replaces_previous_output(runner, mixed, tmp_path):
    out = tmp_path / "out"
    assert runner.invoke(cli, ["-q", "preprocess", str(mixed), "--out", str(out)]).exit_code == 0
    (mixed / "more.txt").write_text(paragraph(50))
    result = runner.invoke(cli, ["-q", "preprocess", str(mixed), "--out", str(out),
                                 "--overwrite"])
    assert result.exit_code == 0
    assert ProcessedCorpus.open(out).documents == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temporaries left


def test_cli_config_file_and_flags(runner, mixed, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[preprocess]\nmin_doc_chars = 1000\ntext_field = "text"\n')
    out = tmp_path / "out"
    result = runner.invoke(cli, ["-q", "preprocess", str(mixed), "--out", str(out),
                                 "--config", str(config), "--min-doc-chars", "5"])
    assert result.exit_code == 0
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["config"]["min_doc_chars"] == 5  # the flag wins over the file


def test_cli_escapes_hostile_file_names(runner, mixed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (mixed / "evil\x1b]52;c;aGk=\x07.csv").write_text("x")
    result = runner.invoke(cli, ["preprocess", "raw", "--out", "out"])
    assert result.exit_code == 0
    assert "\x1b" not in result.output and "\\x1b" in result.stderr
