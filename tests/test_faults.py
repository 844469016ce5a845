"""Fault injection through the real stages: a full disk, SIGKILL at random moments, races.

What other suites already prove is not repeated here: atomic-write and staged-folder
failures one function at a time (safety/test_files.py), Ctrl-C and SIGKILL at one fixed
moment and the run lock as a class (train/test_train.py), raw inputs changing while read
(data/test_preprocess_hostile.py), and a checkpoint file replaced between verification and
tensor loading (checkpoint/test_load_hostile.py::test_file_replaced_after_verification).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
from click.testing import CliRunner
from safetensors import SafetensorError

import fragment_llm.checkpoint.load as checkpoint_load
import fragment_llm.checkpoint.save as checkpoint_save
import fragment_llm.data.processed_writer as processed_writer
import fragment_llm.data.shards as data_module
from fragment_llm.checkpoint.layout import MODEL_FILE, _step_entries
from fragment_llm.checkpoint.load import (
    CheckpointRemovedError,
    _check_entries,
    _verify_file,
    find_latest_valid,
    load_checkpoint,
)
from fragment_llm.checkpoint.save import save_checkpoint
from fragment_llm.cli.app import cli
from fragment_llm.config import ModelConfig, PreprocessConfig, TokenizerConfig
from fragment_llm.data.preprocess import run_preprocess
from fragment_llm.data.processed import ProcessedCorpus
from fragment_llm.errors import CheckpointError, DatasetError
from fragment_llm.model.gpt import GPT
from fragment_llm.safety.files import temp_name_for
from fragment_llm.tokenizer.tokenizer import Tokenizer
from fragment_llm.tokenizer.train import train_tokenizer
from fragment_llm.train.run import TrainRequest, run_training
from tests.helpers import (
    FAST,
    MODEL,
    Corpus,
    assert_same_weights,
    cli_model_config,
    cli_train_config,
    final_weights,
)

TRAIN_STEPS = 12  # checkpoints every 4 (FAST), so a kill lands before, during or after one
CI_SEEDS = range(3)
SLOW_SEEDS = range(3, 15)


# ------------------------------------------------------------------------ fixtures


@dataclass(frozen=True)
class Trained(Corpus):
    """The module's corpus and a finished TRAIN_STEPS run on it (the `trained` fixture)."""

    run: Path


def train_request(corpus: Corpus, out: Path, resume: bool = False, **train) -> TrainRequest:
    """The in-process twin of `fragment train --config <train_config_file()>`."""
    return TrainRequest(data=corpus.processed, tokenizer=corpus.tokenizer, out=out,
                        model=cli_model_config(**MODEL),
                        train=cli_train_config(**{**FAST, "max_steps": TRAIN_STEPS,
                                                  **train}),
                        resume=resume, tokens_dir=corpus.root / "tokens")


def train_config_file(folder: Path) -> Path:
    path = folder / "train.toml"
    train = {**FAST, "max_steps": TRAIN_STEPS}
    path.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in MODEL.items())
                    + "[train]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in train.items()))
    return path


def _toml(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


def train_args(corpus: Corpus, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(corpus.processed), "--tokenizer", str(corpus.tokenizer),
            "--out", str(out), "--config", str(train_config_file(corpus.root)), *extra]


@dataclass(frozen=True)
class Reference:
    out: Path
    weights: dict
    seconds: float  # of the training loop, from taking the run lock to the end


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Reference:
    """An uninterrupted TRAIN_STEPS run (which also fills the shared token cache)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_training(train_request(corpus, out, max_steps=1), lambda event: None)
    shutil.rmtree(out)
    began = time.monotonic()
    run_training(train_request(corpus, out), lambda event: None)
    return Reference(out, final_weights(out), time.monotonic() - began)


@pytest.fixture(scope="module")
def trained(corpus, reference) -> Trained:
    return Trained(corpus.raw, corpus.other_raw, corpus.processed, corpus.tokenizer,
                   reference.out)


# ------------------------------------------------------------------------ helpers


def snapshot(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every entry below `folder`, hidden ones included: files by sha256, folders as 'dir'."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel.split("/")[0] in ignore:
            continue
        found[rel] = ("link" if path.is_symlink() else "dir" if path.is_dir()
                      else hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def hidden_entries(folder: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    """Names our temporaries would have (`.name.fragment-tmp-...`, `.name.fragment-old-...`)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.startswith(".") and p.name not in allowed)


