"""`fragment experiment` and `fragment report` end to end: a micro plan (2 runs x 2 seeds
of a one-layer, 16-wide model, 20 steps) through the CLI, its results files, resuming it
half finished, and the report's table and picture."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from fragment_llm.cli.app import cli
from fragment_llm.cli.common import FLAGS
from fragment_llm.experiment.metrics import Curves, Point
from fragment_llm.experiment.report import minutes_to_reach
from tests.helpers import REPO

PLAN = """description = "micro"
seeds = [1, 2]
[budget]
max_steps = 20
[base.model]
n_layer = 1
n_head = 1
n_embd = 16
block_size = 16
[base.train]
batch_size = 2
workers = 1
checkpoint_every = 10
eval_every = 10
final_eval_blocks = 64
device = "cpu"
[[runs]]
name = "a"
[[runs]]
name = "b"
train.lr = 3e-3
"""


def fragment(*args: str) -> Result:
    FLAGS.debug = FLAGS.quiet = False
    return CliRunner().invoke(cli, list(args), prog_name="fragment")


def run_plan(plan: Path, out: Path, corpus, *more: str) -> Result:
    return fragment("experiment", str(plan), "--out", str(out), "--data", str(corpus.processed),
                    "--tokenizer", str(corpus.tokenizer), *more)


@pytest.fixture(scope="module")
def child_env():
    """Each run is a `python -m fragment_llm train` process: this tree, one thread."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO),
                                                                 os.environ.get("PYTHONPATH")])))
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def micro(corpus, child_env, tmp_path_factory) -> tuple[Path, Path, dict]:
    """The micro plan run once, uninterrupted: (plan, out folder, its --json output)."""
    root = tmp_path_factory.mktemp("experiment")
    plan = root / "plan.toml"
    plan.write_text(PLAN)
    result = run_plan(plan, root / "out", corpus, "--json")
    assert result.exit_code == 0, result.output
    return plan, root / "out", json.loads(result.stdout)


def seed_figures(out: Path) -> dict[tuple[str, int], tuple]:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return {(s["run"], s["seed"]): (s["status"], s["steps"], s["val_bpb"])
            for run in runs for s in run["seeds"]}


def test_a_micro_plan_trains_every_run_and_seed_and_writes_the_results(micro):
    plan, out, summary = micro
    assert (summary["trained"], summary["skipped"], summary["failed"]) == (4, 0, 0)
    for run in ("a", "b"):
        for seed in (1, 2):
            folder = out / run / f"seed-{seed}"
            assert (folder / "step-0000020").is_dir() and (folder / "metrics.jsonl").is_file()
            assert f"seed = {seed}\n" in (folder / "train.toml").read_text()
    config = json.loads((out / "b" / "seed-1" / "step-0000020" / "config.json").read_text())
    assert (config["train"]["lr"], config["train"]["seed"], config["model"]["n_embd"]) == \
        (3e-3, 1, 16)  # an ordinary training run with the run's settings
    figures = seed_figures(out)
    assert {key: value[:2] for key, value in figures.items()} == {
        (run, seed): ("done", 20) for run in "ab" for seed in (1, 2)}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["run"], r["overrides"], r["seeds_done"]) for r in rows] == [
        ("a", "base", "2"), ("b", "train.lr=0.003", "2")]
    bpbs = [figures[("b", 1)][2], figures[("b", 2)][2]]
    b = summary["runs"][1]
    assert b["val_bpb_mean"] == pytest.approx(sum(bpbs) / 2)
    assert (b["val_bpb_min"], b["val_bpb_max"]) == (min(bpbs), max(bpbs))
    assert b["val_bpb_std"] > 0 and b["steps"] == 20 and b["tokens_per_s"] > 0
    assert 0 < b["mfu"] < 1 and b["peak_rss_mib"] > 50 and b["wall_s"] > 0
    assert float(rows[1]["val_bpb_mean"]) == pytest.approx(b["val_bpb_mean"], rel=1e-5)


def test_a_half_finished_plan_skips_what_is_done_and_resumes_the_rest_exactly(micro, tmp_path,
                                                                               corpus):
    """As if stopped during run b, seed 1, after its step-10 checkpoint: run a is
    skipped, b seed 1 resumes from step 10, b seed 2 starts; every figure is the
    uninterrupted plan's, bit for bit (CPU, fp32)."""
    plan, reference, _ = micro
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "b" / "seed-1" / "step-0000020")
    shutil.rmtree(out / "b" / "seed-2")
    (out / "results.json").unlink()
    result = run_plan(plan, out, corpus)
    assert result.exit_code == 0, result.output
    assert "[1/4] a seed 1: done at step 20" in result.output
    assert "[3/4] b seed 1: resuming from step 10" in result.output
    assert "[4/4] b seed 2: starting" in result.output
    assert seed_figures(out) == seed_figures(reference)
    again = run_plan(plan, out, corpus, "--json")
    assert json.loads(again.stdout)["skipped"] == 4


