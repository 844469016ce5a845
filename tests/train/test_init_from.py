"""`fragment train --init-from`: a new run that starts from a checkpoint's weights (the
same model config and tokenizer, verified), records where it started, and keeps that
record through a resume."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fragment_llm.checkpoint.load import load_checkpoint, open_checkpoint
from fragment_llm.cli.app import cli
from fragment_llm.config import MODEL_PRESETS, ModelConfig, TokenizerConfig
from fragment_llm.data.batches import TokenStream
from fragment_llm.data.shards import TokenShards
from fragment_llm.events import StepEvent
from fragment_llm.model.gpt import GPT
from fragment_llm.model.loss import lm_loss
from fragment_llm.tokenizer.tokenizer import Tokenizer
from fragment_llm.train.run import TrainRequest, run_training
from tests.helpers import FAST, MODEL, Corpus, cli_model_config, cli_train_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def request(corpus: Corpus, out: Path, init_from: Path | None = None, resume: bool = False,
            **train) -> TrainRequest:
    return TrainRequest(data=corpus.processed, tokenizer=corpus.tokenizer, out=out,
                        model=cli_model_config(**MODEL),
                        train=cli_train_config(**{**FAST, **train}),
                        tokens_dir=out.parent / "tokens", init_from=init_from, resume=resume)


def quiet(_event) -> None:
    pass


@pytest.fixture(scope="module")
def init_run(corpus, tmp_path_factory) -> Path:
    """A finished 8-step pretraining run: the checkpoint the new runs start from.
    Its token cache is beside it, where `request` puts every run's. Read only."""
    out = tmp_path_factory.mktemp("init") / "run"
    run_training(request(corpus, out, max_steps=8, checkpoint_every=0, final_eval_blocks=4),
                 quiet)
    return out