def assert_one_error_line(result, rule: str) -> None:
    """Exit 1 and exactly one line on stderr, `error: ...` naming the rule broken."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and rule in lines[0], lines


# ============================================================== 1. the disk fills up


class FullDisk:
    """A disk with `free` bytes left while `armed`: a write past that writes what fits,
    then fails with ENOSPC, as a real full disk does. `free=None` only counts."""

    def __init__(self, free: int | None, fail_fsync: bool = False) -> None:
        self.free, self.fail_fsync = free, fail_fsync
        self.used = 0
        self.armed = True

    def take(self, wanted: int) -> int:
        if not self.armed or self.free is None:
            self.used += wanted if self.armed else 0
            return wanted
        granted = max(0, min(wanted, self.free - self.used))
        self.used += granted
        return granted


class DiskFile:
    """A binary file object whose writes go through a `FullDisk`."""

    def __init__(self, raw, disk: FullDisk) -> None:
        self._raw, self._disk = raw, disk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        granted = self._disk.take(len(view))
        self._raw.write(view[:granted])
        if granted < len(view):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return granted

    def __getattr__(self, name: str):
        return getattr(self._raw, name)

    def __enter__(self) -> DiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()


def install_disk(disk: FullDisk, monkeypatch) -> None:
    """Route every artifact write through `disk`: safeio's atomic writes (os.fdopen),
    pyarrow's shard writer, safetensors' save_file and the checkpoint's JSON files."""
    real_fdopen, real_fsync = os.fdopen, os.fsync
    real_parquet_writer = processed_writer._parquet_writer
    serialize = safetensors.torch.save

    def fdopen(fd, mode="r", *args, **kwargs):
        fh = real_fdopen(fd, mode, *args, **kwargs)
        return DiskFile(fh, disk) if "b" in mode and set(mode) & set("wax+") else fh

    def fsync(fd):
        if disk.armed and disk.fail_fsync:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    def save_file(tensors, filename, metadata=None):
        try:
            with DiskFile(open(filename, "wb"), disk) as fh:
                fh.write(serialize(tensors, metadata=metadata))
        except OSError as exc:  # the message the Rust library gives on a real full disk
            raise SafetensorError(f"Error while serializing: I/O error: {exc.strerror} "
                                  f"(os error {exc.errno})") from None

    monkeypatch.setattr(os, "fdopen", fdopen)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(processed_writer, "_parquet_writer", lambda path, level: (
        real_parquet_writer(DiskFile(open(path, "wb", buffering=0), disk), level)))
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(checkpoint_save, "open",
                        lambda path, mode: DiskFile(open(path, mode), disk), raising=False)


@dataclass(frozen=True)
class Stage:
    """A writing stage seen from outside: where its artifact lives, how to make the
    previous one, and the CLI call that writes over it."""

    name: str
    folder: Callable[[Path], Path]  # the folder that must not change, given a work dir
    prepare: Callable[[Corpus, Path], None]  # write the previous artifact into work
    args: Callable[[Corpus, Path], list[str]]
    ignore: tuple[str, ...] = ()  # entries a failed run may legitimately touch


def _prepare_processed(corpus: Corpus, work: Path) -> None:
    shutil.copytree(corpus.processed, work / "out" / "processed")


def _prepare_tokenizer(corpus: Corpus, work: Path) -> None:
    (work / "out").mkdir()
    shutil.copy(corpus.tokenizer, work / "out" / "tokenizer.json")


def _prepare_run(corpus: Corpus, work: Path) -> None:
    assert isinstance(corpus, Trained)  # the `trained` fixture
    shutil.copytree(corpus.run, work / "out")


STAGES = {
    "preprocess": Stage(
        "preprocess", lambda work: work / "out", _prepare_processed,
        lambda corpus, work: ["preprocess", str(corpus.other_raw), "--out",
                              str(work / "out" / "processed"), "--overwrite", "--workers", "1"]),
    "tokenizer": Stage(
        "tokenizer", lambda work: work / "out", _prepare_tokenizer,
        lambda corpus, work: ["train-tokenizer", "--data", str(corpus.processed), "--out",
                              str(work / "out" / "tokenizer.json"), "--overwrite",
                              "--vocab-size", "300", "--workers", "1"]),
    "checkpoint": Stage(
        "checkpoint", lambda work: work / "out", _prepare_run,
        lambda corpus, work: train_args(corpus, work / "out", "--resume", "--max-steps",
                                      str(TRAIN_STEPS + 4)),
        ignore=("metrics.jsonl",)),
}


