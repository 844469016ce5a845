"""train: the loop, exact resume after Ctrl-C and SIGKILL, DDP, locks, NaN, memory plan."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fragment_llm.cli.app import cli
from fragment_llm.cli.common import FLAGS
from fragment_llm.config import (
    MODEL_PRESETS,
    TRAIN_PRESETS,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
)
from fragment_llm.data.batches import eval_batches
from fragment_llm.data.shards import TokenShards
from fragment_llm.errors import CheckpointError, ConfigError, OutputError, TrainingError
from fragment_llm.events import (
    CheckpointEvent,
    EvalEvent,
    NoteEvent,
    PlanEvent,
    ProbeEvent,
    ProgressEvent,
    StepEvent,
    TrainEvent,
)
from fragment_llm.model.gpt import GPT
from fragment_llm.model.size import CPU_RUNTIME, plan_memory
from fragment_llm.tokenizer.tokenizer import Tokenizer
from fragment_llm.train.run import MetricsLog, TrainRequest, run_training
from fragment_llm.train.runtime import RunLock
from fragment_llm.train.schedule import lr_at
from tests.helpers import (
    FAST,
    MODEL,
    Corpus,
    assert_same_weights,
    cli_model_config,
    cli_train_config,
    final_weights,
)


def request(corpus: Corpus, out: Path, **train) -> TrainRequest:
    processed, tokenizer = corpus.processed, corpus.tokenizer
    return TrainRequest(data=processed, tokenizer=tokenizer, out=out,
                        model=cli_model_config(**MODEL),
                        train=cli_train_config(**{**FAST, **train}),
                        tokens_dir=out.parent / "tokens")


def test_lr_schedule_warms_up_then_decays():
    config = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, config, 0.0) == pytest.approx(0.1)
    assert lr_at(9, config, 0.09) == pytest.approx(1.0)
    assert lr_at(100, config, 1.0) == pytest.approx(0.1)
    values = [lr_at(s, config, s / 100) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)


def test_lr_cosine_starts_where_a_time_bound_warmup_ended():
    # A time-bound run: 10 warmup steps took 60% of the time budget. The cosine must
    # start from the peak there, not be more than half decayed already.
    config = TrainConfig(lr=1.0, warmup_steps=10, max_steps=3000, min_lr_ratio=0.1)
    assert lr_at(10, config, 0.6, warmup_end=0.6) == pytest.approx(1.0)
    assert lr_at(10, config, 0.6) < 0.6
    assert lr_at(20, config, 0.8, warmup_end=0.6) == pytest.approx(0.55)
    assert lr_at(30, config, 1.0, warmup_end=0.6) == pytest.approx(0.1)


_REFAULTS = """
import resource, sys, torch
import fragment_llm.train.run  # noqa: F401 - what `fragment train` has loaded when it calls it
from fragment_llm.train.runtime import keep_freed_memory
if sys.argv[1] == "kept":
    keep_freed_memory()
size = 64 * 2**20 // 4  # a logits-sized 64 MiB block, allocated and freed as in a step
for _ in range(2):  # glibc settles after the first rounds; a run makes hundreds of steps
    torch.ones(size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.ones(size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_large_blocks_faulting_back_in_every_step():
    def refaults(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _REFAULTS, mode], capture_output=True,
                              text=True, check=True, timeout=120)
        return int(done.stdout.split()[-1])

    default = refaults("default")  # 8 x 16,384 pages here: every round faults afresh
    if default < 8 * 4096:  # far fewer means huge pages back fresh mappings
        pytest.skip(f"only {default} page faults for 8 x 64 MiB by default on this kernel")
    assert refaults("kept") < default // 2  # measured: 0 in most runs, one round at worst


def test_loss_falls_and_metrics_are_logged(corpus, tmp_path):
    summary = run_training(request(corpus, tmp_path / "run", max_steps=30), lambda e: None)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "train_loss" in x]
    assert {"step", "train_loss", "lr", "tokens_per_s"} <= steps[0].keys()
    assert steps[-1]["train_loss"] < steps[0]["train_loss"] - 0.5
    assert any("val_bpb" in x for x in lines)
    assert summary.steps == 30 and summary.val_bpb is not None
    assert summary.checkpoint == tmp_path / "run" / "step-0000030"
    # a plain-text corpus trains a transcript model: chat must not use special tokens
    config = json.loads((summary.checkpoint / "config.json").read_text())
    assert config["chat_format"] == "transcript"