def first_batch(tokens: Path, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and targets of a run's first step (batch 4, one micro-step)."""
    (folder,) = tokens.iterdir()
    shards = TokenShards.open(folder)
    return TokenStream(shards.train, MODEL["block_size"], seed).next_batch(FAST["batch_size"])


def loss_of(model: GPT, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(lm_loss(model(batch[0]), batch[1]))


def test_the_run_starts_from_the_given_weights(corpus, init_run, tmp_path):
    """The first step's loss is the init checkpoint's on the same batch, not a fresh
    model's; with a learning rate too small to move them, the weights saved after a step
    are the init checkpoint's."""
    out = tmp_path / "next" / "run"
    losses: list[float] = []
    run_training(request(corpus, out, init_from=init_run, max_steps=1, lr=1e-9, muon_lr=1e-9,
                         warmup_steps=0,
                         final_eval_blocks=4),
                 lambda event: losses.append(event.train_loss)
                 if isinstance(event, StepEvent) else None)
    seed = cli_train_config().seed
    batch = first_batch(init_run.parent / "tokens", seed)
    config = ModelConfig(**MODEL, vocab_size=Tokenizer.load(corpus.tokenizer).vocab_size)
    started = GPT(config)
    open_checkpoint(init_run).load_model_into(started)
    torch.manual_seed(seed)
    fresh = GPT(config)  # what the run would have started from without --init-from
    assert losses[0] == pytest.approx(loss_of(started, batch), rel=1e-6)
    assert abs(losses[0] - loss_of(fresh, batch)) > 0.1
    saved = load_file(out / "step-0000001" / "model.safetensors")
    initial = load_file(open_checkpoint(init_run).path / "model.safetensors")
    fresh_state = fresh.state_dict()
    for name, tensor in initial.items():
        assert torch.allclose(saved[name], tensor, atol=1e-6), name
    assert not all(torch.allclose(saved[name], fresh_state[name], atol=1e-3) for name in saved)


def interrupt_at(step: int):
    def on_event(event):
        if isinstance(event, StepEvent) and event.step == step:
            os.kill(os.getpid(), signal.SIGINT)
    return on_event


def test_provenance_names_the_init_checkpoint_and_keeps_it_on_resume(corpus, init_run,
                                                                     tmp_path):
    out = tmp_path / "next" / "run"
    cut = run_training(request(corpus, out, init_from=init_run, max_steps=6,
                               checkpoint_every=0, final_eval_blocks=4), interrupt_at(3))
    assert cut.interrupted and cut.steps == 3
    started = open_checkpoint(init_run).manifest_sha256
    saved = load_checkpoint(out / "step-0000003").provenance.document()
    assert saved["base_manifest_sha256"] == started
    resumed = run_training(request(corpus, out, resume=True, max_steps=6, checkpoint_every=0,
                                   final_eval_blocks=4), quiet)
    assert resumed.steps == 6
    again = load_checkpoint(out / "step-0000006").provenance.document()
    assert again["base_manifest_sha256"] == started
    assert load_checkpoint(out / "step-0000006").config.chat_format == "transcript"


def test_a_run_without_init_from_records_no_base(corpus, init_run):
    document = open_checkpoint(init_run).provenance.document()
    assert "base_manifest_sha256" not in document


# --------------------------------------------------------------------------- the CLI


def train_args(corpus: Corpus, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(corpus.processed), "--tokenizer", str(corpus.tokenizer),
            "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--device", "cpu",
            *extra]


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


def test_the_cli_takes_the_model_from_the_checkpoint(runner, corpus, init_run, tmp_path):
    """Without --preset or [model], the new run's model is the checkpoint's (the default
    preset's would not fit its weights)."""
    out = tmp_path / "run"
    result = runner.invoke(cli, train_args(corpus, out, "--init-from", str(init_run)))
    assert result.exit_code == 0, result.output
    tuned = load_checkpoint(out / "step-0000002")
    assert tuned.config.model == load_checkpoint(open_checkpoint(init_run).path).config.model
    assert tuned.provenance.document()["base_manifest_sha256"] == open_checkpoint(
        init_run).manifest_sha256


def test_refuses_a_model_config_that_differs(runner, corpus, init_run, tmp_path):
    out = tmp_path / "run"
    line = refusal(runner.invoke(cli, train_args(corpus, out, "--init-from", str(init_run),
                                                 "--preset", "tiny")))
    recorded = open_checkpoint(init_run).config.model
    tiny = ModelConfig(**MODEL_PRESETS["tiny"], vocab_size=recorded["vocab_size"]).model_dump()
    differ = sorted(key for key, value in tiny.items() if recorded.get(key) != value)
    assert differ and "n_layer" in differ
    step = open_checkpoint(init_run).path
    assert line == (f"error: --init-from {step} has another model config "
                    f"({', '.join(differ)} differ)")
    assert not out.exists()


def test_refuses_another_tokenizer(runner, corpus, init_run, tmp_path):
    """A tokenizer of the same size, trained on other text: same shapes, other meanings."""
    text = "".join(path.read_text() for path in sorted(corpus.other_raw.iterdir()))
    other = tmp_path / "other.json"
    Tokenizer.train([text], TokenizerConfig(vocab_size=320, workers=1)).save(other)
    args = train_args(corpus, tmp_path / "run", "--init-from", str(init_run))
    args[args.index("--tokenizer") + 1] = str(other)
    line = refusal(runner.invoke(cli, args))
    step = open_checkpoint(init_run).path
    assert line.startswith(f"error: --init-from {step} was trained with another tokenizer (")
    assert not (tmp_path / "run").exists()


def test_refuses_a_missing_checkpoint(runner, corpus, tmp_path):
    line = refusal(runner.invoke(cli, train_args(corpus, tmp_path / "run", "--init-from",
                                                 str(tmp_path / "nowhere"))))
    assert line == f"error: checkpoint not found: {tmp_path / 'nowhere'}"


def test_init_from_with_resume_is_a_usage_error(runner, corpus, init_run, tmp_path):
    result = runner.invoke(cli, train_args(corpus, tmp_path / "run", "--init-from",
                                           str(init_run), "--resume"))
    assert result.exit_code == 2, result.output
    assert "--init-from starts a new run and --resume continues one" in result.stderr
    assert not (tmp_path / "run").exists()
