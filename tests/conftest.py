"""Shared test setup: hypothesis profiles, small fixtures, and the shared artifacts.

The artifacts every stage's tests start from are built here once per session, by the
real stages, and handed out read only; a fixture that hands out a writable one copies:

- `shakespeare` / `corpus`: three plays, their processed folder and a 320-token
  tokenizer (`corpus` is a private copy per module, so runs keep separate token caches).
- `processed_template` / `processed`: a small processed folder of `helpers.DOCS`.
- `tokenizer_file`: a valid tokenizer file with fixed merges (no training).
- `checkpoint`, `hostile_checkpoint`, `trained`: a random tiny GPT saved as a real
  checkpoint; one whose greedy output is terminal escapes; the first loaded.

Hypothesis profiles:
- `ci` (the default): Hypothesis' usual 100 examples for a bare `@given`, no deadline
  (a busy 2-core runner makes per-example timings meaningless; tests/test_fuzz.py
  guards against hangs with its own alarm instead) and no "too slow" health check.
  The fuzz tests take a fraction of `max_examples`, sized so tests/test_fuzz.py stays
  under 45 s on 2 cores.
- `fuzz`: 20x the examples, for a long local run:
  `HYPOTHESIS_PROFILE=fuzz pytest tests/test_fuzz.py`.

Tests that pass their own `@settings(max_examples=...)` keep it under either profile.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, settings

from fragment_llm.checkpoint.save import save_checkpoint
from fragment_llm.checkpoint.trained import Trained, load_trained
from fragment_llm.cli.common import FLAGS
from fragment_llm.config import ModelConfig, PreprocessConfig, TokenizerConfig
from fragment_llm.data.preprocess import run_preprocess
from fragment_llm.model.gpt import GPT
from fragment_llm.tokenizer.tokenizer import Tokenizer
from fragment_llm.tokenizer.train import train_tokenizer
from tests.helpers import (
    CHAT_TEXT,
    CHAT_VOCAB,
    DOCS,
    HOSTILE,
    MERGES,
    SAMPLE,
    Corpus,
    tiny_gpt,
)

CI_EXAMPLES = 100

settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", parent=settings.get_profile("ci"),
                          max_examples=20 * CI_EXAMPLES)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_as_a_terminal_sends_it():
    """The suite tests Ctrl-C as a user at a terminal presses it. Launched as a background
    job (`cmd &` in a script: no job control), the shell sets SIGINT to be ignored, and
    the code keeps an ignored SIGINT ignored (safety/signals.py), so those tests would
    fail for how they were started, not for what they test: give the session Python's
    default handler, as an interactive start has it."""
    previous = signal.getsignal(signal.SIGINT)
    if previous == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def no_hang():
    """Fail, rather than hang the suite, if a refusal blocks (a FIFO opened for reading)."""
    def timeout(signum, frame):
        raise TimeoutError("blocked on a hostile input")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def runner() -> CliRunner:
    """A CLI runner with the global flags reset (another test may have set --quiet)."""
    FLAGS.debug = FLAGS.quiet = False
    return CliRunner()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures(...)`):
    batch-1 steps of a tiny model are too small to split, and on a busy 2-core machine a
    second thread only waits for a core (up to 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ corpus and tokenizer


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory) -> Corpus:
    """The shared tiny corpus, built once by the preprocess and train-tokenizer stages.
    Read only: take `corpus` to write beside it."""
    root = tmp_path_factory.mktemp("shakespeare")
    plays = {"raw": ("macbeth_gut.txt", "hamlet_gut.txt", "sonnets_gut.txt"),
             "other_raw": ("othello_gut.txt", "julius_caesar_gut.txt")}
    for folder, names in plays.items():
        (root / folder).mkdir()
        for name in names:
            (root / folder / name).write_text((SAMPLE / name).read_text()[:40_000])
    run_preprocess([root / "raw"], root / "processed", PreprocessConfig(workers=1))
    train_tokenizer(root / "processed", root / "tokenizer.json",
                    TokenizerConfig(vocab_size=320, workers=1), overwrite=False)
    return Corpus(root / "raw", root / "other_raw", root / "processed", root / "tokenizer.json")


@pytest.fixture(scope="module")
def corpus(shakespeare, tmp_path_factory) -> Corpus:
    """`shakespeare` with a processed folder and tokenizer of the module's own: a run keeps
    its token cache beside `processed`, and tests may write there. Raw folders are shared."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(shakespeare.processed, root / "processed")
    shutil.copy(shakespeare.tokenizer, root / "tokenizer.json")
    return replace(shakespeare, processed=root / "processed", tokenizer=root / "tokenizer.json")


