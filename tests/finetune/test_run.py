"""Fine-tuning runs: what each method writes, what trains, what the loss counts, exact
resume after Ctrl-C, torchrun, --dry-run, --epochs, and the refusals of
`fragment finetune` in one line."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import load_file

from fragment_llm.checkpoint.layout import MANIFEST_FILE
from fragment_llm.checkpoint.load import load_checkpoint, open_checkpoint
from fragment_llm.checkpoint.save import build_manifest
from fragment_llm.checkpoint.trained import checkpoint_model_config
from fragment_llm.cli.app import cli
from fragment_llm.config import (
    FINETUNE_TRAIN,
    FinetuneConfig,
    ModelConfig,
    TrainConfig,
    resolve,
)
from fragment_llm.data.batches import TokenStream
from fragment_llm.data.shards import TokenShards
from fragment_llm.errors import CheckpointError
from fragment_llm.events import StepEvent
from fragment_llm.finetune.artifact import check_adapter_tensors, load_adapter
from fragment_llm.finetune.run import FinetuneRequest, FineTuning, run_finetune
from fragment_llm.model.gpt import GPT
from tests.helpers import FAST

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADAPTER = {"rank": 4, "alpha": 8.0}
QUICK = {**FAST, "final_eval_blocks": 4}  # 12 steps of 4 blocks, saved every 4


def finetune_train(**values) -> TrainConfig:
    """What `fragment finetune --config` makes of a [train] table of `QUICK` + `values`."""
    return resolve(TrainConfig, "train", {"train": {**QUICK, **values}}, None, {},
                   base=dict(FINETUNE_TRAIN))


def request(base: Path | None, data: Path, out: Path, method: str = "lora", *,
            resume: bool = False, dropout: float = 0.0, **train) -> FinetuneRequest:
    tuning = FinetuneConfig(method=method, dropout=dropout, **ADAPTER)
    return FinetuneRequest(base=base, data=data, out=out, finetune=tuning,
                           train=finetune_train(**train), resume=resume)


def quiet(_event) -> None:
    pass


def last_step(out: Path) -> Path:
    return sorted(out.glob("step-*"))[-1]


def file_hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.iterdir())}


def base_config(base: Path) -> ModelConfig:
    return checkpoint_model_config(open_checkpoint(base))


def tokens_folder(out: Path) -> Path:
    (folder,) = (out / "tokens").iterdir()
    return folder


# ------------------------------------------------------------- what each method writes


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
def test_each_method_writes_its_step_folders(base_checkpoint, conversations_file, tmp_path,
                                             method):
    before = file_hashes(base_checkpoint)
    out = tmp_path / "run"
    summary = run_finetune(request(base_checkpoint, conversations_file, out, method,
                                   max_steps=4, checkpoint_every=2), quiet)
    assert summary.steps == 4 and not summary.interrupted and summary.val_loss is not None
    assert [p.name for p in sorted(out.glob("step-*"))] == ["step-0000002", "step-0000004"]
    base_sha = open_checkpoint(base_checkpoint).manifest_sha256
    for step in out.glob("step-*"):
        names = {p.name for p in step.iterdir()}
        loaded = load_checkpoint(step)  # verified as any step folder is
        assert loaded.config.chat_format == "special_tokens"
        assert loaded.provenance.document()["base_manifest_sha256"] == base_sha
        assert "optimizer.safetensors" in names
        if method == "full":
            assert {"model.safetensors", "config.json"} <= names
            assert not names & {"adapter.safetensors", "adapter_config.json"}
            continue
        assert {"adapter.safetensors", "adapter_config.json"} <= names
        assert "model.safetensors" not in names
        adapter = load_adapter(step)
        assert adapter.record.method == method and adapter.record.rank == 4
        assert adapter.record.base_manifest_sha256 == base_sha
        check_adapter_tensors(adapter, base_config(base_checkpoint))
    assert file_hashes(base_checkpoint) == before  # the base on disk is untouched


def capture_model(monkeypatch) -> list[GPT]:
    """The model a run trains, as `FineTuning.build_model` returns it."""
    built: list[GPT] = []
    real = FineTuning.build_model

    def recording(self, config, device):
        built.append(real(self, config, device))
        return built[-1]

    monkeypatch.setattr(FineTuning, "build_model", recording)
    return built


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_an_adapter_run_trains_the_adapter_alone(base_checkpoint, conversations_file, tmp_path,
                                                 monkeypatch, method):
    built = capture_model(monkeypatch)
    run_finetune(request(base_checkpoint, conversations_file, tmp_path / "run", method,
                         max_steps=4, checkpoint_every=0, weight_decay=0.1), quiet)
    (model,) = built
    base = load_file(base_checkpoint / "model.safetensors")
    state = model.state_dict()
    adapter_names = {n for n in state if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B",
                                                                  "magnitude")}
    assert adapter_names and state.keys() - adapter_names == base.keys()
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), name
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(trained) == adapter_names
    saved = load_file(last_step(tmp_path / "run") / "adapter.safetensors")
    assert saved.keys() == adapter_names
    assert any(bool(saved[n].abs().sum()) for n in adapter_names if n.endswith("lora_B"))


def test_full_fine_tuning_moves_the_base_weights(base_checkpoint, conversations_file, tmp_path):
    out = tmp_path / "run"
    run_finetune(request(base_checkpoint, conversations_file, out, "full", max_steps=2,
                         checkpoint_every=0), quiet)
    base = load_file(base_checkpoint / "model.safetensors")
    tuned = load_file(last_step(out) / "model.safetensors")
    assert tuned.keys() == base.keys()
    assert not any(torch.equal(tuned[name], base[name]) for name in base)


# ---------------------------------------------------------------- what the loss counts


def test_the_first_loss_counts_only_the_answers(base_checkpoint, conversations_file, tmp_path):
    """Step 1 of LoRA (B = 0: the base's outputs) has the base's cross-entropy over the
    targets whose mask is 1 (answers and their <|end|>), computed here from the raw
    shards; over every target it would be another number."""
    losses: list[float] = []

    def on_event(event):
        if isinstance(event, StepEvent):
            losses.append(event.train_loss)

    out = tmp_path / "run"
    run_finetune(request(base_checkpoint, conversations_file, out, max_steps=1,
                         checkpoint_every=0), on_event)
    shards = TokenShards.open(tokens_folder(out))
    block, batch = 64, QUICK["batch_size"]
    stream = TokenStream(shards.train, block, finetune_train().seed)
    starts = shards.train.block_starts(block)
    indices = [stream.block_index(k) for k in range(batch)]
    blocks = torch.stack([torch.from_numpy(shards.train.block(i, block, starts).astype("int64"))
                          for i in indices])
    masks = torch.stack([torch.from_numpy(shards.train.mask_block(i, block, starts).copy())
                         for i in indices]).bool()
    model = GPT(base_config(base_checkpoint))
    open_checkpoint(base_checkpoint).load_model_into(model)
    with torch.no_grad():
        logits = model(blocks[:, :-1])
    counted = masks[:, 1:]
    assert 0 < int(counted.sum()) < counted.numel()
    answers_only = F.cross_entropy(logits[counted], blocks[:, 1:][counted])
    everything = F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
    assert losses[0] == pytest.approx(float(answers_only), rel=1e-5)
    assert losses[0] != pytest.approx(float(everything), rel=1e-3)


# ---------------------------------------------------------------- Ctrl-C and --resume


def interrupt_at(step: int):
    def on_event(event):
        if isinstance(event, StepEvent) and event.step == step:
            os.kill(os.getpid(), signal.SIGINT)
    return on_event


def assert_same_tensors(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("method, weights, dropout", [
    ("lora", "adapter.safetensors", 0.1),  # dropout: the RNG state must resume too
    ("dora", "adapter.safetensors", 0.0),
    ("full", "model.safetensors", 0.0),
])
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(base_checkpoint, conversations_file,
                                                        tmp_path, method, weights, dropout):
    def run(out: Path, on_event, resume: bool = False):
        return run_finetune(request(base_checkpoint, conversations_file, out, method,
                                    resume=resume, dropout=dropout), on_event)

    run(tmp_path / "whole", quiet)
    cut = run(tmp_path / "cut", interrupt_at(5))
    assert cut.interrupted and cut.steps == 5
    assert (tmp_path / "cut" / "step-0000005").is_dir()
    resumed = run(tmp_path / "cut", quiet, resume=True)
    assert resumed.steps == 12
    whole, again = last_step(tmp_path / "whole"), last_step(tmp_path / "cut")
    assert whole.name == again.name == "step-0000012"
    assert_same_tensors(whole / weights, again / weights)
    assert_same_tensors(whole / "optimizer.safetensors", again / "optimizer.safetensors")
    base_sha = open_checkpoint(base_checkpoint).manifest_sha256
    assert load_checkpoint(again).provenance.document()["base_manifest_sha256"] == base_sha


def test_an_adapter_run_resumes_without_base_from_the_base_it_recorded(
        base_checkpoint, conversations_file, tmp_path):
    out = tmp_path / "run"
    run_finetune(request(base_checkpoint, conversations_file, out, max_steps=2,
                         checkpoint_every=0), quiet)
    summary = run_finetune(request(None, conversations_file, out, resume=True, max_steps=4),
                           quiet)
    assert summary.steps == 4
    base_sha = open_checkpoint(base_checkpoint).manifest_sha256
    assert load_adapter(out).record.base_manifest_sha256 == base_sha


# ------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "quick.toml"
    path.write_text("[finetune]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                             ADAPTER.items())
                    + "[train]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                            QUICK.items()))
    return path


def finetune_args(base: Path | None, data: Path, out: Path, config: Path, *extra: str
                  ) -> list[str]:
    given = ["--base", str(base)] if base is not None else []
    return ["finetune", *given, "--data", str(data), "--out", str(out), "--config",
            str(config), *extra]


def refusal(result) -> str:
    """The one error line of a refused command: exit 1, the error last but for its hint
    (progress lines may come before it), no traceback."""
    lines = result.stderr.splitlines()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.stderr
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert [line[:6] for line in lines[errors[0] + 1:]] in ([], ["hint: "]), lines
    return lines[errors[0]]


def test_the_cli_tunes_and_reports(runner, base_checkpoint, conversations_file, config_file,
                                   tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(cli, finetune_args(base_checkpoint, conversations_file, out,
                                              config_file, "--max-steps", "2", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 2 and report["checkpoint"] == str(out / "step-0000002")
    assert (out / "step-0000002" / "adapter.safetensors").is_file()


def test_dry_run_prints_a_plan_and_saves_nothing(runner, base_checkpoint, conversations_file,
                                                 config_file, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(cli, finetune_args(base_checkpoint, conversations_file, out,
                                              config_file, "--dry-run"))
    assert result.exit_code == 0, result.output
    assert "Training plan (dry run)" in result.stderr and "seconds per step" in result.stderr
    # Only the rendered conversations' cache (OUT/tokens), which the real run reuses: no
    # step, no metrics, no lock.
    assert sorted(p.name for p in out.iterdir()) == ["tokens"]


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_epochs_plan_the_steps_that_pass_over_the_training_blocks(
        base_checkpoint, conversations_file, tmp_path, grad_accum):
    out = tmp_path / "run"
    summary = run_finetune(request(base_checkpoint, conversations_file, out, epochs=1.0,
                                   grad_accum=grad_accum, checkpoint_every=0), quiet)
    blocks = TokenShards.open(tokens_folder(out)).train.num_blocks(64)
    expected = math.ceil(blocks / (QUICK["batch_size"] * grad_accum))
    assert blocks > QUICK["batch_size"] * grad_accum  # more than one step, so ceil matters
    assert summary.steps == expected
    recorded = json.loads((last_step(out) / "config.json").read_text())["train"]
    assert recorded["max_steps"] == expected


@pytest.fixture(scope="module")
def adapter_run(base_checkpoint, conversations_file, tmp_path_factory) -> Path:
    """A finished 2-step LoRA run. Read only."""
    out = tmp_path_factory.mktemp("adapter") / "run"
    run_finetune(request(base_checkpoint, conversations_file, out, max_steps=2,
                         checkpoint_every=0), quiet)
    return out


def test_refuses_a_missing_base(runner, conversations_file, config_file, tmp_path):
    missing = tmp_path / "nowhere"
    line = refusal(runner.invoke(cli, finetune_args(missing, conversations_file,
                                                    tmp_path / "run", config_file)))
    assert line == f"error: checkpoint not found: {missing}"
    assert not (tmp_path / "run").exists()


def test_refuses_no_base(runner, conversations_file, config_file, tmp_path):
    line = refusal(runner.invoke(cli, finetune_args(None, conversations_file,
                                                    tmp_path / "run", config_file)))
    assert line == "error: --base is required"


@pytest.mark.parametrize("which", ["run folder", "step folder"])
def test_refuses_an_adapter_as_the_base(runner, adapter_run, conversations_file, config_file,
                                        tmp_path, which):
    base = adapter_run if which == "run folder" else last_step(adapter_run)
    line = refusal(runner.invoke(cli, finetune_args(base, conversations_file,
                                                    tmp_path / "run", config_file)))
    assert line == f"error: --base {last_step(adapter_run)} is an adapter"


def test_refuses_data_without_a_valid_conversation(runner, base_checkpoint, config_file,
                                                   tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    line = refusal(runner.invoke(cli, finetune_args(base_checkpoint, data, tmp_path / "run",
                                                    config_file)))
    assert line.startswith(f"error: no usable conversation in {data} (1 files; refused: ")
    assert "no_assistant_turn 1" in line and "unknown_role 1" in line
    assert not list((tmp_path / "run").glob("step-*"))


def test_refuses_resume_without_checkpoints(runner, conversations_file, config_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    line = refusal(runner.invoke(cli, finetune_args(None, conversations_file, out,
                                                    config_file, "--resume")))
    assert line == f"error: no checkpoint in {out} to resume"


def test_refuses_a_base_whose_tokenizer_is_not_the_one_it_records(
        runner, base_checkpoint, other_tokenizer_base, conversations_file, config_file,
        tmp_path):
    """A base whose tokenizer.json was swapped for another (manifest re-sealed, so the
    folder itself verifies): its ids would mean other text."""
    base = Path(shutil.copytree(base_checkpoint, tmp_path / "base" / base_checkpoint.name))
    shutil.copy(other_tokenizer_base / "tokenizer.json", base / "tokenizer.json")
    provenance = load_checkpoint(base_checkpoint).provenance.document()
    (base / MANIFEST_FILE).write_text(build_manifest(base, 10, provenance).to_json())
    line = refusal(runner.invoke(cli, finetune_args(base, conversations_file,
                                                    tmp_path / "run", config_file)))
    assert line.startswith(f"error: {base / 'tokenizer.json'} has sha256 ")
    assert "records" in line


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_refuses_a_base_trained_with_another_tokenizer(
        runner, base_checkpoint, other_tokenizer_base, conversations_file, config_file,
        tmp_path, method):
    out = tmp_path / "run"
    run_finetune(request(base_checkpoint, conversations_file, out, method, max_steps=2,
                         checkpoint_every=0), quiet)
    line = refusal(runner.invoke(cli, finetune_args(other_tokenizer_base, conversations_file,
                                                    out, config_file, "--resume",
                                                    "--method", method)))
    assert "sha256" in line and str(last_step(out)) in line
    assert [p.name for p in out.glob("step-*")] == ["step-0000002"]


# ------------------------------------------------------------------------- torchrun


def test_finetune_under_torchrun_with_two_processes(base_checkpoint, conversations_file,
                                                    config_file, tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "fragment_llm", "--quiet",
         *finetune_args(base_checkpoint, conversations_file, out, config_file,
                        "--max-steps", "4")],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    step = last_step(out)
    assert step.name == "step-0000004"
    assert load_checkpoint(step).trainer_state.step == 4
    adapter = load_adapter(step)
    assert adapter.record.base_manifest_sha256 == open_checkpoint(base_checkpoint).manifest_sha256
    assert not (step / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_refuses_another_base_naming_both_hashes(base_checkpoint, other_base,
                                                        conversations_file, tmp_path, method):
    """The weights of a resumed run came from the base it started with; another --base
    (same shape, same tokenizer) is refused, not silently recorded or ignored."""
    out = tmp_path / "run"
    run_finetune(request(base_checkpoint, conversations_file, out, method, max_steps=2,
                         checkpoint_every=0), quiet)
    with pytest.raises(CheckpointError) as info:
        run_finetune(request(other_base, conversations_file, out, method, resume=True,
                             max_steps=4), quiet)
    started, other = (open_checkpoint(path).manifest_sha256
                      for path in (base_checkpoint, other_base))
    message = info.value.message
    assert started[:16] in message and other[:16] in message and "\n" not in message
    assert [p.name for p in out.glob("step-*")] == ["step-0000002"]


# ------------------------------------------------- a plain `--resume` takes the run's own


def interrupt_when_shown(monkeypatch, step: int) -> None:
    """Ctrl-C as the CLI's display shows step `step`."""
    from fragment_llm.cli.display import TrainDisplay

    real = TrainDisplay._on_step

    def on_step(self, event):
        real(self, event)
        if event.step == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(TrainDisplay, "_on_step", on_step)


@pytest.mark.parametrize("method", ["dora", "full"])
def test_a_plain_resume_continues_with_the_runs_adapter_and_split(
        runner, base_checkpoint, conversations_file, tmp_path, monkeypatch, method):
    """Started with a non-default --method, --rank, --alpha, --targets and --val-fraction;
    resumed with none of them (and no --base, for an adapter): the run goes on as it
    began, and ends where the uninterrupted run does."""
    chosen = ["--method", method, "--rank", "4", "--alpha", "8", "--targets", "qkv,mlp_fc",
              "--val-fraction", "0.2", "--max-steps", "6", "--checkpoint-every", "2",
              "--batch-size", "4", "--device", "cpu", "--quiet"]

    def invoke(out: Path, *args: str):
        return runner.invoke(cli, ["--quiet", "finetune", "--data", str(conversations_file),
                                   "--out", str(out), *args])

    base = ["--base", str(base_checkpoint)]
    assert invoke(tmp_path / "whole", *base, *chosen).exit_code == 0
    with monkeypatch.context() as patch:
        interrupt_when_shown(patch, 3)
        assert invoke(tmp_path / "cut", *base, *chosen).exit_code == 130
    result = invoke(tmp_path / "cut", "--resume", *(base if method == "full" else []))
    assert result.exit_code == 0, result.output
    weights = "model.safetensors" if method == "full" else "adapter.safetensors"
    whole, again = last_step(tmp_path / "whole"), last_step(tmp_path / "cut")
    assert whole.name == again.name == "step-0000006"
    assert_same_tensors(whole / weights, again / weights)
    assert sorted(p.name for p in (tmp_path / "cut" / "tokens").iterdir()) == [
        tokens_folder(tmp_path / "whole").name]  # the same split, no second cache


@pytest.mark.parametrize("method, flags, field", [
    ("lora", ["--rank", "8"], "finetune.rank is 4 in the run being resumed"),
    ("lora", ["--lora-dropout", "0.5"], "finetune.dropout is 0.0 in the run being resumed"),
    ("lora", ["--method", "dora"], "finetune.method is 'lora' in the run being resumed"),
    ("full", ["--method", "lora"], "finetune.method is 'full' in the run being resumed"),
])
def test_resume_refuses_an_adapter_setting_that_disagrees_with_the_run(
        runner, base_checkpoint, conversations_file, tmp_path, method, flags, field):
    out = tmp_path / "run"
    run_finetune(request(base_checkpoint, conversations_file, out, method, max_steps=2,
                         checkpoint_every=0), quiet)
    result = runner.invoke(cli, ["finetune", "--base", str(base_checkpoint), "--data",
                                 str(conversations_file), "--out", str(out), "--resume",
                                 *flags])
    line = refusal(result)
    assert line.startswith(f"error: {field} ({last_step(out)}), but ")
    assert f"hint: a resumed run keeps the adapter it was started with: leave out {flags[0]}," \
        in result.stderr
    assert [p.name for p in out.glob("step-*")] == ["step-0000002"]
