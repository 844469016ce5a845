"""SIGTERM, what service managers send to stop a process, through the real CLI.

`train` treats it like a first Ctrl-C (finish the step, checkpoint, exit 143 with one
line); every other verb unwinds (`signals.Terminated`): no half-written output, the
earlier result intact, its worker processes gone, exit 143 with one line. The two
mechanisms underneath, a step held together by `uninterrupted()` and a forked worker
that must still die by SIGTERM, are tested in process at the end.
"""

from __future__ import annotations

import glob
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import fragment_llm.safety.files as safeio
from fragment_llm.cli.app import cli
from fragment_llm.config import PreprocessConfig
from fragment_llm.data.preprocess import run_preprocess
from fragment_llm.safety.signals import Terminated, signals_as_exceptions, uninterrupted
from tests.helpers import SAMPLE, Corpus, assert_same_weights, final_weights
from tests.test_faults import (
    fragment_command,
    hidden_entries,
    snapshot,
    start,
    train_args,
    wait_for,
)

STEPS, EVERY = 60, 20  # a run long enough that SIGTERM lands between checkpoints
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # a busy CI box


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, their children: pool workers, forkserver)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        for path in glob.glob(f"/proc/{todo.pop()}/task/*/children"):
            try:
                children = {int(p) for p in Path(path).read_text().split()}
            except OSError:
                continue
            todo += children - found
            found |= children
    return found