def test_a_folder_trained_with_other_settings_is_refused_before_any_run(micro, tmp_path,
                                                                          corpus):
    plan, reference, _ = micro
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    changed = tmp_path / "plan.toml"
    changed.write_text(plan.read_text().replace("3e-3", "4e-3"))
    result = run_plan(changed, out, corpus)
    assert result.exit_code == 1
    assert f"error: {out / 'b' / 'seed-1'} holds a run made with other settings" in result.output
    assert "Traceback" not in result.output


def test_the_dry_run_lists_what_is_done_and_what_is_left(micro, tmp_path):
    plan, reference, _ = micro
    result = fragment("experiment", str(plan), "--out", str(reference), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert {t["status"] for t in json.loads(result.stdout)["trainings"]} == {"done"}


@pytest.mark.parametrize("seeds, heading", [("[1, 2]", "2 runs x 2 seeds"),
                                            ("[1]", "2 runs x 1 seed,")])
def test_the_dry_run_heading_counts_runs_and_seeds_in_words(tmp_path, seeds, heading):
    plan = tmp_path / "counted.toml"
    plan.write_text(PLAN.replace("seeds = [1, 2]", f"seeds = {seeds}"))
    result = fragment("experiment", str(plan), "--out", str(tmp_path / "out"), "--dry-run")
    assert result.exit_code == 0, result.output
    assert heading in " ".join(result.output.split())


# ---------------------------------------------------------------------------- report


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_report_draws_every_run_in_one_png(micro, tmp_path):
    pytest.importorskip("matplotlib")
    _, out, _ = micro
    picture = tmp_path / "curves.png"
    result = fragment("report", str(out), str(out / "a" / "seed-1"), "--out", str(picture))
    assert result.exit_code == 0, result.output
    assert png_size(picture) == (1200, 800)
    assert f"curves: {picture}" in result.output


def test_the_report_ranks_runs_and_says_the_gap_to_the_best(micro):
    _, out, summary = micro
    result = fragment("report", str(out), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["runs"]
    by_result = sorted(summary["runs"], key=lambda r: r["val_bpb_mean"])
    assert [r["name"] for r in rows] == [r["name"] for r in by_result]
    best, other = rows
    assert best["final_bpb"] == pytest.approx(by_result[0]["val_bpb_mean"])
    assert best["gap"] is None and other["gap"] == pytest.approx(
        other["final_bpb"] - best["final_bpb"])
    assert best["seeds"] == 2 and best["steps"] == 20
    text = fragment("report", str(out)).output
    assert f"best: {best['name']}" in text and "(best)" in text


def test_the_report_reads_a_single_run_folder_without_matplotlib(micro, monkeypatch, tmp_path):
    _, out, _ = micro
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    single = out / "a" / "seed-1"
    assert fragment("report", str(single)).exit_code == 0
    result = fragment("report", str(single), "--out", str(tmp_path / "x.png"))
    assert result.exit_code == 1 and not (tmp_path / "x.png").exists()
    assert "needs matplotlib" in result.output and "fragment-llm[plot]" in result.output
    assert "Traceback" not in result.output


def test_the_report_refuses_a_folder_without_runs(tmp_path):
    result = fragment("report", str(tmp_path))
    assert result.exit_code == 1 and "no metrics.jsonl in" in result.output


def curve(*points: tuple[float, float]) -> Curves:
    return Curves(Path("run"), (), tuple(Point(i, s, v) for i, (s, v) in enumerate(points)))


def test_minutes_to_reach_interpolates_between_evaluations():
    run = curve((0, 3.0), (60, 2.0), (120, 1.5))
    assert minutes_to_reach(run, 2.5) == pytest.approx(0.5)
    assert minutes_to_reach(run, 1.75) == pytest.approx(1.5)
    assert minutes_to_reach(run, 3.5) == 0.0
    assert minutes_to_reach(run, 1.0) is None  # never within its budget


# ------------------------------------------------------------------- hostile folders


def test_a_symlinked_run_folder_in_the_output_is_refused_before_any_run(tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    (tmp_path / "data").mkdir()
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "b").symlink_to(tmp_path / "elsewhere")
    result = fragment("experiment", str(plan), "--out", str(tmp_path / "out"), "--data",
                      str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tokenizer.json"))
    assert result.exit_code == 1, result.output
    assert f"error: {tmp_path / 'out' / 'b'} is not a folder (a symlink or a file)" in result.output
    assert not (tmp_path / "out" / "a").exists()  # refused before the first run
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_the_report_follows_no_symlinked_run_folder(micro, tmp_path):
    _, out, _ = micro
    (tmp_path / "link").symlink_to(out / "a" / "seed-1")
    result = fragment("report", str(tmp_path / "link"))
    assert result.exit_code == 1 and "not a run or experiment folder" in result.output
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "a").symlink_to(out / "a")  # a run inside: skipped, not followed
    result = fragment("report", str(tmp_path / "experiment"))
    assert result.exit_code == 1 and "no metrics.jsonl in" in result.output


def test_hostile_metrics_lines_are_skipped(tmp_path):
    from fragment_llm.experiment.metrics import read_curves

    lines = ['{"step": 1, "train_loss": 5.0, "elapsed_s": 1.0}',
             '{"step": 2, "train_loss": NaN, "elapsed_s": 2.0}',  # not JSON: skipped
             '[1, 2, 3]', '"text"', '{"step": "3", "train_loss": 4.0}', '{"step": true}',
             '{"step": 4, "train_loss": 1e999}',  # inf: no point
             '{"step": 5, "val_bpb": 2.5' + " " * 70_000 + "}",  # over the line cap
             '{"step": 6, "val_bpb": 2.0}',  # an old eval line: the last step's time
             '{"step": 7, "train_loss": 3.0, "elapsed_s": 7.0, "val_bpb": 1.5}',
             '{"step": 8, "train_lo']  # torn by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    curves = read_curves(tmp_path)
    assert [(p.step, p.value) for p in curves.train_loss] == [(1, 5.0), (7, 3.0)]
    assert [(p.step, p.elapsed_s, p.value) for p in curves.val_bpb] == [(6, 1.0, 2.0),
                                                                       (7, 7.0, 1.5)]


@pytest.mark.slow
def test_sigterm_stops_the_run_in_progress_at_a_checkpoint_and_the_plan_with_143(
        corpus, child_env, tmp_path):
    """SIGTERM to `fragment experiment` reaches its `fragment train` once (own process
    group): the run saves a checkpoint short of its budget, the results are written
    with it as partial, and the plan exits 143 with one line."""
    import signal
    import subprocess
    import time

    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.replace("max_steps = 20", "max_steps = 100000"))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fragment_llm", "-q", "experiment", str(plan),
                             "--out", str(out), "--data", str(corpus.processed),
                             "--tokenizer", str(corpus.tokenizer)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "a" / "seed-1" / "step-0000010").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("terminated: the run in progress saved")
    [seed] = json.loads((out / "results.json").read_text())["runs"][0]["seeds"][:1]
    assert seed["status"] == "partial" and 10 <= seed["steps"] < 100000