def arm_during_checkpoint_saves(disk: FullDisk, monkeypatch) -> None:
    """Training writes more than checkpoints (metrics); only the save meets the full disk."""
    real_save = save_checkpoint

    def save(*args, **kwargs):
        disk.armed = True
        try:
            return real_save(*args, **kwargs)
        finally:
            disk.armed = False

    disk.armed = False
    monkeypatch.setattr(checkpoint_save, "save_checkpoint", save)


def run_on_disk(stage: Stage, corpus: Corpus, work: Path, disk: FullDisk, runner: CliRunner):
    with pytest.MonkeyPatch.context() as patch:
        install_disk(disk, patch)
        if stage.name == "checkpoint":
            arm_during_checkpoint_saves(disk, patch)
        return runner.invoke(cli, ["-q", *stage.args(corpus, work)])


@pytest.fixture(scope="module")
def bytes_written(trained, tmp_path_factory) -> Callable[[str], int]:
    """How many bytes each stage's run writes when the disk has room (measured once)."""
    cache: dict[str, int] = {}

    def measure(name: str) -> int:
        if name not in cache:
            stage, work = STAGES[name], tmp_path_factory.mktemp(f"measure-{name}")
            stage.prepare(trained, work)
            disk = FullDisk(None)
            result = run_on_disk(stage, trained, work, disk, CliRunner())
            assert result.exit_code == 0, result.output
            cache[name] = disk.used
        return cache[name]

    return measure


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.999, "fsync"])
@pytest.mark.parametrize("name", list(STAGES))
def test_disk_full_keeps_the_previous_artifact(name, fraction, trained, bytes_written,
                                               runner, tmp_path):
    """ENOSPC after N bytes (or at fsync): exit 1 with one line, the previous artifact
    byte for byte, and no zero-byte, partial or temporary file beside it."""
    stage = STAGES[name]
    stage.prepare(trained, tmp_path)
    before = snapshot(stage.folder(tmp_path), stage.ignore)
    disk = (FullDisk(None, fail_fsync=True) if fraction == "fsync"
            else FullDisk(int(bytes_written(name) * fraction)))
    result = run_on_disk(stage, trained, tmp_path, disk, runner)
    assert_one_error_line(result, "disk full")
    assert snapshot(stage.folder(tmp_path), stage.ignore) == before


# ---------------------------------------------------------------- a real small tmpfs


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs, or a skip where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, check=False) if shutil.which("mount") else None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def fill(mount: Path, leave: int) -> None:
    """Fill the filesystem, then give back `leave` bytes."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as fh:
        with pytest.raises(OSError) as info:
            while True:
                fh.write(b"\0" * (1 << 16))
    assert info.value.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))


@pytest.mark.parametrize("fraction", [0.0, 0.5])
@pytest.mark.parametrize("name", list(STAGES))
def test_real_full_tmpfs_keeps_the_previous_artifact(name, fraction, trained, bytes_written,
                                                     runner, small_tmpfs):
    """The same on a real filesystem: free space for `fraction` of what the stage writes."""
    stage = STAGES[name]
    stage.prepare(trained, small_tmpfs)
    fill(small_tmpfs, int(bytes_written(name) * fraction))
    before = snapshot(stage.folder(small_tmpfs), stage.ignore)
    result = runner.invoke(cli, ["-q", *stage.args(trained, small_tmpfs)])
    assert_one_error_line(result, "disk full")
    assert snapshot(stage.folder(small_tmpfs), stage.ignore) == before


# ====================================================== 2. SIGKILL at random moments


def fragment_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "fragment_llm", "--quiet", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, log: Path,
             timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL `proc` after `delay` seconds; False if it finished first."""
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


@dataclass(frozen=True)
class Baseline:
    """What an uninterrupted run of each stage produces, and how long its work takes
    (from its start marker to its end): kills are drawn over that span."""

    seconds: dict[str, float]
    documents: int  # in the processed output of other_raw
    tokenizer_sha256: str  # of the 300-token tokenizer