def assert_all_gone(pids: set[int], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()
                 and "Z" not in _state(pid)}
        time.sleep(0.05)
    assert not alive, f"still running after the parent: {sorted(alive)}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def terminate(proc: subprocess.Popen, log: Path) -> list[str]:
    """SIGTERM `proc`; it must exit 143 with one line on stderr, which is returned."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    return lines


# ------------------------------------------------------------------------------- train


def test_sigterm_during_training_checkpoints_the_step_reached_and_resume_is_exact(
        corpus: Corpus, tmp_path):
    reference, run, log = tmp_path / "reference", tmp_path / "run", tmp_path / "log"
    flags = ("--max-steps", str(STEPS), "--checkpoint-every", str(EVERY), "--eval-every", "0")
    subprocess.run(fragment_command(*train_args(corpus, reference, *flags)), env=ONE_THREAD,
                   timeout=300, check=True)
    with open(log, "wb") as err:
        proc = subprocess.Popen(fragment_command(*train_args(corpus, run, *flags)),
                                env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=err)
    wait_for(lambda: (run / f"step-{EVERY:07d}").is_dir(), proc, log)
    [line] = terminate(proc, log)
    assert line.startswith(f"terminated: checkpoint saved at {run}/step-"), line
    step = int(line.split("step-")[1][:7])
    assert EVERY <= step < STEPS  # the step reached, not the last periodic checkpoint
    assert (run / f"step-{step:07d}").is_dir()
    last_logged = (run / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last_logged)["step"] == step
    subprocess.run(fragment_command(*train_args(corpus, run, *flags, "--resume")),
                   env=ONE_THREAD, timeout=300, check=True)
    assert_same_weights(final_weights(reference), final_weights(run))
    assert hidden_entries(run, allowed=(".lock",)) == []


# ------------------------------------------------------------ preprocess and tokenizer


@pytest.fixture(scope="module")
def big_raw(tmp_path_factory) -> Path:
    """17 MiB of distinct documents: enough for preprocess to start its worker pool."""
    folder = tmp_path_factory.mktemp("big") / "raw"
    folder.mkdir()
    text = "".join(p.read_text() for p in sorted(SAMPLE.glob("*.txt")))
    for i in range(18):
        (folder / f"part{i:02d}.txt").write_text(f"copy {i}\n{text}")
    return folder


def test_sigterm_during_preprocess_keeps_the_earlier_output_and_ends_its_workers(
        corpus: Corpus, big_raw, tmp_path):
    out, log = tmp_path / "processed", tmp_path / "log"
    run_preprocess([corpus.raw], out, PreprocessConfig(workers=1))
    before = snapshot(out)
    proc = start(fragment_command("preprocess", str(big_raw), "--out", str(out),
                                  "--overwrite", "--workers", "2"), log)
    wait_for(lambda: bool(hidden_entries(tmp_path)) and len(descendants(proc.pid)) >= 3,
             proc, log)  # staging folder made, forkserver and a pool worker running
    workers = descendants(proc.pid)
    assert terminate(proc, log) == ["terminated"]
    assert snapshot(out) == before
    assert hidden_entries(tmp_path) == []
    assert_all_gone(workers)
    fresh = tmp_path / "fresh"
    proc = start(fragment_command("preprocess", str(big_raw), "--out", str(fresh),
                                  "--workers", "2"), log)
    wait_for(lambda: bool(hidden_entries(tmp_path)), proc, log)
    assert terminate(proc, log) == ["terminated"]
    assert not fresh.exists() and hidden_entries(tmp_path) == []


@pytest.fixture(scope="module")
def big_processed(big_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("big_processed") / "processed"
    run_preprocess([big_raw], out, PreprocessConfig(workers=1))
    return out


def test_sigterm_during_train_tokenizer_keeps_the_earlier_file_and_ends_its_helpers(
        corpus: Corpus, big_processed, tmp_path):
    target, log = tmp_path / "tokenizer.json", tmp_path / "log"
    target.write_bytes(corpus.tokenizer.read_bytes())
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    proc = start(fragment_command("train-tokenizer", "--data", str(big_processed), "--out",
                                  str(target), "--overwrite", "--vocab-size", "1000",
                                  "--workers", "2"), log)
    wait_for(lambda: len(descendants(proc.pid)) >= 1, proc, log)  # its counting helpers
    time.sleep(0.2)
    helpers = descendants(proc.pid)
    assert terminate(proc, log) == ["terminated"]
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "tokenizer.json"]
    assert_all_gone(helpers)


# ------------------------------------------------------------------ the mechanism


def test_sigterm_maps_to_exit_143_and_one_line(runner, monkeypatch):
    import fragment_llm.data.preprocess as preprocess

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises long before this ends

    monkeypatch.setattr(preprocess, "run_preprocess", stopped)
    began = time.monotonic()
    result = runner.invoke(cli, ["preprocess"])
    assert result.exit_code == 143 and result.stderr == "terminated\n", result.output
    assert time.monotonic() - began < 5
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored afterwards


def test_a_signal_between_the_two_renames_of_a_swap_waits_for_the_second(tmp_path,
                                                                          monkeypatch):
    """Split there, the earlier folder would sit under a hidden name and the new one be
    deleted: no output at all until the next run restored it."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "old").write_text("old")
    real_replace = os.replace
    calls = []

    def replace_then_signal(src, dst):
        real_replace(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # the earlier result has just been moved aside
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(safeio.os, "replace", replace_then_signal)
    with pytest.raises(Terminated), signals_as_exceptions():
        with safeio.staged_dir(target, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["new"]


def test_uninterrupted_holds_ctrl_c_too_and_nests(tmp_path):
    done = []
    with pytest.raises(KeyboardInterrupt), signals_as_exceptions():
        with uninterrupted():
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
                done.append("inner")
            done.append("outer")
    assert done == ["inner", "outer"]


def _sleep() -> None:
    time.sleep(60)


def test_a_forked_worker_still_dies_by_sigterm():
    """A fork copies our handler; Pool.terminate() must still end the worker at once,
    not raise Terminated inside it (a traceback, and a worker that carries on)."""
    with signals_as_exceptions():
        worker = multiprocessing.get_context("fork").Process(target=_sleep)
        worker.start()
        time.sleep(0.2)
        worker.terminate()
        worker.join(10)
    assert worker.exitcode == -signal.SIGTERM
