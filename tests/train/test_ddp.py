"""Training with two processes (CPU, gloo): every way out ends cleanly on every rank.

A rank that leaves while another still waits in a collective kills that one with gloo's
"Connection closed by peer" (exit 70). Each test below takes one way out (the last step
being a checkpoint step, SIGTERM or Ctrl-C reaching the ranks at different steps, a loss
that is NaN on one rank only, the time budget running out on one rank first) and checks
that both ranks end the same way, at the same step, with their one line.

The ranks are started here, with the environment `torchrun` would give them, so that
each one's exit code and stderr can be checked and a signal sent to one rank alone;
the first test goes through `torchrun` itself, as the issue's reproduction did. A rank
may run a few lines of `patch` first (a NaN, a fast clock) before the CLI starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fragment_llm.checkpoint.layout import list_checkpoints
from fragment_llm.checkpoint.load import find_latest_valid, load_checkpoint
from tests.helpers import FAST, MODEL, Corpus

LAUNCH_TIMEOUT_S = 240


def ddp_config(folder: Path, **train) -> Path:
    path = folder / "ddp.toml"
    values = {**FAST, "eval_every": 0, **train}
    path.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in MODEL.items())
                    + "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def train_args(corpus: Corpus, out: Path, config: Path, *extra: str) -> list[str]:
    processed, tokenizer = corpus.processed, corpus.tokenizer
    return ["--quiet", "train", "--data", str(processed), "--tokenizer", str(tokenizer),
            "--out", str(out), "--config", str(config), *extra]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Rank:
    proc: subprocess.Popen
    log: Path

    @property
    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


def launch(args: list[str], logs: Path, patch: dict[int, str] | None = None) -> list[Rank]:
    """Start two ranks of `fragment <args>` as torchrun would (RANK, WORLD_SIZE, ...)."""
    port, ranks = free_port(), []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in range(2):
        script = ("import os, sys, time\n" + textwrap.dedent((patch or {}).get(rank, ""))
                  + "\nfrom fragment_llm.cli.app import main\nmain()\n")
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log = logs / f"rank{rank}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)
        ranks.append(Rank(proc, log))
    return ranks


def wait_all(ranks: list[Rank], timeout: float = LAUNCH_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [rank.proc.wait(timeout=max(1.0, deadline - time.monotonic())) for rank in ranks]
    except subprocess.TimeoutExpired:
        for rank in ranks:
            rank.proc.kill()
            rank.proc.wait()
        pytest.fail("ranks still running: " + " | ".join(" / ".join(r.lines[-3:]) for r in ranks))


def wait_for_path(path: Path, ranks: list[Rank], timeout: float = LAUNCH_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for rank in ranks:
            assert rank.proc.poll() is None, rank.lines
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def assert_clean_lines(ranks: list[Rank]) -> None:
    for rank in ranks:
        text = "\n".join(rank.lines)
        assert "internal error" not in text and "Traceback" not in text, text


def saved_step(line: str) -> int:
    match = re.search(r"step-(\d{7})", line)
    assert match, line
    return int(match.group(1))


# ------------------------------------------------------------------------ the last step


def test_last_step_being_a_checkpoint_step_ends_cleanly_under_torchrun(corpus, tmp_path):
    """The issue's reproduction: rank 0 saved the last step in the loop and skipped the
    final save; rank 1 (which never learned the name) saved again and waited alone."""
    config = ddp_config(tmp_path, max_steps=4, checkpoint_every=4)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fragment_llm", *train_args(corpus, tmp_path / "run", config)],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "internal error" not in done.stderr
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000004"]


GLOO_REFERENCES_AFTER_AGREE = """
import sys
import torch
from fragment_llm.train.runtime import DistEnv, agree
given, all_reduce = [], torch.distributed.all_reduce
def recording_all_reduce(tensor, *args, **kwargs):
    given.append(tensor)
    return all_reduce(tensor, *args, **kwargs)
torch.distributed.all_reduce = recording_all_reduce
torch.distributed.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
sys.setswitchinterval(10)  # the GIL changes hands only where the code lets it go
counts = []
for _ in range(3000):
    agree([1.0], DistEnv(0, 2), torch.device("cpu"))  # a world of 2 only for agree's sake
    counts.append(given.pop()._use_count())