def tokenizer_command(corpus: Corpus, out: Path) -> list[str]:
    return fragment_command("train-tokenizer", "--data", str(corpus.processed), "--out",
                            str(out), "--overwrite", "--vocab-size", "300", "--workers", "1")


@pytest.fixture(scope="module")
def baseline(corpus, reference, tmp_path_factory) -> Baseline:
    root = tmp_path_factory.mktemp("baseline")
    began = time.monotonic()
    documents = run_preprocess([corpus.other_raw], root / "processed", PreprocessConfig(workers=1)
                               ).manifest.counts.documents
    seconds = {"preprocess": time.monotonic() - began, "train": reference.seconds}
    began = time.monotonic()  # no marker for the tokenizer: its whole process is the span
    subprocess.run(tokenizer_command(corpus, root / "tokenizer.json"), check=True)
    seconds["tokenizer"] = time.monotonic() - began
    return Baseline(seconds, documents, Tokenizer.load(root / "tokenizer.json").sha256)


def run_then_kill(cmd: list[str], seed: int, span: float, started: Callable[[], bool],
                  log: Path) -> bool:
    """Run `cmd`; once `started()`, SIGKILL it at a seeded random moment of `span` (a bit
    more, so some runs finish). False when it finished before the kill."""
    proc = start(cmd, log)
    wait_for(lambda: started() or proc.poll() is not None, proc, log)
    return kill_after(proc, random.Random(seed).uniform(0.0, 1.1 * span))


def stale_temp(folder: Path, name: str, directory: bool = False) -> Path:
    """A temporary as a run killed with pid 999999999 (long gone) would have left it."""
    path = folder / f".{name}.fragment-tmp-999999999-deadbeef"
    if directory:
        path.mkdir()
        (path / "half-written").write_bytes(b"\0" * 10)
    else:
        path.write_bytes(b"")
    return path


def _kill_preprocess(seed: int, corpus: Corpus, work: Path, baseline: Baseline) -> None:
    out = work / "processed"
    shutil.copytree(corpus.processed, out)
    old_documents = ProcessedCorpus.open(out).documents
    cmd = fragment_command("preprocess", str(corpus.other_raw), "--out", str(out), "--overwrite",
                           "--workers", "1")
    run_then_kill(cmd, seed, baseline.seconds["preprocess"],
                  lambda: any(work.glob(".processed.fragment-tmp-*")), work.parent / "log")
    after = ProcessedCorpus.open(out)  # the old result or the new one, never neither
    assert after.documents in (old_documents, baseline.documents)
    stale_temp(work, "processed", directory=True)  # as if an earlier run had been killed
    run_preprocess([corpus.other_raw], out, PreprocessConfig(workers=1), overwrite=True)
    assert hidden_entries(work) == []


def _kill_tokenizer(seed: int, corpus: Corpus, work: Path, baseline: Baseline) -> None:
    out = work / "tokenizer.json"
    shutil.copy(corpus.tokenizer, out)
    old = Tokenizer.load(out).sha256
    run_then_kill(tokenizer_command(corpus, out), seed, baseline.seconds["tokenizer"],
                  lambda: True, work.parent / "log")
    assert Tokenizer.load(out).sha256 in (old, baseline.tokenizer_sha256)
    stale_temp(work, "tokenizer.json")  # as if an earlier run had been killed mid-write
    train_tokenizer(corpus.processed, out, TokenizerConfig(vocab_size=300, workers=1),
                    overwrite=True)
    assert hidden_entries(work) == []


KILLED_STAGES = pytest.mark.parametrize("stage", [_kill_preprocess, _kill_tokenizer],
                                        ids=["preprocess", "tokenizer"])


@pytest.mark.parametrize("seed", CI_SEEDS)
@KILLED_STAGES
def test_sigkill_at_a_random_moment(stage, seed, corpus, baseline, tmp_path):
    """Afterwards the previous (or the complete new) artifact loads, and the next run
    removes every temporary a killed run left behind."""
    (tmp_path / "work").mkdir()
    stage(seed, corpus, tmp_path / "work", baseline)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
@KILLED_STAGES
def test_sigkill_at_a_random_moment_more_seeds(stage, seed, corpus, baseline, tmp_path):
    (tmp_path / "work").mkdir()
    stage(seed, corpus, tmp_path / "work", baseline)