def test_a_failing_run_is_recorded_and_the_plan_exits_1(corpus, child_env, tmp_path):
    """A run `fragment train` refuses (here: its memory plan over a 1 MiB cap) is marked
    failed in the results; with no checkpoint, a corrected plan may start it afresh."""
    from fragment_llm.experiment.plan import Plan
    from fragment_llm.experiment.runner import _check_folder

    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN.replace("seeds = [1, 2]", "seeds = [1]")
                    .replace('name = "b"\n', 'name = "b"\ntrain.max_memory = 1048576\n')
                    .replace('[[runs]]\nname = "a"\n', ""))
    result = run_plan(plan, tmp_path / "out", corpus)
    assert result.exit_code == 1, result.output
    assert "[1/1] b seed 1: failed (exit 1); the plan goes on" in result.output
    assert "error: 1 training run(s) of" in result.output
    assert seed_figures(tmp_path / "out")[("b", 1)] == ("failed", None, None)
    plan.write_text(plan.read_text().replace("train.max_memory = 1048576\n", ""))
    _check_folder(Plan.load(plan).trainings()[0], tmp_path / "out")  # not refused


@pytest.mark.parametrize("content", [
    '{"attempts": [{"exit_code": 0, "wall_s": "long", "peak_rss_bytes": null, '
    '"peak_gflops": null}]}',
    '{"attempts": [{"exit_code": true, "wall_s": 1.0, "peak_rss_bytes": null, '
    '"peak_gflops": null, "extra": 1}]}',
    '{"attempts": 3}', '[1]', '{"attempts": [' * 50 + ']' * 50 + '}', "\\xff"])
def test_a_hostile_experiment_record_is_ignored(tmp_path, content):
    """experiment.json holds measurements only: a broken one is read as no attempts."""
    from fragment_llm.experiment.results import ATTEMPTS_FILE, read_attempts

    (tmp_path / ATTEMPTS_FILE).write_text(content)
    assert read_attempts(tmp_path) == []
    (tmp_path / ATTEMPTS_FILE).write_text('{"attempts": [{"exit_code": 0, "wall_s": 2, '
                                          '"peak_rss_bytes": 1024, "peak_gflops": 30.5}]}')
    assert read_attempts(tmp_path)[0].wall_s == 2


def test_the_report_of_a_plan_file_reads_its_default_folder(micro, tmp_path, monkeypatch):
    plan, out, _ = micro
    shutil.copytree(out, tmp_path / "experiments" / "micro")
    shutil.copy(plan, tmp_path / "micro.toml")
    monkeypatch.chdir(tmp_path)
    by_plan = fragment("report", "micro.toml", "--json")
    assert by_plan.exit_code == 0, by_plan.output
    assert json.loads(by_plan.stdout) == json.loads(
        fragment("report", str(out), "--json").stdout)
