"""One test per hostile input to `fragment preprocess`, and the refusals, through the CLI.

Each hostile file sits beside one good file, so the run succeeds and the manifest must
say what happened to the hostile one; refusals must exit 1 with one `error:` line, no
traceback, nothing written and any previous output intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fragment_llm.data.preprocess as preprocess
import fragment_llm.data.processed_writer as processed_writer
import fragment_llm.data.read_pool as read_pool
import fragment_llm.data.readers as readers
from fragment_llm.cli.app import cli
from fragment_llm.data.processed import MANIFEST_NAME
from tests.helpers import SAMPLE

GOOD = "Now is the winter of our discontent made glorious summer by this sun of York."


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "good.txt").write_text(GOOD)
    return folder


def preprocess_ok(runner: CliRunner, raw: Path, *flags: str) -> dict:
    out = raw.parent / "out"
    result = runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(out), *flags])
    assert result.exit_code == 0, result.output
    return json.loads((out / MANIFEST_NAME).read_text())


def entry(manifest: dict, path: str) -> dict:
    (found,) = [f for f in manifest["files"] if f["path"] == path]
    return found


def assert_rejected(manifest: dict, path: str, reason: str, detail: str = "") -> dict:
    found = entry(manifest, path)
    assert (found["status"], found["reason"]) == ("rejected", reason), found
    assert detail in found["detail"]
    assert manifest["counts"]["documents"] == 1  # the good file still made it
    return found


def assert_refused(result, message: str) -> None:
    """Exit 1 and one `error:` line (plus an optional `hint:`; a progress bar may precede)."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if not line.lstrip().startswith(
        "reading ")]
    assert lines[0].startswith("error: ") and message in lines[0], lines
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("hint: ")), lines
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ paths and types