PARK_IN_FSYNC = (
    "import os, sys, time\n"
    "os.fsync = lambda fd: time.sleep(3600)  # parked mid-write: the test kills us here\n"
    "from fragment_llm.cli.app import main\n"
    "sys.argv = ['fragment'] + sys.argv[1:]\n"
    "main()\n")


def test_sigkill_inside_the_tokenizer_write(corpus, tmp_path):
    """Killed between writing the temporary and renaming it: the old file is intact and
    the half-written temporary is removed by the next run."""
    out = tmp_path / "tokenizer.json"
    shutil.copy(corpus.tokenizer, out)
    before = out.read_bytes()
    cmd = [sys.executable, "-c", PARK_IN_FSYNC, *tokenizer_command(corpus, out)[3:]]
    proc = start(cmd, tmp_path / "log")
    wait_for(lambda: bool(hidden_entries(tmp_path)), proc, tmp_path / "log")
    proc.kill()
    proc.wait()
    assert out.read_bytes() == before
    Tokenizer.load(out)
    train_tokenizer(corpus.processed, out, TokenizerConfig(vocab_size=300, workers=1),
                    overwrite=True)
    assert hidden_entries(tmp_path) == []


def _kill_training(seed: int, corpus: Corpus, work: Path, reference: Reference,
                   baseline: Baseline) -> None:
    run = work / "run"
    run_then_kill(fragment_command(*train_args(corpus, run)), seed, baseline.seconds["train"],
                  lambda: (run / ".lock").exists(), work / "log")
    latest, _skipped = find_latest_valid(run)
    if latest is not None:  # killed after the first checkpoint: it must load
        Tokenizer.load(load_checkpoint(latest).tokenizer_path)
    # As if an earlier run had been killed saving step 2, which this run never writes:
    # only a clean-up at start removes it (saving step N cleans up after step N only).
    stale_temp(run, "step-0000002", directory=True)
    run_training(train_request(corpus, run, resume=True), lambda event: None)
    assert_same_weights(reference.weights, final_weights(run))
    assert hidden_entries(run, allowed=(".lock",)) == []


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_sigkill_during_training_then_resume_is_exact(seed, corpus, reference, baseline,
                                                      tmp_path):
    _kill_training(seed, corpus, tmp_path, reference, baseline)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_SEEDS)
def test_sigkill_during_training_more_seeds(seed, corpus, reference, baseline, tmp_path):
    _kill_training(seed, corpus, tmp_path, reference, baseline)


# ================================================================== 3. races


def test_second_trainer_is_refused_and_the_first_is_unharmed(corpus, reference, runner,
                                                             tmp_path):
    """Trainer A is paused (SIGSTOP) holding the run folder; trainer B on the same folder
    must be refused with one line, and A, resumed, must end exactly as if alone."""
    run, log = tmp_path / "run", tmp_path / "log"
    first = start(fragment_command(*train_args(corpus, run)), log)
    try:
        wait_for(lambda: (run / "step-0000004").is_dir(), first, log)
        first.send_signal(signal.SIGSTOP)
        result = runner.invoke(cli, ["-q", *train_args(corpus, run)])
    finally:
        first.send_signal(signal.SIGCONT)
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0].startswith("error: another trainer is using")
    assert first.wait(timeout=300) == 0, log.read_text()
    assert_same_weights(reference.weights, final_weights(run))


NEWEST = f"step-{TRAIN_STEPS:07d}"
FALLBACK = f"step-{TRAIN_STEPS - 4:07d}"


@pytest.fixture
def run_copy(reference, tmp_path) -> tuple[Path, Path]:
    """A copy of the reference run and, elsewhere, a byte-identical copy of its newest
    step: a valid checkpoint that only following a symlink would reach."""
    shutil.copytree(reference.out, tmp_path / "run")
    shutil.copytree(reference.out / NEWEST, tmp_path / "elsewhere" / NEWEST)
    return tmp_path / "run", tmp_path / "elsewhere"


def swap_for_symlink(path: Path, target: Path) -> None:
    shutil.rmtree(path)
    path.symlink_to(target, target_is_directory=True)


def test_step_folder_swapped_for_a_symlink_after_listing(run_copy, monkeypatch):
    """Listing saw a real newest step; by the time it is opened it is a symlink to a valid
    copy elsewhere. It must be skipped, never followed, and the step before used."""
    run, elsewhere = run_copy
    real_entries = _step_entries

    def list_then_swap(run_dir):
        listed = real_entries(run_dir)
        swap_for_symlink(run / NEWEST, elsewhere / NEWEST)
        return listed

    monkeypatch.setattr(checkpoint_load, "_step_entries", list_then_swap)
    found, skipped = find_latest_valid(run)
    assert found == run / FALLBACK
    assert [(p.name, "symlink" in why) for p, why in skipped] == [(NEWEST, True)]