@pytest.fixture(scope="session")
def processed_template(tmp_path_factory) -> Path:
    """A processed folder of `DOCS`, one `doc<NN>.txt` each, made once. Read only."""
    root = tmp_path_factory.mktemp("processed-template")
    (root / "raw").mkdir()
    for i, doc in enumerate(DOCS):
        (root / "raw" / f"doc{i:02d}.txt").write_text(doc)
    run_preprocess([root / "raw"], root / "processed", PreprocessConfig(workers=1))
    return root / "processed"


@pytest.fixture
def processed(processed_template, tmp_path) -> Path:
    """A private copy of `processed_template` in tmp_path, ready to be broken."""
    return Path(shutil.copytree(processed_template, tmp_path / "processed"))


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A valid tokenizer file of `TOKENIZER_VOCAB` tokens from fixed `MERGES`. Read only."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    Tokenizer.from_merges(MERGES).save(path)
    return path


# ------------------------------------------------------------------ model and checkpoint

@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory) -> Path:
    """A `CHAT_VOCAB`-token tokenizer trained on `CHAT_TEXT`: chat lines and non-ASCII."""
    path = tmp_path_factory.mktemp("chat-tokenizer") / "tokenizer.json"
    Tokenizer.train([CHAT_TEXT], TokenizerConfig(vocab_size=CHAT_VOCAB, workers=1)).save(path)
    return path


def save_tiny_checkpoint(run: Path, model: GPT, tokenizer_file: Path) -> Path:
    record = {"model": model.config.model_dump(mode="json"), "val_bpb": 2.5}
    return save_checkpoint(run, 7, model=model, optimizer=None, trainer_state={"step": 7},
                           config=record, tokenizer_file=tokenizer_file)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, chat_tokenizer) -> Path:
    """A random tiny model: babble, but real babble through the real loader. Read only."""
    model = tiny_gpt(vocab_size=CHAT_VOCAB, block_size=64)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "run", model, chat_tokenizer)


def hostile_model(vocab: int) -> GPT:
    """A bigram machine whose greedy output cycles through HOSTILE's bytes.

    Attention and MLP write nothing (zero output projections), so the final hidden
    state is the current token's embedding: one-hot, hence logits = column `token` of
    lm_head. Column b of a HOSTILE byte points at the byte after it; every other
    token (prompt merges, specials) points at HOSTILE's first byte.
    """
    config = ModelConfig(vocab_size=vocab, n_layer=1, n_head=4, n_embd=320, block_size=64,
                         tie_embeddings=False)
    model = GPT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.zero_()
        model.wte.weight.copy_(torch.eye(vocab, 320))
        head = torch.zeros(vocab, 320)
        head[HOSTILE[0], :vocab] = 1.0
        for here, after in zip(HOSTILE, HOSTILE[1:] + HOSTILE[:1]):
            head[:, here] = 0.0
            head[after, here] = 1.0
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="session")
def hostile_checkpoint(tmp_path_factory, chat_tokenizer) -> Path:
    """A checkpoint whose greedy output is `HOSTILE`, terminal escapes and all. Read only."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    return save_tiny_checkpoint(run, hostile_model(CHAT_VOCAB), chat_tokenizer)


@pytest.fixture(scope="session")
def trained(checkpoint) -> Trained:
    """`checkpoint` through the one loader every verb uses: model, tokenizer, records."""
    return load_trained(checkpoint)