def test_symlink_escaping_the_root(runner, raw, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("a secret that must never be read " * 3)
    (raw / "leak.txt").symlink_to(secret)
    manifest = preprocess_ok(runner, raw)
    assert_rejected(manifest, "leak.txt", "symlink-escapes-root")
    assert entry(manifest, "leak.txt")["sha256"] is None  # never opened


def test_symlink_to_a_device_escapes_the_root(runner, raw, no_hang):
    (raw / "null.txt").symlink_to("/dev/zero")
    assert_rejected(preprocess_ok(runner, raw), "null.txt", "symlink-escapes-root")


def test_symlinked_folder_escaping_the_root(runner, raw, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text(GOOD + " outside")
    (raw / "link").symlink_to(outside)
    assert_rejected(preprocess_ok(runner, raw), "link", "symlink-escapes-root")


def test_symlink_inside_the_root_is_followed(runner, raw):
    (raw / "sub").mkdir()
    (raw / "sub" / "real.txt").write_text(GOOD + " inside")
    (raw / "alias.txt").symlink_to(raw / "sub" / "real.txt")
    manifest = preprocess_ok(runner, raw)
    assert entry(manifest, "alias.txt")["status"] == "kept"
    assert entry(manifest, "sub/real.txt")["reason"] == "already-visited"


def test_symlink_loop_through_folders(runner, raw, no_hang):
    (raw / "sub").mkdir()
    (raw / "sub" / "up").symlink_to(raw)
    assert_rejected(preprocess_ok(runner, raw), "sub/up", "symlink-loop")


def test_symlink_cycle_between_links(runner, raw, no_hang):
    (raw / "a.txt").symlink_to(raw / "b.txt")
    (raw / "b.txt").symlink_to(raw / "a.txt")
    manifest = preprocess_ok(runner, raw)
    assert_rejected(manifest, "a.txt", "symlink-loop")
    assert_rejected(manifest, "b.txt", "symlink-loop")


def test_fifo_is_never_opened(runner, raw, no_hang):
    os.mkfifo(raw / "pipe.txt")
    assert_rejected(preprocess_ok(runner, raw), "pipe.txt", "not-regular-file", "FIFO")


def test_device_given_as_input(runner, raw, no_hang):
    out = raw.parent / "out"
    result = runner.invoke(cli, ["-q", "preprocess", str(raw), "/dev/zero", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert_rejected(manifest, "zero", "not-regular-file", "character device")


def test_file_swapped_for_a_fifo_after_discovery(raw, tmp_path, monkeypatch, no_hang):
    victim = raw / "victim.txt"
    victim.write_text(GOOD + " victim")
    real_discover = preprocess.discover

    def discover_then_swap(*args):
        found = real_discover(*args)
        victim.unlink()
        os.mkfifo(victim)
        return found

    monkeypatch.setattr(preprocess, "discover", discover_then_swap)
    report = preprocess.run_preprocess([raw], tmp_path / "out",
                                       preprocess.PreprocessConfig(workers=1))
    assert_rejected(report.manifest.model_dump(mode="json"), "victim.txt", "not-regular-file")


def test_file_vanishing_after_discovery(raw, tmp_path, monkeypatch):
    victim = raw / "victim.txt"
    victim.write_text(GOOD + " victim")
    real_discover = preprocess.discover
    def discover_then_delete(*args):
        found = real_discover(*args)
        victim.unlink()
        return found

    monkeypatch.setattr(preprocess, "discover", discover_then_delete)
    report = preprocess.run_preprocess([raw], tmp_path / "out",
                                       preprocess.PreprocessConfig(workers=1))
    assert_rejected(report.manifest.model_dump(mode="json"), "victim.txt", "vanished")


def test_file_changing_while_read(raw, tmp_path, monkeypatch):
    (raw / "growing.txt").write_text(GOOD + " growing")
    real_signature = readers._signature
    calls = []

    def signature(fd):
        size, mtime, ino, dev = real_signature(fd)
        calls.append(fd)
        return (size, mtime + len(calls), ino, dev)  # as if written between the fstats

    monkeypatch.setattr(readers, "_signature", signature)
    monkeypatch.setattr(read_pool, "read_input_file", _only_for("growing.txt"))
    report = preprocess.run_preprocess([raw], tmp_path / "out",
                                       preprocess.PreprocessConfig(workers=1))
    assert_rejected(report.manifest.model_dump(mode="json"), "growing.txt",
                    "changed-while-read")


def _only_for(name: str):
    """read_input_file, with the monkeypatched `_signature` active for `name` only."""
    real_read, patched = read_pool.read_input_file, readers._signature

    def read(task, config):
        readers._signature = patched if task.source == name else _real_signature
        try:
            return real_read(task, config)
        finally:
            readers._signature = patched

    return read


def _real_signature(fd: int) -> tuple[int, int, int, int]:
    info = os.fstat(fd)
    return (info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(runner, raw):
    locked = raw / "locked.txt"
    locked.write_text(GOOD + " locked")
    locked.chmod(0)
    assert_rejected(preprocess_ok(runner, raw), "locked.txt", "unreadable")


def test_non_utf8_file_name(runner, raw):
    name = os.fsdecode(b"caf\xe9.txt")
    (raw / name).write_text(GOOD + " latin-1 name")
    manifest = preprocess_ok(runner, raw)
    assert entry(manifest, "caf\\xe9.txt")["status"] == "kept"


# ------------------------------------------------------------------------------ caps


def test_oversize_file_rejected_unread(runner, raw):
    (raw / "big.txt").write_text("x" * 5000)
    found = assert_rejected(preprocess_ok(runner, raw, "--max-file-bytes", "4096"),
                            "big.txt", "too-large", "5000 bytes")
    assert found["sha256"] is None


def test_total_cap_stops_taking_files(runner, raw):
    for name in ("m1.txt", "m2.txt", "m3.txt"):  # sorted after good.txt (78 bytes)
        (raw / name).write_text(GOOD + name * 20)  # 198 bytes each
    manifest = preprocess_ok(runner, raw, "--max-total-bytes", "300")
    assert entry(manifest, "m1.txt")["status"] == "kept"
    for name in ("m2.txt", "m3.txt"):
        found = entry(manifest, name)
        assert (found["status"], found["reason"], found["sha256"]) == ("rejected", "total-cap",
                                                                       None)


def test_too_many_files(runner, raw, tmp_path):
    for i in range(5):
        (raw / f"z{i}.txt").write_text(GOOD + str(i))
    config = tmp_path / "c.toml"
    config.write_text("[preprocess]\nmax_files = 3\n")
    manifest = preprocess_ok(runner, raw, "--config", str(config))
    assert [f["status"] for f in manifest["files"]] == ["kept"] * 3 + ["rejected"]
    assert manifest["files"][-1]["reason"] == "too-many-files"


def test_document_over_the_char_cap(runner, raw):
    (raw / "long.txt").write_text("y" * 1000)
    manifest = preprocess_ok(runner, raw, "--max-doc-chars", "500")
    assert manifest["counts"]["too_long_dropped"] == 1


# ---------------------------------------------------------------------------- content


def test_nul_bytes(runner, raw):
    (raw / "nul.txt").write_bytes(b"looks like text\x00and then not")
    assert_rejected(preprocess_ok(runner, raw), "nul.txt", "nul-bytes", "offset 15")


def test_mostly_binary(runner, raw):
    (raw / "blob.md").write_bytes(bytes(range(1, 32)) * 40 + b"a little text")
    assert_rejected(preprocess_ok(runner, raw), "blob.md", "binary", "control bytes")


def test_invalid_utf8_reports_the_offset(runner, raw):
    (raw / "latin1.txt").write_bytes(b"hello caf\xe9 and more text here")
    assert_rejected(preprocess_ok(runner, raw), "latin1.txt", "invalid-utf8", "at byte 9")


def test_escape_sequences_in_text_are_cleaned(runner, raw):
    (raw / "ansi.txt").write_text("\x1b]52;c;aGk=\x07Clipboard \u202eattack\u202c text here")
    manifest = preprocess_ok(runner, raw)
    assert manifest["counts"]["chars_removed"]["controls"] == 2
    assert manifest["counts"]["chars_removed"]["bidi"] == 2


# ------------------------------------------------------------------------------ JSONL


def test_malformed_jsonl_lines_are_skipped_with_line_numbers(runner, raw):
    deep = "[" * 40 + "]" * 40
    lines = [
        json.dumps({"text": GOOD + " one"}),
        "{not json",
        '{"text": ' + deep + "}",
        json.dumps({"text": 42}),
        json.dumps({"body": "no text field here"}),
        json.dumps(["an", "array"]),
        json.dumps({"text": "x" * 200}),
        "",
        '{"text": "duplicate keys", "text": "hide this"}',
        '{"text": NaN}',
        json.dumps({"text": GOOD + " last"}),
    ]
    (raw / "records.jsonl").write_text("\n".join(lines) + "\n")
    manifest = preprocess_ok(runner, raw, "--config", _config(raw, "max_line_bytes = 100"))
    found = entry(manifest, "records.jsonl")
    assert (found["status"], found["documents"], found["malformed"]) == ("kept", 2, 8)
    reasons = {r["line"]: r["reason"] for r in found["malformed_records"]}
    assert "invalid JSON" in reasons[2]
    assert "deeper than max_json_depth=32" in reasons[3]
    assert "not a string" in reasons[4]
    assert "no 'text' field" in reasons[5]
    assert "not an object" in reasons[6]
    assert "max_line_bytes is 100" in reasons[7]
    assert "duplicate key" in reasons[9] and "NaN" in reasons[10]


def test_jsonl_nested_beyond_the_parser(runner, raw):
    (raw / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n"
                                    + json.dumps({"text": GOOD + " ok"}) + "\n")
    found = entry(preprocess_ok(runner, raw), "deep.jsonl")
    assert found["malformed"] == 1 and found["documents"] == 1


def test_jsonl_invalid_utf8_rejects_the_file_with_offset(runner, raw):
    (raw / "bad.jsonl").write_bytes(b'{"text": "fine line here"}\n{"text": "caf\xe9"}\n')
    assert_rejected(preprocess_ok(runner, raw), "bad.jsonl", "invalid-utf8", "at byte 40")


def _config(raw: Path, line: str) -> str:
    path = raw.parent / "c.toml"
    path.write_text(f"[preprocess]\n{line}\n")
    return str(path)


# ---------------------------------------------------------------------------- Parquet


def test_parquet_missing_column(runner, raw):
    pq.write_table(pa.table({"body": [GOOD]}), raw / "t.parquet")
    assert_rejected(preprocess_ok(runner, raw), "t.parquet", "parquet-missing-column", "body")


def test_parquet_wrong_type(runner, raw):
    pq.write_table(pa.table({"text": [1, 2, 3]}), raw / "t.parquet")
    assert_rejected(preprocess_ok(runner, raw), "t.parquet", "parquet-wrong-type", "int64")


def test_parquet_nested_column_is_the_wrong_type(runner, raw):
    pq.write_table(pa.table({"text": [{"a": "b"}]}), raw / "t.parquet")
    assert_rejected(preprocess_ok(runner, raw), "t.parquet", "parquet-wrong-type", "struct")


def test_parquet_truncated(runner, raw, tmp_path):
    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"text": [GOOD + str(i) for i in range(100)]}), whole)
    (raw / "t.parquet").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert_rejected(preprocess_ok(runner, raw), "t.parquet", "parquet-invalid")


def test_parquet_garbage(runner, raw):
    (raw / "t.parquet").write_bytes(b"PAR1" + os.urandom(2000) + b"\x10\x00\x00\x00PAR1")
    assert_rejected(preprocess_ok(runner, raw), "t.parquet", "parquet-invalid")


def test_parquet_corrupt_footer_length(runner, raw):
    (raw / "t.parquet").write_bytes(b"PAR1" + b"x" * 100 + b"\xff\xff\xff\x7fPAR1")
    assert_rejected(preprocess_ok(runner, raw), "t.parquet", "parquet-invalid", "footer")


def test_parquet_declaring_a_huge_column_is_refused_before_decompressing(
        runner, raw, monkeypatch):
    # 8 MB of one letter compresses to a few KB; with a 1 MiB cap it must never be inflated.
    pq.write_table(pa.table({"text": ["a" * 8_000_000]}), raw / "bomb.parquet",
                   compression="zstd")
    assert (raw / "bomb.parquet").stat().st_size < 20_000

    def never(*args, **kwargs):
        raise AssertionError("decompressed a column over the cap")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", never)
    manifest = preprocess_ok(runner, raw, "--max-file-bytes", str(1 << 20))
    assert_rejected(manifest, "bomb.parquet", "parquet-too-large", "uncompressed")


def test_parquet_null_rows_are_malformed_records(runner, raw):
    pq.write_table(pa.table({"text": [GOOD + " a", None, GOOD + " b"]}), raw / "t.parquet")
    found = entry(preprocess_ok(runner, raw), "t.parquet")
    assert found["documents"] == 2 and found["malformed_records"] == [
        {"line": 2, "reason": "null text"}]


def test_parquet_invalid_utf8_in_a_row(runner, raw):
    table = pa.table({"text": pa.array([b"fine text row", b"caf\xe9 row"], pa.binary())})
    pq.write_table(table.cast(pa.schema([("text", pa.string())]), safe=False), raw / "t.parquet")
    assert_rejected(preprocess_ok(runner, raw), "t.parquet", "invalid-utf8", "in row 2")


# --------------------------------------------------------------------------- refusals


def test_missing_input(runner, tmp_path):
    result = runner.invoke(cli, ["preprocess", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "out")])
    assert_refused(result, "input not found")
    assert not (tmp_path / "out").exists()


def test_empty_folder(runner, tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli, ["preprocess", str(tmp_path / "empty"), "--out",
                                 str(tmp_path / "out")])
    assert_refused(result, "no input files found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_nothing_usable(runner, tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "nul.txt").write_bytes(b"\x00" * 10)
    (tmp_path / "raw" / "short.txt").write_text("hi")
    result = runner.invoke(cli, ["preprocess", str(tmp_path / "raw"), "--out",
                                 str(tmp_path / "out")])
    assert_refused(result, "no usable documents in 2 input files")
    assert "nul-bytes" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_existing_output_without_overwrite(runner, raw):
    out = raw.parent / "out"
    assert runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (raw / "more.txt").write_text(GOOD + " more")
    result = runner.invoke(cli, ["preprocess", str(raw), "--out", str(out)])
    assert_refused(result, "output already exists")
    assert "--overwrite" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_output_inside_input(runner, raw):
    result = runner.invoke(cli, ["preprocess", str(raw), "--out", str(raw / "processed")])
    assert_refused(result, "is inside input folder")
    assert not (raw / "processed").exists()


def test_output_equal_to_input(runner, raw):
    result = runner.invoke(cli, ["preprocess", str(raw), "--out", str(raw), "--overwrite"])
    assert_refused(result, "is inside input folder")
    assert (raw / "good.txt").read_text() == GOOD


def test_input_inside_output(runner, raw):
    result = runner.invoke(cli, ["preprocess", str(raw / "good.txt"), "--out", str(raw.parent),
                                 "--overwrite"])
    assert_refused(result, "is inside the output folder")
    assert (raw / "good.txt").read_text() == GOOD


def test_failure_mid_run_keeps_the_previous_output(runner, raw, monkeypatch):
    out = raw.parent / "out"
    assert runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    class FullDisk:
        def write_table(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(processed_writer, "_parquet_writer", lambda *args: FullDisk())
    result = runner.invoke(cli, ["preprocess", str(raw), "--out", str(out), "--overwrite"])
    assert_refused(result, "disk full")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in raw.parent.iterdir()) == ["out", "raw"]


def test_ctrl_c_keeps_the_previous_output(runner, raw, monkeypatch):
    out = raw.parent / "out"
    assert runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(read_pool, "read_input_file", interrupt)
    result = runner.invoke(cli, ["preprocess", str(raw), "--out", str(out), "--overwrite"])
    assert result.exit_code == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in raw.parent.iterdir()) == ["out", "raw"]


# ----------------------------------------------------------------------- all at once


def test_everything_at_once(runner, raw, tmp_path, no_hang):
    """Real text, every format and most hostile cases in one folder: exit 0, each named."""
    for play in sorted(SAMPLE.glob("*.txt"))[:2]:
        (raw / play.name).write_bytes(play.read_bytes())
    (raw / "lines.jsonl").write_text(json.dumps({"text": GOOD + " jsonl"}) + "\n{oops\n")
    pq.write_table(pa.table({"text": [GOOD + " parquet"]}), raw / "table.parquet")
    (raw / "secret").symlink_to(tmp_path)
    (raw / "loop").symlink_to(raw)
    os.mkfifo(raw / "fifo.txt")
    (raw / "nul.txt").write_bytes(b"a\x00b")
    (raw / "latin1.md").write_bytes(b"caf\xe9 au lait, s'il vous plait")
    (raw / "garbage.parquet").write_bytes(os.urandom(500))
    pq.write_table(pa.table({"body": ["x"]}), raw / "nocolumn.parquet")
    (raw / "notes.csv").write_text("a,b")
    manifest = preprocess_ok(runner, raw)
    outcome = {f["path"]: f["reason"] or f["status"] for f in manifest["files"]}
    assert outcome == {
        "fifo.txt": "not-regular-file", "garbage.parquet": "parquet-invalid",
        "good.txt": "kept", "hamlet_gut.txt": "kept", "julius_caesar_gut.txt": "kept",
        "latin1.md": "invalid-utf8", "lines.jsonl": "kept", "loop": "symlink-loop",
        "nocolumn.parquet": "parquet-missing-column", "notes.csv": "unsupported-extension",
        "nul.txt": "nul-bytes", "secret": "symlink-escapes-root", "table.parquet": "kept"}
    assert manifest["counts"]["documents"] == 5 and manifest["counts"]["malformed_records"] == 1


# ------------------------------------------------- Parquet that expands while decoded

# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child of the (large)
# pytest process would report the parent's peak.
PEAK_RSS = """
import re, sys
from fragment_llm.cli.app import cli
code = cli.main(sys.argv[1:], prog_name="fragment", standalone_mode=False)
status = open("/proc/self/status", encoding="ascii").read()
print("peak_kib", re.search(r"VmHWM:\\s+(\\d+)", status).group(1), "exit", code)
"""


def expanding_parquet(path: Path, encoding: str, rows: int = 600) -> None:
    """~107 KB on disk, 120 MB of text once decoded: one 200 KB value, repeated. The
    footer honestly declares ~200 KB uncompressed, so its check passes."""
    import random

    rnd = random.Random(0)
    value = "".join(rnd.choice("abcdefghij klmnop\n") for _ in range(200_000))
    if encoding == "dictionary":  # 600 indices into a one-entry dictionary
        column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()),
                                                pa.array([value]))
        pq.write_table(pa.table({"text": column}), path, store_schema=False)
    else:  # each value is "all of the previous one" plus an empty suffix
        pq.write_table(pa.table({"text": [value] * rows}), path, use_dictionary=False,
                       column_encoding={"text": "DELTA_BYTE_ARRAY"}, store_schema=False)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("encoding", ["dictionary", "delta"])
def test_parquet_that_expands_while_decoded(raw, encoding):
    import subprocess
    import sys

    expanding_parquet(raw / "bomb.parquet", encoding)
    out = raw.parent / "out"
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, "-q", "preprocess", str(raw),
                           "--out", str(out), "--max-file-bytes", str(8 << 20)],
                          capture_output=True, text=True, timeout=300, check=False)
    words = done.stdout.split()
    assert words[-1] == "0", done.stdout + done.stderr  # the good file made it
    found = assert_rejected(json.loads((out / MANIFEST_NAME).read_text()), "bomb.parquet",
                            "parquet-too-large", "would decode to more than 8,388,608 bytes")
    assert "max_file_bytes" in found["detail"]
    peak_mib = int(words[words.index("peak_kib") + 1]) / 1024
    assert peak_mib < 300, f"peak RSS {peak_mib:.0f} MiB: the column was decoded"