def test_step_folder_swapped_for_a_symlink_during_verification(run_copy, monkeypatch):
    """The folder passed its own checks, then became a symlink before its files were
    listed: loading must refuse rather than accept what it verified through the link."""
    run, elsewhere = run_copy
    real_check_entries = _check_entries

    def swap_then_list(folder):
        swap_for_symlink(folder, elsewhere / folder.name)
        return real_check_entries(folder)

    monkeypatch.setattr(checkpoint_load, "_check_entries", swap_then_list)
    with pytest.raises(CheckpointError, match="replaced while being verified"):
        load_checkpoint(run / NEWEST)


def test_step_pruned_while_being_loaded_is_gone_not_damaged(run_copy, monkeypatch):
    """A trainer pruning old checkpoints renames a step away (then deletes it) while a
    loader reads it: whatever read failed, the step is reported removed, and resolving
    a run folder passes over it without calling it damaged."""
    run, elsewhere = run_copy
    real_check_entries = _check_entries

    def prune_then_list(folder):
        if folder.name == NEWEST:
            os.replace(folder, temp_name_for(folder))  # as `_prune` does
        return real_check_entries(folder)

    monkeypatch.setattr(checkpoint_load, "_check_entries", prune_then_list)
    with pytest.raises(CheckpointRemovedError, match="removed while being verified"):
        load_checkpoint(run / NEWEST)
    shutil.copytree(elsewhere / NEWEST, run / NEWEST)
    assert find_latest_valid(run) == (run / FALLBACK, [])


def test_checkpoint_file_swapped_for_a_symlink_after_listing(run_copy, monkeypatch):
    run, elsewhere = run_copy
    real_check_entries = _check_entries

    def list_then_swap(folder):
        names = real_check_entries(folder)
        (folder / MODEL_FILE).unlink()
        (folder / MODEL_FILE).symlink_to(elsewhere / NEWEST / MODEL_FILE)
        return names

    monkeypatch.setattr(checkpoint_load, "_check_entries", list_then_swap)
    with pytest.raises(CheckpointError, match="symlink|size mismatch"):
        load_checkpoint(run / NEWEST)


def test_checkpoint_file_rewritten_after_hashing_is_refused(run_copy, monkeypatch):
    """model.safetensors is overwritten with an earlier step's (same size, other weights)
    right after its sha256 was checked: the weights loaded must be the verified ones."""
    run, _ = run_copy
    real_verify = _verify_file

    def verify_then_rewrite(path, entry, max_bytes):
        real_verify(path, entry, max_bytes)
        if path.name == MODEL_FILE:
            path.write_bytes((run / FALLBACK / MODEL_FILE).read_bytes())

    monkeypatch.setattr(checkpoint_load, "_verify_file", verify_then_rewrite)
    checkpoint = load_checkpoint(run / NEWEST)
    model = GPT(ModelConfig(**{**MODEL, "vocab_size": 320}))
    with pytest.raises(CheckpointError, match="changed since its manifest"):
        checkpoint.load_model_into(model)


def _rewrite_in_place(path: Path, change: Callable[[bytearray], None]) -> None:
    """Same inode, same size, other bytes: what a concurrent writer does."""
    data = bytearray(path.read_bytes())
    change(data)
    with open(path, "r+b") as fh:
        fh.write(data)


def test_token_shard_rewritten_after_hashing_is_refused(corpus, reference, tmp_path,
                                                        monkeypatch):
    folder = tmp_path / "tokens"
    shutil.copytree(next((corpus.root / "tokens").iterdir()), folder)
    real_memmap = np.memmap

    def rewrite_then_map(*args, **kwargs):
        _rewrite_in_place(folder / "train-00000.bin",
                          lambda data: data.__setitem__(0, (data[0] + 1) % 256))
        return real_memmap(*args, **kwargs)

    monkeypatch.setattr(data_module.np, "memmap", rewrite_then_map)
    with pytest.raises(DatasetError, match="sha256"):
        data_module.TokenShards.open(folder, 320)
