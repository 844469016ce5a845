"""train: the loop, exact resume after Ctrl-C and SIGKILL, DDP, locks, NaN, memory plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from fragment_llm.cli import FLAGS, cli
from fragment_llm.config import (
    DEFAULT_PRESET,
    MODEL_PRESETS,
    TRAIN_PRESETS,
    ModelConfig,
    PreprocessConfig,
    TokenizerConfig,
    TrainConfig,
    resolve,
)
from fragment_llm.data import TokenShards, eval_batches
from fragment_llm.errors import ConfigError, OutputError, TrainingError
from fragment_llm.memplan import CPU_RUNTIME, plan_memory
from fragment_llm.model import GPT
from fragment_llm.preprocess import run_preprocess
from fragment_llm.tokenizer import Tokenizer
from fragment_llm.train import MetricsLog, RunLock, TrainRequest, lr_at, run_training

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "raw"
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}
FAST = {"batch_size": 4, "max_steps": 12, "warmup_steps": 2, "lr": 3e-3, "eval_every": 6,
        "checkpoint_every": 4, "eval_blocks": 4, "log_every": 1, "device": "cpu",
        "precision": "fp32", "workers": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """Three plays, cut to 40 KB each, preprocessed, with a 320-token BPE trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    raw = root / "raw"
    raw.mkdir()
    for name in ("macbeth_gut.txt", "hamlet_gut.txt", "sonnets_gut.txt"):
        (raw / name).write_text((SHAKESPEARE / name).read_text()[:40_000])
    processed = root / "processed"
    run_preprocess([raw], processed, PreprocessConfig(workers=1))
    from fragment_llm.processed import ProcessedCorpus

    tokenizer = Tokenizer.train(ProcessedCorpus.open(processed).iter_texts(),
                                TokenizerConfig(vocab_size=320, workers=1))
    tokenizer.save(root / "tokenizer.json")
    return processed, root / "tokenizer.json"


def cli_train_config(**values) -> TrainConfig:
    """What `fragment train --config` makes of a [train] table holding `values`: the
    default preset's training values under them, so a run built here in process and one
    started through the CLI are the same run."""
    return resolve(TrainConfig, "train", {"train": values}, None, {},
                   base=TRAIN_PRESETS[DEFAULT_PRESET])


def request(corpus, out: Path, **train) -> TrainRequest:
    processed, tokenizer = corpus
    return TrainRequest(data=processed, tokenizer=tokenizer, out=out,
                        model=ModelConfig(**MODEL), train=cli_train_config(**{**FAST, **train}),
                        tokens_dir=out.parent / "tokens")


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    last = sorted(out.glob("step-*"))[-1]
    return load_file(last / "model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


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
from fragment_llm.train import keep_freed_memory
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
        if event.kind == "step" and event.step == 5:
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
    processed, tokenizer = corpus
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
    import fragment_llm.train as train_module

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
    kinds = {e.kind for e in events}
    assert {"plan", "probe"} <= kinds
    plan = next(e for e in events if e.kind == "plan").values
    assert plan["parameters"] > 0 and plan["tokens_per_step"] == 4 * 32
    assert not (tmp_path / "dry").exists()


def test_resume_with_a_different_tokenizer_is_refused(corpus, tmp_path):
    run_training(request(corpus, tmp_path / "run", max_steps=4), lambda e: None)
    processed, _ = corpus
    from fragment_llm.processed import ProcessedCorpus

    other = Tokenizer.train(ProcessedCorpus.open(processed).iter_texts(),
                            TokenizerConfig(vocab_size=300, workers=1))
    other.save(tmp_path / "other.json")
    req = _resume(request(corpus, tmp_path / "run", max_steps=8))
    req = TrainRequest(**{**req.__dict__, "tokenizer": tmp_path / "other.json"})
    with pytest.raises(ConfigError, match="vocab size"):
        run_training(req, lambda e: None)


def test_cli_train_and_eval_json(corpus, tmp_path):
    FLAGS.debug = FLAGS.quiet = False
    processed, tokenizer = corpus
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
    processed, tokenizer = corpus
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