print(max(counts))
torch.distributed.destroy_process_group()
"""


@pytest.mark.skipif(not hasattr(torch.Tensor, "_use_count"), reason="torch without _use_count")
def test_a_collective_returns_once_gloo_has_let_go_of_its_tensors(tmp_path):
    """Gloo's worker thread drops its references to a collective's tensors a moment
    after the collective returns, and dropping a tensor Python made takes the GIL: if
    the rank is shutting its interpreter down by then, the process aborts ("terminate
    called without an active exception"; both ranks of the test above, once). So the
    collectives return only once Python alone holds the tensor (a use count of 1).
    Without that wait, 3,000 agreements here always left some tensor held."""
    script = GLOO_REFERENCES_AFTER_AGREE.format(store=tmp_path / "store")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1"], done.stdout


# ------------------------------------------------------------------------------ signals


def test_sigterm_to_one_rank_stops_both_at_the_same_step_then_resume(corpus, tmp_path):
    """Slurm or a user may signal one rank; the other learns it at the next step, both
    checkpoint the same step and exit 143 with one line; `--resume` then finishes."""
    run, config = tmp_path / "run", ddp_config(tmp_path, max_steps=40, checkpoint_every=4)
    ranks = launch(train_args(corpus, run, config), tmp_path / "first")
    wait_for_path(run / "step-0000004", ranks)
    ranks[1].proc.send_signal(signal.SIGTERM)
    assert wait_all(ranks) == [143, 143], [r.lines for r in ranks]
    assert all(len(r.lines) == 1 and r.lines[0].startswith("terminated: checkpoint saved at ")
               for r in ranks), [r.lines for r in ranks]
    step = saved_step(ranks[0].lines[0])
    assert saved_step(ranks[1].lines[0]) == step and 4 <= step < 40
    latest, _ = find_latest_valid(run)
    assert latest is not None and latest.name == f"step-{step:07d}"
    resumed = launch(train_args(corpus, run, config, "--resume"), tmp_path / "resumed")
    assert wait_all(resumed) == [0, 0], [r.lines for r in resumed]
    assert_clean_lines(resumed)
    assert find_latest_valid(run)[0].name == "step-0000040"


SIGTERM_JUST_AFTER_THE_THIRD_AGREEMENT = """
import signal
import fragment_llm.train.run as train
real_agree, agreements = train.agree, []
def agree_then_signal(values, env, device):
    agreed = real_agree(values, env, device)
    agreements.append(values)
    if len(agreements) == 3:  # as if it had arrived while rank 1 waited in the all-reduce
        os.kill(os.getpid(), signal.SIGTERM)
    return agreed
train.agree = agree_then_signal
"""


def test_sigterm_handled_just_after_the_ranks_agreed_stops_both_at_the_next(corpus, tmp_path):
    """A signal that reaches a rank waiting in the stop all-reduce is handled as soon as
    the all-reduce returns: too late for this agreement, whose "go on" the other rank
    already has. Rank 1 must go on too (it used to stop alone and wait for ever in its
    final evaluation), and both stop at the next agreement: after step 3, not 2."""
    run, config = tmp_path / "run", ddp_config(tmp_path, max_steps=40, checkpoint_every=0)
    ranks = launch(train_args(corpus, run, config), tmp_path / "logs",
                   {1: SIGTERM_JUST_AFTER_THE_THIRD_AGREEMENT})
    assert wait_all(ranks) == [143, 143], [r.lines for r in ranks]
    assert all(len(r.lines) == 1 and r.lines[0].startswith("terminated: checkpoint saved at ")
               for r in ranks), [r.lines for r in ranks]
    assert [saved_step(r.lines[0]) for r in ranks] == [3, 3]


SLOW_FINAL_EVALUATION = """
import fragment_llm.train.run as train
final_evaluation = train.TrainLoop._final_evaluation
def slow_final_evaluation(self, interrupted):
    time.sleep(1.5)  # the window in which rank 1's own Ctrl-C arrives
    return final_evaluation(self, interrupted)
train.TrainLoop._final_evaluation = slow_final_evaluation
"""


@pytest.mark.slow
def test_ctrl_c_reaching_the_ranks_at_different_steps(corpus, tmp_path):
    """Rank 0 is interrupted first; rank 1's own Ctrl-C comes later, once the ranks have
    agreed to stop: it is rank 1's first, so it must not abort it half-way (rank 0 would
    then wait alone in the final evaluation's all-reduce)."""
    run, config = tmp_path / "run", ddp_config(tmp_path, max_steps=400, checkpoint_every=4)
    ranks = launch(train_args(corpus, run, config), tmp_path / "logs",
                   {1: SLOW_FINAL_EVALUATION})
    wait_for_path(run / "step-0000004", ranks)
    ranks[0].proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    ranks[1].proc.send_signal(signal.SIGINT)
    assert wait_all(ranks) == [130, 130], [r.lines for r in ranks]
    assert_clean_lines(ranks)
    latest, _ = find_latest_valid(run)
    assert latest is not None and 4 <= load_checkpoint(latest).trainer_state.step < 400


# ----------------------------------------------------------------- NaN and time budget


NAN_ON_RANK_1 = """
import fragment_llm.train.trainer as train
real_loss = train.lm_loss
train.lm_loss = lambda logits, targets: real_loss(logits, targets) + float("nan")
"""


def test_nan_loss_on_one_rank_stops_both_with_one_line(corpus, tmp_path):
    """The loss is NaN on rank 1 only (its gradients are finite): both ranks must skip
    the same steps and stop after the same three, not rank 1 alone."""
    run, config = tmp_path / "run", ddp_config(tmp_path, max_steps=40, checkpoint_every=0)
    ranks = launch(train_args(corpus, run, config), tmp_path / "logs", {1: NAN_ON_RANK_1})
    assert wait_all(ranks) == [1, 1], [r.lines for r in ranks]
    for rank in ranks:
        assert rank.lines[0].startswith("error: loss or gradients were not finite for 3 steps"
                                        " in a row (step 3)"), rank.lines
    assert_clean_lines(ranks)
    assert not list(run.glob("step-*"))


FAST_CLOCK = """
real_clock = time.perf_counter
start = real_clock()
time.perf_counter = lambda: start + 100 * (real_clock() - start)
"""


@pytest.mark.slow
def test_time_budget_reached_on_one_rank_first(corpus, tmp_path):
    """Rank 1's clock runs 100x fast, so its --max-time ends first: both ranks must stop
    at the same step, and the budget is the largest elapsed time of any rank."""
    run, config = tmp_path / "run", ddp_config(tmp_path, max_steps=100_000, checkpoint_every=0)
    ranks = launch(train_args(corpus, run, config, "--max-time", "3s"), tmp_path / "logs",
                   {1: FAST_CLOCK})
    assert wait_all(ranks) == [0, 0], [r.lines for r in ranks]
    assert_clean_lines(ranks)
    latest, _ = find_latest_valid(run)
    state = load_checkpoint(latest).trainer_state
    assert state.elapsed_s >= 3.0 and state.step < 1000