def test_a_run_ends_on_an_evaluation_of_the_whole_held_out_split(corpus, tmp_path):
    out = tmp_path / "run"
    summary = run_training(request(corpus, out, max_steps=6, eval_every=3,
                                   final_eval_blocks=2000), lambda e: None)
    shards = TokenShards.open(next((tmp_path / "tokens").iterdir()))
    model = GPT(ModelConfig(**MODEL, vocab_size=shards.manifest.vocab_size))
    model.load_state_dict(final_weights(out))
    model.eval()
    with torch.no_grad():  # every validation block, independently of the trainer
        losses = [torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(),
                                                    reduction="sum")
                  for x, y in eval_batches(shards.val, 32, 16, 10**6)]
    blocks = shards.val.num_blocks(32)
    assert 4 < blocks <= 2000  # more than the periodic 4
    assert summary.val_loss == pytest.approx(float(sum(losses)) / (blocks * 32), rel=1e-5)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last_two = [x["val_loss"] for x in lines[-2:]]  # step 6: the periodic eval, then this
    assert last_two[1] == summary.val_loss != last_two[0]


STEP_KEYS = {"step", "train_loss", "lr", "grad_norm", "skipped", "tokens_per_s", "elapsed_s",
             "progress"}


def test_a_run_sends_its_events_in_order_and_logs_them_as_metrics(corpus, tmp_path):
    """A step's metrics.jsonl line is its `StepEvent` (with the figures of an evaluation
    made at that step), and an evaluation logged alone is its `EvalEvent` with the
    training time it came at."""
    events: list[TrainEvent] = []
    out = tmp_path / "run"
    run_training(request(corpus, out, max_steps=6, eval_every=3, checkpoint_every=4,
                         log_every=2), events.append)
    assert isinstance(events[0], ProgressEvent)
    shown = [(type(e).__name__, getattr(e, "step", None)) for e in events
             if not isinstance(e, ProgressEvent)]
    assert shown == [("PlanEvent", 0), ("StepEvent", 1), ("StepEvent", 2), ("EvalEvent", 3),
                     ("StepEvent", 3), ("StepEvent", 4), ("CheckpointEvent", 4),
                     ("StepEvent", 5), ("EvalEvent", 6), ("StepEvent", 6),
                     ("EvalEvent", 6), ("CheckpointEvent", 6)]  # the final evaluation
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], set(x)) for x in lines] == [
        (1, STEP_KEYS), (2, STEP_KEYS), (3, STEP_KEYS | {"val_loss", "val_bpb"}),
        (4, STEP_KEYS), (6, STEP_KEYS | {"val_loss", "val_bpb"}),
        (6, {"step", "val_loss", "val_bpb", "elapsed_s"})]
    steps = {e.step: e for e in events if isinstance(e, StepEvent)}
    evals = [e for e in events if isinstance(e, EvalEvent)]
    assert lines[1] == dataclasses.asdict(steps[2])
    assert lines[2] == {**dataclasses.asdict(steps[3]), "val_loss": evals[0].val_loss,
                        "val_bpb": evals[0].val_bpb}
    assert lines[-1] == {**dataclasses.asdict(evals[-1]), "elapsed_s": steps[6].elapsed_s}
    checkpoint = events[-1]
    assert isinstance(checkpoint, CheckpointEvent) and checkpoint.path == out / "step-0000006"


def test_metrics_file_planted_as_a_symlink_is_never_written_through(corpus, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to(victim)
    run_training(request(corpus, out, max_steps=2), lambda e: None)
    assert victim.read_text() == "precious\n"  # the link was replaced, never followed
    assert not (out / "metrics.jsonl").is_symlink()
    assert "train_loss" in (out / "metrics.jsonl").read_text()


def test_metrics_append_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(OutputError, match="metrics.jsonl"):
        MetricsLog(tmp_path / "metrics.jsonl", enabled=True).write({"step": 1})
    assert victim.read_text() == "precious\n"


def test_ctrl_c_then_resume_equals_uninterrupted(corpus, tmp_path):
    run_training(request(corpus, tmp_path / "full"), lambda e: None)

    def interrupt_at_step_5(event):
        if isinstance(event, StepEvent) and event.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    summary = run_training(request(corpus, tmp_path / "cut"), interrupt_at_step_5)
    assert summary.interrupted and summary.steps == 5
    assert (tmp_path / "cut" / "step-0000005").is_dir()
    resumed = run_training(_resume(request(corpus, tmp_path / "cut")), lambda e: None)
    assert resumed.steps == 12
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "cut"))


