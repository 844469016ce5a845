"""Where the stages write, through the CLI: an output that exists is refused at the rename
itself, a writer never writes what the next stage's reader refuses, and a file system
that says no (a file in the way, read-only, a planted symlink) is one `error:` line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fragment_llm.data.preprocess as preprocess
import fragment_llm.data.processed as processed_module
import fragment_llm.data.processed_writer as processed_writer
import fragment_llm.data.read_pool as read_pool
import fragment_llm.data.readers as readers
import fragment_llm.data.shards as data_module
import fragment_llm.export.hf_tokenizer as hf_export
import fragment_llm.safety.files as safeio
import fragment_llm.tokenizer.tokenizer as tokenizer_module
import fragment_llm.tokenizer.train as tokenizer_train
from fragment_llm.cli.app import cli
from fragment_llm.config import PreprocessConfig
from fragment_llm.data.processed import MANIFEST_NAME
from fragment_llm.errors import DatasetError, OutputError
from fragment_llm.safety.files import TEMP_MARKER, staged_dir
from tests.helpers import SAMPLE

TEXT = (SAMPLE / "sonnets_gut.txt").read_text()[:30_000]
TINY_TRAIN = ("[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n"
              "[train]\nworkers = 1\nbatch_size = 2\nmax_steps = 2\nwarmup_steps = 1\n"
              "eval_every = 0\ncheckpoint_every = 0\neval_blocks = 1\nfinal_eval_blocks = 1\n"
              "device = \"cpu\"\n")


def refused(result, message: str) -> None:
    """Exit 1 with `error: ...message...` (and perhaps a hint), never a traceback."""
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output and "internal error" not in result.output


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if TEMP_MARKER in p.name
                  or safeio.OLD_MARKER in p.name or p.name == ".spool")


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    return folder


@pytest.fixture(scope="module")
def trained_inputs(corpus) -> tuple[Path, Path]:
    """The module's processed folder and tokenizer, with a tiny train.toml beside them."""
    (corpus.root / "train.toml").write_text(TINY_TRAIN)
    return corpus.processed, corpus.tokenizer


def train_args(inputs: tuple[Path, Path], out: Path, data: Path | None = None) -> list[str]:
    processed, tokenizer = inputs
    return ["train", "--data", str(data or processed), "--tokenizer", str(tokenizer),
            "--out", str(out), "--config", str(processed.parent / "train.toml")]


# ====================================== "output already exists" holds at the rename


@pytest.mark.parametrize("mechanism", ["renameat2", "link-or-mkdir"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_rename_noreplace_never_replaces(tmp_path, monkeypatch, mechanism, kind):
    if mechanism != "renameat2":  # as where renameat2 or its flag is missing
        monkeypatch.setattr(safeio, "_renameat2_noreplace", lambda src, dst: False)
    src, dst = tmp_path / "src", tmp_path / "dst"
    for path, text in ((src, "new"), (dst, "old")):
        if kind == "folder":
            path.mkdir()
            (path / "f").write_text(text)
        else:
            path.write_text(text)
    with pytest.raises(FileExistsError):
        safeio.rename_noreplace(src, dst)
    read = (lambda p: (p / "f").read_text()) if kind == "folder" else Path.read_text
    assert (read(src), read(dst)) == ("new", "old")
    shutil.rmtree(dst) if kind == "folder" else dst.unlink()
    safeio.rename_noreplace(src, dst)
    assert read(dst) == "new" and not src.exists()


def test_rename_noreplace_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    """vfat, exFAT, some FUSE/SMB mounts: no renameat2 and `link` fails with EPERM. The
    file is still written (it was "cannot write: operation not permitted"), and an
    existing one still refused."""
    def no_link(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(safeio, "_renameat2_noreplace", lambda src, dst: False)
    monkeypatch.setattr(safeio.os, "link", no_link)
    target = tmp_path / "tok.json"
    safeio.atomic_write_text(target, "first", replace=False)
    with pytest.raises(OutputError, match="output already exists"):
        safeio.atomic_write_text(target, "second", replace=False)
    assert target.read_text() == "first" and sorted(os.listdir(tmp_path)) == ["tok.json"]


def test_staged_dir_refuses_a_target_that_appears_before_the_swap(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="output already exists"):
        with staged_dir(target, overwrite=False) as staging:
            (staging / "mine").write_text("mine")
            target.mkdir()  # another run finished first
            (target / "theirs").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert leftovers(tmp_path) == []


def test_preprocess_output_that_appears_during_the_run(raw, runner, monkeypatch):
    """The deterministic interleaving of two runs: the other one's folder appears
    between this run's start-up check and its rename."""
    out = raw.parent / "out"
    build = preprocess._build

    def other_run_finishes_first(*args, **kwargs):
        out.mkdir()
        (out / MANIFEST_NAME).write_text("the other run's")
        return build(*args, **kwargs)

    monkeypatch.setattr(preprocess, "_build", other_run_finishes_first)
    result = runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(out)])
    refused(result, f"output already exists: {out}")
    assert "--overwrite" in result.stderr
    assert (out / MANIFEST_NAME).read_text() == "the other run's"
    assert leftovers(raw.parent) == []


def test_next_run_removes_a_dead_runs_staging_but_never_a_live_ones(raw, runner, tmp_path):
    """Staging folders carry their run's pid: a killed run's goes, spool files its helpers
    wrote included; a run still going (here, a live process's pid) keeps its own."""
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folders = {name: tmp_path / f".out{TEMP_MARKER}{pid}-abcd1234"
                   for name, pid in (("dead", 999_999_999), ("live", live.pid))}
        for folder in folders.values():
            (folder / ".spool").mkdir(parents=True)
            (folder / ".spool" / "00000000-0000.bin").write_bytes(b"x" * 1000)
        result = runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert not folders["dead"].exists()
        assert (folders["live"] / ".spool" / "00000000-0000.bin").exists()
    finally:
        live.kill()
        live.wait()


def test_two_preprocess_runs_started_together_on_one_new_out(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for index in range(12):  # ~12 MB: each run takes a while, so the two overlap
        (raw / f"{index}.txt").write_text(f"{index} " + TEXT * 33)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "fragment_llm", "-q", "preprocess", str(raw),
               "--out", str(out), "--workers", "1"]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.communicate()[1]) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    (stderr,) = [err for code, err in results if code == 1]
    assert f"error: output already exists: {out}" in stderr and "Traceback" not in stderr
    assert json.loads((out / MANIFEST_NAME).read_text())["counts"]["files_kept"] == 12
    assert leftovers(tmp_path) == []


