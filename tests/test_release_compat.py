"""Artifacts written by the previous release still load and behave the same.

tests/fixtures/release-0.1.0/ was written by commit 76e8119 (the last commit before the
code moved into subpackages, issue 16) with the command line alone:

    fragment preprocess raw/ --out processed      # 60 kB of one play
    fragment train-tokenizer --data processed --out tokenizer.json --vocab-size 320
    fragment train --data processed --tokenizer tokenizer.json --out run --config tiny.toml
        # n_layer 1, n_head 2, n_embd 32, block_size 96, lr 0.01, batch 4, 40 steps, seed 7

The expected values below were printed by that commit from those files. Only the
on-disk formats are shared with the code under test, so any drift in how a checkpoint,
tokenizer, processed folder or token cache is read shows up here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fragment_llm.cli.app import cli
from fragment_llm.tokenizer.tokenizer import Tokenizer

RELEASE = Path(__file__).resolve().parent / "fixtures" / "release-0.1.0"
STEP = "step-0000040"

# Printed by 76e8119 (see the module docstring) from the fixture's files.
ENCODED = [82, 79, 77, 69, 79, 58, 32, 87, 257, 264, 102, 111, 264, 258, 114, 116, 291, 260,
           44, 284, 97, 195, 175, 277, 283, 97, 102, 195, 169, 63]
GENERATED = " i,yteeet theuuos\nIIEW.\n\nLEeer"
CHAT_ANSWER = "onyit, e tou tou"
EVAL_LOSS = 4.301240603129069
# sha256 of the tensor bytes of step 44 (the file minus its header: safetensors writes the
# header's metadata map in a different order in each process).
RESUMED_TO_44_TENSORS_SHA256 = "5d248f7a66d841490b17a3cbd2d3a76b77537844ec0c100979b95b30b4b264b5"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def release(tmp_path) -> Path:
    """A writable copy: loading must not need to write, but resuming does."""
    return Path(shutil.copytree(RELEASE, tmp_path / "release"))


def test_tokenizer_from_the_previous_release_encodes_the_same_ids():
    tokenizer = Tokenizer.load(RELEASE / "tokenizer.json")
    assert tokenizer.encode("ROMEO: Wherefore art thou, naïve café?") == ENCODED


def test_checkpoint_from_the_previous_release_generates_the_same_text(runner):
    result = runner.invoke(cli, ["generate", "--checkpoint", str(RELEASE / "run"),
                                  "--prompt", "ROMEO: ", "--max-new-tokens", "24",
                                  "--seed", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == GENERATED


def test_checkpoint_from_the_previous_release_chats_the_same(runner):
    result = runner.invoke(cli, ["chat", "--checkpoint", str(RELEASE / "run" / STEP),
                                  "--max-new-tokens", "12", "--seed", "3"],
                           input="Who are you?\n/quit\n")
    assert result.exit_code == 0, result.output
    assert CHAT_ANSWER in result.stdout.splitlines()


def test_checkpoint_from_the_previous_release_evaluates_the_same(runner, release):
    result = runner.invoke(cli, ["-q", "eval", "--checkpoint", str(release / "run"),
                                  "--data", str(release / "processed"), "--json",
                                  "--max-blocks", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["loss"] == pytest.approx(EVAL_LOSS, rel=1e-6)


def test_run_from_the_previous_release_resumes_bit_exact(runner, release):
    """Weights, optimizer moments, RNG and data cursor all come back from the old files:
    four more steps give the very tensors the old code wrote."""
    result = runner.invoke(cli, ["-q", "train", "--data", str(release / "processed"),
                                  "--tokenizer", str(release / "tokenizer.json"),
                                  "--out", str(release / "run"), "--resume",
                                  "--max-steps", "44"])
    assert result.exit_code == 0, result.output
    weights = (release / "run" / "step-0000044" / "model.safetensors").read_bytes()
    tensors = weights[8 + int.from_bytes(weights[:8], "little"):]
    assert hashlib.sha256(tensors).hexdigest() == RESUMED_TO_44_TENSORS_SHA256