def _resume(req: TrainRequest) -> TrainRequest:
    return TrainRequest(**{**req.__dict__, "resume": True})


def test_sigkill_then_resume_equals_uninterrupted(corpus, tmp_path):
    run_training(request(corpus, tmp_path / "full", max_steps=40), lambda e: None)
    processed, tokenizer = corpus.processed, corpus.tokenizer
    config = tmp_path / "c.toml"
    config.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in MODEL.items())
                      + "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                              for k, v in {**FAST, "max_steps": 40}.items()))
    cmd = [sys.executable, "-m", "fragment_llm", "--quiet", "train", "--data", str(processed),
           "--tokenizer", str(tokenizer), "--out", str(tmp_path / "killed"),
           "--config", str(config)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "step-0000008").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.kill()  # SIGKILL, somewhere between checkpoints
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    run_training(_resume(request(corpus, tmp_path / "killed", max_steps=40)), lambda e: None)
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "killed"))


def test_second_trainer_on_the_same_folder_is_refused(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    with RunLock(tmp_path):
        with pytest.raises(OutputError, match="another trainer"):
            with RunLock(tmp_path):
                pass


def test_non_finite_loss_stops_without_a_checkpoint(corpus, tmp_path, monkeypatch):
    import fragment_llm.train.trainer as train_module

    monkeypatch.setattr(train_module, "lm_loss",
                        lambda logits, targets: logits.sum() * float("nan"))
    with pytest.raises(TrainingError, match="not finite for 3 steps"):
        run_training(request(corpus, tmp_path / "nan", checkpoint_every=0), lambda e: None)
    assert not list((tmp_path / "nan").glob("step-*"))


def test_memory_plan_refuses_when_over_the_limit(corpus, tmp_path):
    with pytest.raises(ConfigError, match="exceeds the limit") as info:
        run_training(request(corpus, tmp_path / "mem", max_memory=1 << 20), lambda e: None)
    assert "--activation-checkpointing" in info.value.hint
    assert not (tmp_path / "mem").exists()


def test_memory_plan_counts_the_process_on_a_cpu_and_covers_the_measured_peak():
    model = ModelConfig(**MODEL_PRESETS["small"], vocab_size=16384)
    train = cli_train_config()
    cpu, gpu = plan_memory(model, train, "fp32", "cpu"), plan_memory(model, train, "bf16", "cuda")
    assert cpu.runtime == CPU_RUNTIME + cpu.logits // 2 and gpu.runtime == 0
    assert plan_memory(model, train, "fp32", "mps").runtime == cpu.runtime  # unified memory
    assert cpu.total == (cpu.weights + cpu.gradients + cpu.optimizer + cpu.activations
                         + cpu.logits + cpu.runtime)
    assert cpu.total >= 1500 << 20  # the 10-minute run's peak RSS (docs/training.md)
    recompute = plan_memory(model, train.model_copy(update={"activation_checkpointing": True}),
                            "fp32", "cpu")
    assert recompute.activations < cpu.activations / 2


def test_dry_run_reports_a_plan_and_writes_nothing(corpus, tmp_path):
    events = []
    run_training(request(corpus, tmp_path / "dry"), events.append, dry_run=True)
    kinds = {type(e) for e in events}
    assert {PlanEvent, ProbeEvent} <= kinds
    plan = next(e for e in events if isinstance(e, PlanEvent))
    assert plan.parameters > 0 and plan.tokens_per_step == 4 * 32
    assert not (tmp_path / "dry").exists()


def test_resume_with_a_different_tokenizer_is_refused(corpus, tmp_path):
    run_training(request(corpus, tmp_path / "run", max_steps=4), lambda e: None)
    processed = corpus.processed
    from fragment_llm.data.processed import ProcessedCorpus

    other = Tokenizer.train(ProcessedCorpus.open(processed).iter_texts(),
                            TokenizerConfig(vocab_size=300, workers=1))
    other.save(tmp_path / "other.json")
    req = _resume(request(corpus, tmp_path / "run", max_steps=8))
    req = TrainRequest(**{**req.__dict__, "tokenizer": tmp_path / "other.json"})
    with pytest.raises(ConfigError, match="vocab size"):
        run_training(req, lambda e: None)


def test_cli_train_and_eval_json(corpus, tmp_path):
    FLAGS.debug = FLAGS.quiet = False
    processed, tokenizer = corpus.processed, corpus.tokenizer
    config = tmp_path / "c.toml"
    config.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in MODEL.items()))
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--data", str(processed), "--tokenizer",
                                 str(tokenizer), "--out", str(tmp_path / "run"), "--config",
                                 str(config), "--max-steps", "6", "--batch-size", "4",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "Training done" in result.stderr and "val bits/byte" in result.stderr
    result = runner.invoke(cli, ["eval", "--checkpoint", str(tmp_path / "run"), "--data",
                                 str(processed), "--json", "--max-blocks", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report.keys() == {"loss", "bpb", "tokens", "split", "data"}
    assert report["tokens"] == 8 * 32 and report["split"] == "all"


@pytest.mark.parametrize("args,rule", [
    (["--max-time", "soon"], "not a duration"),
    (["--lr", "-1"], "lr"),
    (["--precision", "fp8"], "fp8"),
])
def test_cli_refuses_bad_flags(args, rule):
    result = CliRunner().invoke(cli, ["train", *args])
    assert result.exit_code == 2 and rule in result.output


def test_cli_refuses_inconsistent_config(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[model]\nn_embd = 100\nn_head = 3\n")
    result = CliRunner().invoke(cli, ["train", "--config", str(config)])
    assert result.exit_code == 1
    assert "n_embd (100) must be divisible by n_head (3)" in result.stderr


def test_ddp_two_processes_match_one_process_with_double_batch(corpus, tmp_path):
    processed, tokenizer = corpus.processed, corpus.tokenizer
    run_training(request(corpus, tmp_path / "single", batch_size=8, max_steps=4,
                         checkpoint_every=0), lambda e: None)
    config = tmp_path / "c.toml"
    train = {**FAST, "batch_size": 4, "max_steps": 4, "checkpoint_every": 0}
    config.write_text("[model]\n" + "".join(f"{k} = {v}\n" for k, v in MODEL.items())
                      + "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in train.items()))
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "fragment_llm", "--quiet",
         "train", "--data", str(processed), "--tokenizer", str(tokenizer), "--out",
         str(tmp_path / "ddp"), "--config", str(config)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    for name in single:
        assert torch.allclose(single[name], ddp[name], atol=1e-5), name


# ------------------------------------------- resume keeps the run's settings (issue 15)


def cli_args(corpus, out: Path, *extra: str) -> list[str]:
    processed, tokenizer = corpus.processed, corpus.tokenizer
    return ["train", "--data", str(processed), "--tokenizer", str(tokenizer), "--out",
            str(out), *extra]


def interrupt_when(monkeypatch, stop) -> None:
    """Ctrl-C as the display shows a step for which `stop(event)` holds."""
    from fragment_llm.cli.display import TrainDisplay

    real = TrainDisplay._on_step

    def on_step(self, event):
        real(self, event)
        if stop(event):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TrainDisplay, "_on_step", on_step)


def runs_past(last: int):
    """A guard for a resumed run: Ctrl-C past its plan, so a resume that lost the run's
    settings (3,000 steps of the default preset) fails in seconds, not minutes."""
    return lambda event: event.step == last + 1


@pytest.fixture(scope="module")
def tiny_flags(tmp_path_factory) -> list[str]:
    """The tiny preset, 6 steps of 4 sequences, and (from a config file) a small final
    evaluation to keep the tests quick."""
    config = tmp_path_factory.mktemp("tiny-config") / "evals.toml"
    config.write_text("[train]\nfinal_eval_blocks = 8\n")
    return ["--preset", "tiny", "--max-steps", "6", "--batch-size", "4", "--device", "cpu",
            "--config", str(config)]


@pytest.fixture(scope="module")
def tiny_cut(corpus, tiny_flags, tmp_path_factory) -> Path:
    """`fragment train --preset tiny --max-steps 6 ...`, Ctrl-C at step 2."""
    out = tmp_path_factory.mktemp("tiny") / "cut"
    FLAGS.debug = FLAGS.quiet = False
    with pytest.MonkeyPatch.context() as patch:
        interrupt_when(patch, lambda event: event.step == 2)
        result = CliRunner().invoke(cli, cli_args(corpus, out, *tiny_flags))
    assert result.exit_code == 130, result.output
    assert [p.name for p in out.glob("step-*")] == ["step-0000002"]
    return out


def summary_rows(stderr: str) -> dict[str, str]:
    """The rows of the summary table: `│ key │ value │` lines."""
    rows = {}
    for line in stderr.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("│").split("│")]
        if len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def recorded_config(run: Path, step: int) -> dict:
    return json.loads((run / f"step-{step:07d}" / "config.json").read_text())


def test_plain_resume_continues_the_tiny_run_with_its_own_settings(corpus, tiny_flags,
                                                                   tiny_cut, runner,
                                                                   monkeypatch, tmp_path):
    # The scenario: a tiny run stopped at step 2, then a plain `--resume`. It must
    # not fall back to the default preset (batch 8, 3,000 steps, another lr curve).
    run = copy_run(tiny_cut, tmp_path)
    interrupt_when(monkeypatch, runs_past(6))
    result = runner.invoke(cli, cli_args(corpus, run, "--resume"))
    assert result.exit_code == 0, result.output
    rows = summary_rows(result.stderr)
    assert rows["tokens per step"] == "512" and rows["steps"] == "6"  # 4 x 128, as begun
    started, ended = recorded_config(run, 2), recorded_config(run, 6)
    assert ended["train"] == started["train"] and ended["model"] == started["model"]
    assert started["train"]["lr"] == TRAIN_PRESETS["tiny"]["lr"]
    assert started["train"]["final_eval_blocks"] == 8 and ended["resume_changes"] == []
    monkeypatch.undo()
    whole = tmp_path / "whole"
    assert runner.invoke(cli, cli_args(corpus, whole, *tiny_flags)).exit_code == 0
    assert_same_weights(final_weights(whole), final_weights(run))  # the same run, exactly


def test_plain_resume_keeps_the_time_budget(corpus, tiny_flags, runner, monkeypatch,
                                            tmp_path):
    run = tmp_path / "run"
    budget = [*tiny_flags, "--max-steps", "10000", "--max-time", "2s"]
    interrupt_when(monkeypatch, lambda event: event.step == 1)
    assert runner.invoke(cli, cli_args(corpus, run, *budget)).exit_code == 130
    seen = []  # the resumed run's steps, on the wall clock: Ctrl-C after a minute

    def after_a_minute(event) -> bool:
        seen.append(time.monotonic())
        return seen[-1] - seen[0] > 60

    interrupt_when(monkeypatch, after_a_minute)
    result = runner.invoke(cli, cli_args(corpus, run, "--resume"))
    assert result.exit_code == 0, result.output
    last = sorted(run.glob("step-*"))[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    assert state["elapsed_s"] >= 2.0 and state["step"] < 10000
    assert json.loads((last / "config.json").read_text())["train"]["max_time_s"] == 2.0


def _config_file(tmp_path: Path) -> str:
    path = tmp_path / "seed.toml"
    path.write_text("[train]\nseed = 7\n")
    return str(path)


@pytest.mark.parametrize("given, field, stored, source", [
    (["--batch-size", "8"], "train.batch_size", "4", "--batch-size gives 8"),
    (["--lr", "0.01"], "train.lr", "0.002", "--lr gives 0.01"),
    (["--max-steps", "5"], "train.max_steps", "6", "--max-steps gives 5"),
    (["--preset", "small"], "model.n_layer", "4", "--preset small gives 6"),
    (["--preset", "tiny"], "train.batch_size", "4", "--preset tiny gives 16"),
    (["--config", _config_file], "train.seed", "1337", "seed.toml gives 7"),
])
def test_resume_refuses_a_setting_that_disagrees_with_the_run(corpus, tiny_cut, runner,
                                                              monkeypatch, tmp_path, given,
                                                              field, stored, source):
    run = copy_run(tiny_cut, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    interrupt_when(monkeypatch, lambda event: True)  # a run that starts fails fast
    given = [arg(tmp_path) if callable(arg) else arg for arg in given]
    result = runner.invoke(cli, cli_args(corpus, run, "--resume", *given))
    assert result.exit_code == 1, result.output
    error, hint = result.stderr.splitlines()
    assert error.startswith(f"error: {field} is {stored} in the run being resumed (")
    assert "step-0000002" in error and error.endswith(source)
    assert hint.startswith("hint: ")
    assert sorted(p.name for p in run.iterdir()) == before


def test_resume_may_extend_the_budget_and_records_the_change(corpus, tiny_cut, runner,
                                                             monkeypatch, tmp_path):
    run = copy_run(tiny_cut, tmp_path)
    interrupt_when(monkeypatch, runs_past(8))
    result = runner.invoke(cli, cli_args(corpus, run, "--resume", "--max-steps", "8",
                                         "--checkpoint-every", "4", "--batch-size", "4"))
    assert result.exit_code == 0, result.output
    assert {p.name for p in run.glob("step-*")} >= {"step-0000004", "step-0000008"}
    started, ended = recorded_config(run, 2), recorded_config(run, 8)
    assert ended["train"] == {**started["train"], "max_steps": 8, "checkpoint_every": 4}
    changes = sorted(ended["resume_changes"], key=lambda change: change["field"])
    assert changes == [
        {"step": 2, "field": "checkpoint_every", "recorded": 100, "given": 4,
         "source": "--checkpoint-every"},
        {"step": 2, "field": "max_steps", "recorded": 6, "given": 8,
         "source": "--max-steps"}]


def interrupt_at(step: int):
    def on_event(event):
        if isinstance(event, StepEvent) and event.step == step:
            os.kill(os.getpid(), signal.SIGINT)
    return on_event


def test_extending_the_budget_during_warmup_equals_planning_it_from_the_start(corpus,
                                                                              tmp_path):
    quick = {"warmup_steps": 4, "final_eval_blocks": 4}
    run_training(request(corpus, tmp_path / "full", max_steps=16, **quick), lambda e: None)
    cut = request(corpus, tmp_path / "cut", max_steps=12, **quick)
    assert run_training(cut, interrupt_at(2)).steps == 2
    # What the table in docs/training.md lets change besides the budget: the same bits.
    free = {"eval_every": 5, "checkpoint_every": 3, "log_every": 2,
            "activation_checkpointing": True}
    resumed = run_training(_resume(request(corpus, tmp_path / "cut", max_steps=16, **quick,
                                           **free)), lambda e: None)
    assert resumed.steps == 16
    config = json.loads((resumed.checkpoint / "config.json").read_text())
    assert {change["field"] for change in config["resume_changes"]} == {"max_steps", *free}
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "cut"))


def test_extending_the_budget_after_warmup_keeps_the_lr_continuous(corpus, tmp_path):
    # The steps taken keep their learning rate; from the resume on, the rest of the cosine
    # is spread over the longer run: no jump back up, and the floor at the new end.
    out = tmp_path / "run"
    cosine = {"final_eval_blocks": 4, "schedule": "cosine"}  # small's own is wsd
    run_training(request(corpus, out, max_steps=12, **cosine), interrupt_at(6))
    run_training(_resume(request(corpus, out, max_steps=24, **cosine)), lambda e: None)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [x["lr"] for x in lines if "lr" in x and x["step"] > FAST["warmup_steps"]]
    assert len(lrs) == 24 - FAST["warmup_steps"]
    assert lrs == sorted(lrs, reverse=True)
    # lrs[i] is logged as step i + 3. Step 7, the first after the resume, has the lr the
    # 12-step run would have given it; from there the slope is gentler, and the floor
    # comes at step 24.
    planned = cli_train_config(**{**FAST, "max_steps": 12, "schedule": "cosine"})
    assert lrs[4] == pytest.approx(lr_at(6, planned, 6 / 12, warmup_end=2 / 12), rel=1e-12)
    assert 0 < lrs[4] - lrs[5] < lrs[3] - lrs[4]
    floor = FAST["lr"] * planned.min_lr_ratio
    assert lrs[-1] == pytest.approx(floor, rel=0.01)


@pytest.fixture(scope="module")
def short_run(corpus, tmp_path_factory) -> Path:
    """A finished 2-step run, with its token cache beside it."""
    root = tmp_path_factory.mktemp("short")
    run_training(request(corpus, root / "run", max_steps=2, final_eval_blocks=4),
                 lambda e: None)
    return root


def resealed_copy(short_run: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of `short_run` whose step folder's `name` was edited by `edit(doc)` and
    re-sealed, as a forger who rewrites the manifest too would. Returns the run folder."""
    from fragment_llm.checkpoint.layout import MANIFEST_FILE
    from fragment_llm.checkpoint.load import load_checkpoint
    from fragment_llm.checkpoint.save import build_manifest

    out = Path(shutil.copytree(short_run, tmp_path / "short")) / "run"
    folder = out / "step-0000002"
    provenance = load_checkpoint(folder).provenance.document()
    doc = json.loads((folder / name).read_text())
    edit(doc)
    (folder / name).write_text(json.dumps(doc))
    manifest = build_manifest(folder, 2, provenance)
    (folder / MANIFEST_FILE).write_text(manifest.to_json())
    return out


@pytest.mark.parametrize("change, rule", [
    (lambda doc: doc.pop("train"), "config.json records no \\[train\\] table"),
    (lambda doc: doc["train"].update(batch_size=0), "train.batch_size: Input should be"),
    (lambda doc: doc["train"].update(lr="fast"), "train.lr: Input should be a valid number"),
    (lambda doc: doc["train"].update(turbo=True), "train.turbo: Extra inputs"),
])
def test_resume_refuses_a_recorded_train_config_that_breaks_the_rules(corpus, short_run,
                                                                      tmp_path, change, rule):
    out = resealed_copy(short_run, tmp_path, "config.json", change)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(CheckpointError, match=rule) as info:
        run_training(_resume(request(corpus, out, max_steps=2)), lambda e: None)
    message = info.value.message
    assert str(out / "step-0000002" / "config.json") in message and "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("value", [5.0, -1.0, "half"])
def test_resume_refuses_a_cosine_position_outside_the_cosine(corpus, short_run, tmp_path,
                                                             value):
    out = resealed_copy(short_run, tmp_path, "trainer_state.json",
                        lambda doc: doc.update(cosine_start=value))
    with pytest.raises(TrainingError, match="trainer_state.json is incomplete"):
        run_training(_resume(request(corpus, out, max_steps=4)), lambda e: None)


@pytest.mark.parametrize("key, error, rule", [
    ("data", TrainingError, "trainer_state.json is incomplete \\('data'\\)"),
    ("step", TrainingError, "trainer_state.json is incomplete \\('step'\\)"),
    ("rng", CheckpointError, "RNG state breaks the schema .*trainer_state.json"),
])
def test_resume_refuses_a_trainer_state_without_a_required_key(corpus, short_run, tmp_path,
                                                               key, error, rule):
    """The step still loads (it is the one resumed from, not skipped for an older one),
    and resuming it is refused in one line naming the file."""
    out = resealed_copy(short_run, tmp_path, "trainer_state.json", lambda doc: doc.pop(key))
    with pytest.raises(error, match=rule) as info:
        run_training(_resume(request(corpus, out, max_steps=4)), lambda e: None)
    assert "\n" not in info.value.message


def test_a_real_checkpoints_json_files_round_trip_through_the_records(short_run):
    """config.json, trainer_state.json and the provenance as `fragment train` writes them:
    loaded as records and written back through `dump_json`, the same bytes."""
    from fragment_llm.checkpoint.load import load_checkpoint
    from fragment_llm.safety.files import dump_json

    folder = short_run / "run" / "step-0000002"
    loaded = load_checkpoint(folder)
    for name, record in (("config.json", loaded.config),
                         ("trainer_state.json", loaded.trainer_state)):
        assert dump_json(record.document()).encode() == (folder / name).read_bytes(), name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert loaded.provenance.document() == manifest["provenance"]
    assert loaded.provenance.tokenizer_sha256 == Tokenizer.load(folder / "tokenizer.json").sha256
    assert loaded.config.train is not None and loaded.config.train["max_steps"] == 2


# ------------------------------------- the bar and --dry-run show what ends the run


def test_run_budget_follows_the_bound_that_ends_the_run():
    from fragment_llm.cli.display import clock, run_budget

    steps = run_budget(3000, None, step=4, elapsed_s=4.0, seconds_per_step=1.0)
    assert (steps.bound, steps.steps, steps.eta_s) == ("steps", 3000, 2996.0)
    assert steps.describe(4) == "step 4/3,000"
    timed = run_budget(3000, 180.0, step=4, elapsed_s=4.0, seconds_per_step=1.0)
    assert (timed.bound, timed.steps, timed.eta_s) == ("time", 180, 176.0)
    assert timed.fraction == pytest.approx(4 / 180) and timed.describe(4) == "step 4/~180"
    nearer = run_budget(100, 180.0, step=4, elapsed_s=4.0, seconds_per_step=1.0)
    assert (nearer.bound, nearer.steps, nearer.eta_s) == ("steps", 100, 96.0)
    slowed = run_budget(200, 180.0, step=150, elapsed_s=150.0, seconds_per_step=1.5)
    assert (slowed.bound, slowed.steps, slowed.eta_s) == ("time", 170, 30.0)
    unknown = run_budget(3000, 180.0, step=0, elapsed_s=0.0, seconds_per_step=None)
    assert unknown.eta_s is None and clock(unknown.eta_s) == "-:--:--"
    assert clock(176.0) == "0:02:56"


def test_the_bar_of_a_time_bound_run_shows_the_time_budget():
    from fragment_llm.cli.display import TrainDisplay

    display = TrainDisplay(True, max_steps=3000)
    display(PlanEvent(parameters=1, non_embedding_parameters=1, flops_per_token=6,
                      memory_bytes=1, tokens_per_step=128, device="cpu", precision="fp32",
                      world_size=1, train_tokens=1, val_tokens=1, max_steps=3000,
                      max_time_s=180.0, step=0, elapsed_s=0.0))
    with display:
        display(StepEvent(step=4, train_loss=5.0, lr=1e-3, grad_norm=1.0, skipped=False,
                          tokens_per_s=1e3, elapsed_s=4.0, progress=4 / 180))
        task = display.bars.tasks[0]
    assert task.fields["status"].startswith("step 4/~180 (time limit 0:03:00)")
    assert task.fields["eta"] == "0:02:56" and task.percentage == pytest.approx(100 * 4 / 180)


def test_the_display_shows_each_kind_of_event(capsys):
    from fragment_llm.cli.display import TrainDisplay

    shown = (ProgressEvent("tokenizing", 0, 3), ProgressEvent("tokenizing", 2, 3),
             NoteEvent("resumed from run/step-0000004"), ProbeEvent(seconds_per_step=0.25),
             EvalEvent(step=4, val_loss=1.23456, val_bpb=0.5),
             CheckpointEvent(step=4, path=Path("run/step-0000004")))
    assert {type(event) for event in shown} | {PlanEvent, StepEvent} == set(
        typing.get_args(TrainEvent))
    display = TrainDisplay(True, max_steps=10)
    for event in shown:
        display(event)
    assert capsys.readouterr().err.splitlines() == [
        "tokenizing the corpus (3 documents)...", "resumed from run/step-0000004",
        "step 4: val loss 1.2346, val bits/byte 0.5000", "step 4: checkpoint run/step-0000004"]
    assert display.probe == 0.25 and display.plan == {}


def test_dry_run_prints_the_estimated_training_time(corpus, tiny_flags, tiny_cut, runner,
                                                    monkeypatch, tmp_path):
    import fragment_llm.train.run as train_module

    monkeypatch.setattr(train_module, "_probe", lambda trainer: 0.5)  # seconds per step

    def planned(*args: str) -> str:
        result = runner.invoke(cli, cli_args(corpus, *args, "--dry-run"))
        assert result.exit_code == 0, result.output
        return summary_rows(result.stderr)["estimated training time"]

    assert planned(tmp_path / "a", *tiny_flags, "--max-steps", "100") == "0:00:50 (100 steps)"
    assert planned(tmp_path / "b", *tiny_flags, "--max-steps", "100", "--max-time", "10s") == (
        "0:00:10 (~20 steps; --max-time ends it)")
    assert planned(copy_run(tiny_cut, tmp_path), "--resume", "--max-steps", "12") == (
        "0:00:05 (10 steps from step 2)")
    result = runner.invoke(cli, cli_args(corpus, tmp_path / "c", *tiny_flags, "--max-steps",
                                         "100", "--dry-run", "--json"))
    assert json.loads(result.stdout)["estimated_training_seconds"] == 50.0


def test_a_last_step_that_is_a_checkpoint_step_records_the_final_evaluation(corpus, tmp_path):
    """The final checkpoint is written after the run's final evaluation, so config.json
    (what chat's banner and `fragment eval` report beside) holds the figure the run ended
    on, even when the last step is also a periodic checkpoint step."""
    out = tmp_path / "run"
    summary = run_training(request(corpus, out, max_steps=6, checkpoint_every=6,
                                   eval_every=0, final_eval_blocks=2000), lambda e: None)
    config = json.loads((out / "step-0000006" / "config.json").read_text())
    assert summary.val_bpb is not None
    assert (config["val_loss"], config["val_bpb"]) == (summary.val_loss, summary.val_bpb)