def test_train_tokenizer_output_that_appears_before_the_rename(trained_inputs, runner,
                                                               monkeypatch, tmp_path):
    processed, _ = trained_inputs
    out = tmp_path / "tok.json"
    make_dirs = tokenizer_train.make_dirs

    def other_run_finishes_first(folder):  # after the last check, before the rename
        make_dirs(folder)
        out.write_text("the other run's")

    monkeypatch.setattr(tokenizer_train, "make_dirs", other_run_finishes_first)
    result = runner.invoke(cli, ["-q", "train-tokenizer", "--data", str(processed), "--out",
                                 str(out), "--vocab-size", "300", "--workers", "1"])
    refused(result, f"output already exists: {out}")
    assert out.read_text() == "the other run's" and leftovers(tmp_path) == []


def test_export_tokenizer_output_that_appears_before_the_rename(trained_inputs, runner,
                                                                monkeypatch, tmp_path):
    _, tokenizer = trained_inputs
    out = tmp_path / "hf.json"
    make_dirs = hf_export.make_dirs

    def other_run_finishes_first(folder):
        make_dirs(folder)
        out.write_text("the other run's")

    monkeypatch.setattr(hf_export, "make_dirs", other_run_finishes_first)
    result = runner.invoke(cli, ["export-tokenizer", "--in", str(tokenizer), "--out", str(out)])
    refused(result, f"output already exists: {out}")
    assert out.read_text() == "the other run's" and leftovers(tmp_path) == []


def test_token_cache_built_meanwhile_by_another_trainer_is_kept(trained_inputs, tmp_path,
                                                                monkeypatch):
    """Two trainers on one data folder: the second to finish keeps the first's cache (the
    same bytes) rather than pull it from under it."""
    processed, tokenizer = trained_inputs
    request = data_module.BuildRequest(processed, tokenizer, tmp_path / "tokens", 0.1,
                                       workers=1)
    theirs = data_module.build_token_shards(request)
    write = data_module._write_shards
    shutil.rmtree(theirs)
    placed: list[int] = []

    def other_trainer_finishes_first(tmp, *args):
        manifest = write(tmp, *args)
        shutil.copytree(tmp, theirs)  # identical content, already in place
        (theirs / data_module.MANIFEST).write_text(data_module.dump_manifest(manifest))
        placed.append(theirs.stat().st_ino)
        return manifest

    monkeypatch.setattr(data_module, "_write_shards", other_trainer_finishes_first)
    assert data_module.build_token_shards(request) == theirs
    assert theirs.stat().st_ino == placed[0]  # theirs, not replaced by the second build
    data_module.TokenShards.open(theirs)
    assert leftovers(tmp_path) == []


# ============================================ a writer fits the next stage's reader


