"""Helper processes: they end with the process that started them, and their count is
capped by the cores and the memory there are (fragment_llm/safety/workers.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import fragment_llm.safety.workers as workers
from fragment_llm.cli.app import cli
from fragment_llm.data.processed import MANIFEST_NAME
from fragment_llm.safety.files import TEMP_MARKER
from tests.helpers import SAMPLE

MiB = 1 << 20


# ------------------------------------------------------------------- process trees


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (every thread's list)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as fh:
                found += [int(child) for child in fh.read().split()]
        except OSError:
            continue
    return found


def descendants(pid: int, depth: int = 1) -> dict[int, int]:
    """Every process below `pid`, with its depth (1: a child, 2: a grandchild...)."""
    tree: dict[int, int] = {}
    for child in children(pid):
        tree[child] = depth
        tree.update(descendants(child, depth + 1))
    return tree


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def flat(output: str) -> str:
    """CLI output as one line: table borders removed, whitespace collapsed."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


def wait_until_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


requires_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                   reason="needs Linux /proc to find helper processes")


# ------------------------------------------------- item: helpers die with the parent


def big_corpus(folder: Path, files: int, megabytes: int) -> Path:
    """`files` text files of `megabytes` each: enough work that a helper is still busy
    (and has more queued) seconds after it started."""
    folder.mkdir()
    text = "".join((SAMPLE / name).read_text() for name in sorted(os.listdir(SAMPLE)))
    body = (text * (megabytes * MiB // len(text) + 1))[:megabytes * MiB]
    for index in range(files):
        (folder / f"{index:02d}.txt").write_text(f"{index}\n{body}")
    return folder


@requires_proc
def test_sigkill_of_preprocess_ends_its_helpers_and_the_next_run_cleans_up(tmp_path):
    raw = big_corpus(tmp_path / "raw", files=8, megabytes=24)
    out = tmp_path / "processed"
    proc = subprocess.Popen([sys.executable, "-m", "fragment_llm", "-q", "preprocess",
                             str(raw), "--out", str(out), "--workers", "2"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and max(seen.values(), default=0) < 2:
        seen.update(descendants(proc.pid))  # the fork server's children are the helpers
        time.sleep(0.01)
    assert max(seen.values(), default=0) >= 2, "no helper process started"
    # Kill once the staging folder exists (on a busy machine the helpers can start well
    # before it does), while the helpers are reading with more files queued for them.
    while time.monotonic() < deadline and not any(TEMP_MARKER in p.name
                                                  for p in tmp_path.iterdir()):
        time.sleep(0.01)
    time.sleep(0.2)
    seen.update(descendants(proc.pid))
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert wait_until_gone(list(seen), 3.0) == [], "helpers outlived the killed run"
    staging = [p for p in tmp_path.iterdir() if TEMP_MARKER in p.name]
    assert staging, "the killed run left its staging folder (the next run removes it)"
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text((SAMPLE / "sonnets_gut.txt").read_text()[:20_000])
    result = CliRunner().invoke(cli, ["-q", "preprocess", str(small), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed", "raw", "small"]
    assert not (out / ".spool").exists()


HARNESS = textwrap.dedent("""
    import multiprocessing, os, sys, time
    import fragment_llm.safety.workers as workers

    def start(no_prctl):
        if no_prctl == "watchdog":  # as on a system without prctl
            workers._ask_for_parent_death_signal = lambda: False
        workers.die_with_parent()

    def work(_):
        time.sleep(60)

    if __name__ == "__main__":
        method, mode = sys.argv[1], sys.argv[2]
        context = multiprocessing.get_context(method)
        pool = context.Pool(2, start, (mode,))
        pool.map_async(work, range(2))
        print("ready", flush=True)
        time.sleep(60)
""")


@requires_proc
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("mode", ["prctl", "watchdog"])
def test_a_helper_ends_when_its_parent_is_killed(method, mode, tmp_path):
    """Every start method the package uses, with the parent-death signal and with the
    watchdog that stands in for it where prctl is missing."""
    script = tmp_path / "harness.py"
    script.write_text(HARNESS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), method, mode], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 30
    helpers: list[int] = []
    while time.monotonic() < deadline and len(helpers) < 2:
        tree = descendants(proc.pid)
        helpers = [pid for pid, depth in tree.items()
                   if depth == (2 if method == "forkserver" else 1)
                   and _is_pool_worker(pid, depth)]
        time.sleep(0.05)
    assert len(helpers) == 2
    everything = list(descendants(proc.pid))
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert wait_until_gone(helpers, 3.0) == []
    assert wait_until_gone(everything, 10.0) == []  # the fork server and tracker too


def _is_pool_worker(pid: int, depth: int) -> bool:
    """Not multiprocessing's resource tracker, nor (as a child) its fork server, whose
    own children, the fork server's helpers, carry its command line."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"resource_tracker" in cmdline:
        return False
    return depth == 2 or b"forkserver import main" not in cmdline


def test_die_with_parent_is_a_no_op_in_the_main_process():
    workers.die_with_parent()  # no parent process: nothing to watch, nothing set


# ------------------------------------------------------ item: how many helpers


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: 2)
    monkeypatch.setattr(workers, "available_memory", lambda: 64 << 30)


def test_cap_workers_lowers_to_the_cores_with_a_reason(two_cores):
    cap = workers.cap_workers(12, 100 * MiB)
    assert (cap.count, cap.requested) == (2, 12)
    assert cap.note == "workers = 12 lowered to 2: 2 CPU cores are available to this process"
    assert workers.cap_workers(2, 100 * MiB).note is None


def test_cap_workers_lowers_to_what_memory_fits(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: 64)
    monkeypatch.setattr(workers, "available_memory", lambda: 1000 * MiB)
    cap = workers.cap_workers(12, 300 * MiB)  # 80% of 1000 MiB fits 2 of 300 MiB
    assert cap.count == 2
    assert "1,000 MiB of memory available fit 2 of ~300 MiB each" in str(cap.note)
    assert workers.cap_workers(12, 4000 * MiB).count == 1  # never below one


@pytest.mark.parametrize("text,quota", [("max 100000\n", None), ("200000 100000\n", 2),
                                        ("150000 100000\n", 2), ("50000 100000\n", 1),
                                        ("garbage\n", None)])
def test_cgroup_cpu_quota(tmp_path, text, quota):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert workers._cgroup_cpu_quota(path) == quota
    assert workers._cgroup_cpu_quota(tmp_path / "absent") is None


def test_usable_cores_is_at_least_one():
    assert 1 <= workers.usable_cores() <= (os.cpu_count() or 1)


def test_preprocess_workers_are_capped_noted_and_recorded(two_cores, tmp_path, runner,
                                                          monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text((SAMPLE / "sonnets_gut.txt").read_text()[:20_000])
    result = runner.invoke(cli, ["preprocess", str(raw), "--out", str(tmp_path / "out"),
                                 "--workers", "256"])
    assert result.exit_code == 0, result.output
    assert "workers = 256 lowered to 2: 2 CPU cores are available" in flat(result.output)
    manifest = (tmp_path / "out" / MANIFEST_NAME).read_bytes()
    assert json.loads(manifest)["config"]["workers"] == 256  # what was asked for
    # The lowered count depends on the machine; the manifest's bytes (and so every hash
    # and cache key downstream) must not.
    monkeypatch.setattr(workers, "usable_cores", lambda: 1)
    result = runner.invoke(cli, ["preprocess", str(raw), "--out", str(tmp_path / "out1"),
                                 "--workers", "256"])
    assert "lowered to 1" in flat(result.output)
    assert (tmp_path / "out1" / MANIFEST_NAME).read_bytes() == manifest


def test_train_tokenizer_workers_are_capped_noted_and_recorded(two_cores, tmp_path, runner):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text((SAMPLE / "sonnets_gut.txt").read_text()[:20_000])
    assert runner.invoke(cli, ["-q", "preprocess", str(raw), "--out",
                               str(tmp_path / "processed")]).exit_code == 0
    result = runner.invoke(cli, ["train-tokenizer", "--data", str(tmp_path / "processed"),
                                 "--out", str(tmp_path / "tok.json"), "--vocab-size", "300",
                                 "--workers", "64"])
    assert result.exit_code == 0, result.output
    assert "workers = 64 lowered to 2" in flat(result.output)
    saved = json.loads((tmp_path / "tok.json").read_text())
    assert saved["training"]["config"]["workers"] == 64  # asked for: the file's bytes and
    # hash do not depend on the machine it was trained on


def test_train_workers_are_capped_noted_and_recorded(two_cores, tmp_path, runner):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text((SAMPLE / "sonnets_gut.txt").read_text()[:30_000])
    processed, tokenizer = tmp_path / "data" / "processed", tmp_path / "data" / "tok.json"
    assert runner.invoke(cli, ["-q", "preprocess", str(raw), "--out", str(processed)]
                         ).exit_code == 0
    assert runner.invoke(cli, ["-q", "train-tokenizer", "--data", str(processed), "--out",
                               str(tokenizer), "--vocab-size", "300", "--workers", "1"]
                         ).exit_code == 0
    config = tmp_path / "train.toml"
    config.write_text("[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n"
                      "[train]\nworkers = 12\nbatch_size = 2\nmax_steps = 2\n"
                      "warmup_steps = 1\neval_every = 0\ncheckpoint_every = 0\n"
                      "eval_blocks = 1\nfinal_eval_blocks = 1\ndevice = \"cpu\"\n")
    out = tmp_path / "run"
    result = runner.invoke(cli, ["train", "--data", str(processed), "--tokenizer",
                                 str(tokenizer), "--out", str(out), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "workers = 12 lowered to 2: 2 CPU cores are available" in flat(result.output)
    step = sorted(out.glob("step-*"))[-1]
    assert json.loads((step / "config.json").read_text())["train"]["workers"] == 2


def test_token_shards_are_the_same_built_by_helper_processes(tmp_path, monkeypatch):
    """The token-shard encoders (bpe.encoder_pool: no torch in them) give the bytes one
    process gives."""
    import fragment_llm.tokenizer.bpe as bpe
    from fragment_llm.config import PreprocessConfig, TokenizerConfig
    from fragment_llm.data.preprocess import run_preprocess
    from fragment_llm.data.processed import ProcessedCorpus
    from fragment_llm.data.shards import BuildRequest, build_token_shards
    from fragment_llm.tokenizer.tokenizer import Tokenizer

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("hamlet_gut.txt", "sonnets_gut.txt"):
        (raw / name).write_text((SAMPLE / name).read_text()[:60_000])
    run_preprocess([raw], tmp_path / "processed", PreprocessConfig(workers=1))
    tok = Tokenizer.train(ProcessedCorpus.open(tmp_path / "processed").iter_texts(),
                          TokenizerConfig(vocab_size=300, workers=1))
    tok.save(tmp_path / "tok.json")
    monkeypatch.setattr(bpe, "MIN_PARALLEL_CHARS", 0)
    folders = [build_token_shards(BuildRequest(tmp_path / "processed", tmp_path / "tok.json",
                                               tmp_path / f"tokens{n}", 0.1, workers=n))
               for n in (1, 2)]
    listing = [{p.name: p.read_bytes() for p in folder.iterdir()} for folder in folders]
    assert listing[0] == listing[1]