def test_preprocess_refuses_a_listing_too_large_before_reading(raw, runner, monkeypatch):
    for index in range(300):  # skipped, but each one listed in the manifest
        (raw / f"image{index:03d}.jpg").write_bytes(b"\xff\xd8")
    monkeypatch.setattr(preprocess, "MAX_MANIFEST_BYTES", 20_000)
    read = []
    monkeypatch.setattr(read_pool, "read_input_file",
                        lambda *args: read.append(args) or readers.read_input_file(*args))
    result = runner.invoke(cli, ["-q", "preprocess", str(raw), "--out",
                                 str(raw.parent / "out")])
    refused(result, "the manifest listing 301 input files would be at least")
    assert "over the 20,000 that readers accept" in result.stderr
    assert "max_files" in result.stderr and read == []
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]


def test_preprocess_refuses_a_manifest_just_over_the_reader_cap(raw, runner, monkeypatch,
                                                                tmp_path):
    for index in range(50):
        (raw / f"image{index:03d}.jpg").write_bytes(b"\xff\xd8")
    assert runner.invoke(cli, ["-q", "preprocess", str(raw), "--out",
                               str(tmp_path / "probe")]).exit_code == 0
    size = (tmp_path / "probe" / MANIFEST_NAME).stat().st_size
    monkeypatch.setattr(preprocess, "MAX_MANIFEST_BYTES", size - 1)
    result = runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(tmp_path / "out")])
    refused(result, f"the manifest listing 51 input files would be {size:,} bytes")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(preprocess, "MAX_MANIFEST_BYTES", size)
    assert runner.invoke(cli, ["-q", "preprocess", str(raw), "--out",
                               str(tmp_path / "out")]).exit_code == 0


def test_the_real_manifest_cap_is_the_readers(monkeypatch):
    assert preprocess.MAX_MANIFEST_BYTES is processed_module.MAX_MANIFEST_BYTES


def test_the_shard_writers_caps_are_the_readers():
    assert processed_writer.MAX_SHARDS is processed_module.MAX_SHARDS
    assert processed_writer.MAX_SHARD_FILE_BYTES is processed_module.MAX_SHARD_FILE_BYTES


def test_preprocess_refuses_more_shards_than_readers_accept(raw, runner, monkeypatch,
                                                            tmp_path):
    for index in range(3):  # ~1.3 MB each: one shard each at shard_max_bytes = 1 MiB
        (raw / f"big{index}.txt").write_text(f"{index} " + TEXT * 44)
    config = tmp_path / "c.toml"
    config.write_text("[preprocess]\nshard_max_bytes = 1048576\n")
    monkeypatch.setattr(processed_writer, "MAX_SHARDS", 2)
    result = runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(tmp_path / "out"),
                                 "--config", str(config)])
    refused(result, "would need more than 2 shards")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_preprocess_refuses_a_shard_file_readers_would_refuse(raw, runner, monkeypatch,
                                                              tmp_path):
    monkeypatch.setattr(processed_writer, "MAX_SHARD_FILE_BYTES", 1000)
    result = runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(tmp_path / "out")])
    refused(result, "readers refuse shards over 1,000")
    assert not (tmp_path / "out").exists()


def test_short_documents_count_toward_the_shard_size(tmp_path):
    """Millions of short documents: their sha256 and source are most of a shard's bytes,
    so they count toward shard_max_bytes, not only the text."""
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = "".join(json.dumps({"text": f"document number {i:07d}"}) + "\n"
                    for i in range(60_000))
    (raw / "many.jsonl").write_text(lines)
    report = preprocess.run_preprocess([raw], tmp_path / "out", PreprocessConfig(
        workers=1, shard_max_bytes=1 << 20))
    shards = report.manifest.shards
    assert len(shards) >= 6  # 60,000 x (24 text + 76 row + 10 source) bytes > 6 MiB
    assert all(shard.text_bytes + shard.documents * processed_module.ROW_OVERHEAD_BYTES
               <= 1 << 20 for shard in shards)


def test_the_longest_document_fits_a_row_group_and_a_shard():
    """Constants, not a 256 MiB test: a kept document's row group and shard stay under
    the reader's caps, whatever shard_max_bytes allows."""
    longest_shard_text = PreprocessConfig.model_fields["shard_max_bytes"].metadata[-1].le
    assert processed_module.MAX_DOC_BYTES + 2 * processed_module.ROW_GROUP_BYTES \
        <= processed_module.MAX_ROW_GROUP_BYTES
    assert longest_shard_text + processed_module.MAX_DOC_BYTES + (16 << 20) \
        <= processed_module.MAX_SHARD_FILE_BYTES
    assert readers.MAX_DOC_BYTES is processed_module.MAX_DOC_BYTES


def test_train_tokenizer_refuses_a_file_its_loader_would_refuse(trained_inputs, runner,
                                                                monkeypatch, tmp_path):
    processed, _ = trained_inputs
    monkeypatch.setattr(tokenizer_module, "MAX_FILE_BYTES", 1000)
    result = runner.invoke(cli, ["-q", "train-tokenizer", "--data", str(processed), "--out",
                                 str(tmp_path / "tok.json"), "--vocab-size", "300",
                                 "--workers", "1"])
    refused(result, "readers refuse more than 1,000")
    assert not (tmp_path / "tok.json").exists()


def test_the_largest_tokenizer_file_fits_its_loader():
    """At MAX_VOCAB every merge line is `    [1048575, 1048575],` (24 bytes), and the
    custom pattern may take 4,096 characters, each escaped to at most 6."""
    worst = 24 * tokenizer_module.MAX_VOCAB + 6 * 4096 + 64 * 1024
    assert worst <= tokenizer_module.MAX_FILE_BYTES


def test_token_cache_manifest_over_the_reader_cap_is_not_written(trained_inputs, tmp_path,
                                                                 monkeypatch):
    processed, tokenizer = trained_inputs
    monkeypatch.setattr(data_module, "MAX_MANIFEST_BYTES", 200)
    request = data_module.BuildRequest(processed, tokenizer, tmp_path / "tokens", 0.1,
                                       workers=1)
    with pytest.raises(DatasetError, match="readers refuse more than 200"):
        data_module.build_token_shards(request)
    assert list((tmp_path / "tokens").iterdir()) == []


# =========================================== operating-system errors, translated


@pytest.mark.parametrize("stage", ["preprocess", "train"])
def test_out_below_a_regular_file(stage, raw, trained_inputs, runner, tmp_path):
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" / "sub"
    args = (["preprocess", str(raw), "--out", str(out)] if stage == "preprocess"
            else train_args(trained_inputs, out))
    refused(runner.invoke(cli, ["-q", *args]), f"{tmp_path / 'f'} is a file, not a folder")
    deeper = out / "deeper"
    args = (["preprocess", str(raw), "--out", str(deeper)] if stage == "preprocess"
            else train_args(trained_inputs, deeper))
    result = runner.invoke(cli, ["-q", *args])
    refused(result, f"{tmp_path / 'f'} is a file, not a folder")
    assert "cannot create folder" in result.stderr
    assert (tmp_path / "f").read_text() == "a file"


def test_preprocess_out_where_mkdir_fails_read_only(raw, runner, monkeypatch, tmp_path):
    """Without mounting anything: the folder to create is on a read-only file system."""
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if Path(path).is_relative_to(tmp_path / "ro"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    out = tmp_path / "ro" / "new" / "out"
    result = runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(out)])
    refused(result, f"cannot create folder {out.parent}: read-only file system")


@pytest.fixture
def read_only_mount(tmp_path):
    """A tmpfs, to fill and then remount read-only; skipped where mounting is not allowed."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, check=False) if shutil.which("mount") else None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")

    def seal() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)

    try:
        yield mount, seal
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def test_preprocess_out_on_a_read_only_mount(raw, runner, read_only_mount):
    mount, seal = read_only_mount
    seal()
    out = mount / "new" / "processed"
    refused(runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(out)]),
            f"cannot create folder {out.parent}: read-only file system")
    refused(runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(mount / "p")]),
            f"cannot write {mount / 'p'}: read-only file system")


def test_train_data_on_a_read_only_mount(trained_inputs, runner, read_only_mount, tmp_path):
    """The token cache goes beside --data: there, it cannot be created."""
    mount, seal = read_only_mount
    processed, tokenizer = trained_inputs
    shutil.copytree(processed, mount / "processed")
    seal()
    result = runner.invoke(cli, ["-q", *train_args(trained_inputs, tmp_path / "run",
                                                   data=mount / "processed")])
    refused(result, f"cannot create folder {mount / 'tokens'}: read-only file system")
    assert "pass that as --data" in result.stderr


def test_train_out_on_a_read_only_mount(trained_inputs, runner, read_only_mount):
    """The run folder exists, so only the run lock's write can fail."""
    mount, seal = read_only_mount
    (mount / "run").mkdir()
    seal()
    result = runner.invoke(cli, ["-q", *train_args(trained_inputs, mount / "run")])
    refused(result, f"cannot write {mount / 'run' / '.lock'}: read-only file system")


def test_train_run_lock_planted_as_a_symlink(trained_inputs, runner, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").write_text("not ours")
    (tmp_path / "run" / ".lock").symlink_to(tmp_path / "elsewhere")
    result = runner.invoke(cli, ["-q", *train_args(trained_inputs, tmp_path / "run")])
    refused(result, "a symlink is in the way")
    assert (tmp_path / "elsewhere").read_text() == "not ours"
