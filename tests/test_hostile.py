"""Hostile inputs the stage suites did not cover yet, one test per catalogue row.

docs/security.md lists every hostile input the project is tested against; the rows
whose test lives here are the boundaries between stages (config files, processed and
token-shard folders, a checkpoint's model config and tokenizer, prompt files, error
lines). Each test builds the real hostile file, asserts the stage's error type, that
the message names the file or field, and where the stage could write, that it wrote
nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from torch import nn

import fragment_llm.checkpoint.trained as trained
from fragment_llm.checkpoint.save import save_checkpoint
from fragment_llm.cli.app import cli
from fragment_llm.config import (
    GenerateConfig,
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
    load_stage_config,
)
from fragment_llm.data.processed import MANIFEST_NAME, ProcessedCorpus
from fragment_llm.data.processed import MAX_MANIFEST_BYTES as PROCESSED_MANIFEST_CAP
from fragment_llm.data.shards import MANIFEST, TokenShards
from fragment_llm.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    ProcessedDataError,
    PromptError,
)
from fragment_llm.inference.text import read_prompt
from fragment_llm.train.run import TrainRequest, run_training
from tests.helpers import TOKENIZER_VOCAB, write_token_shards


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: 'nothing was written' is 'this is equal'."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


# ------------------------------------------------------------------------- config


def test_config_file_that_is_a_symlink(tmp_path):
    real = tmp_path / "real.toml"
    real.write_text("[preprocess]\nworkers = 1\n")
    (tmp_path / "link.toml").symlink_to(real)
    with pytest.raises(ConfigError, match="refusing to follow a symlink") as info:
        load_stage_config(PreprocessConfig, "preprocess", tmp_path / "link.toml", {})
    assert str(tmp_path / "link.toml") in info.value.message


def test_config_file_that_is_a_fifo(runner, tmp_path, no_hang):
    os.mkfifo(tmp_path / "c.toml")
    result = runner.invoke(cli, ["preprocess", str(tmp_path), "--out", str(tmp_path / "out"),
                                 "--config", str(tmp_path / "c.toml")])
    assert result.exit_code == 1
    assert result.stderr == f"error: not a regular file: {tmp_path / 'c.toml'}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("table, line, field", [
    ("train", "lr = nan", "train.lr"),
    ("train", "lr = inf", "train.lr"),
    ("train", "max_time_s = -inf", "train.max_time_s"),
    ("model", "dropout = nan", "model.dropout"),
    ("generate", "temperature = nan", "generate.temperature"),
])
def test_config_non_finite_number(tmp_path, table, line, field):
    path = tmp_path / "c.toml"
    path.write_text(f"[{table}]\n{line}\n")
    model = {"train": TrainConfig, "model": ModelConfig, "generate": GenerateConfig}[table]
    with pytest.raises(ConfigError) as info:
        load_stage_config(model, table, path, {})
    assert info.value.message.startswith(f"invalid {field} = ")
    assert str(path) in info.value.message and info.value.hint.startswith("allowed: ")



@pytest.mark.parametrize("value", ["true", '"2"'])
def test_config_value_of_the_wrong_type(tmp_path, value):
    path = tmp_path / "c.toml"
    path.write_text(f"[preprocess]\nworkers = {value}\n")
    with pytest.raises(ConfigError, match="preprocess.workers"):
        load_stage_config(PreprocessConfig, "preprocess", path, {})


# -------------------------------------------------------------- processed folder


@pytest.mark.parametrize("content, rule", [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b'{"format": "fragment-processed", "format": "fragment-processed"}',
     "duplicate key 'format'"),
    (b'{"format": "fragment-processed", "version": NaN}', "NaN"),
    (b'{"format": "caf\xe9"}', "invalid UTF-8"),
])
def test_processed_manifest_hostile_json(processed, content, rule):
    (processed / MANIFEST_NAME).write_bytes(content)
    with pytest.raises(ProcessedDataError, match=rule) as info:
        ProcessedCorpus.open(processed)
    assert str(processed / MANIFEST_NAME) in info.value.message


def test_processed_manifest_over_the_size_cap(processed):
    with open(processed / MANIFEST_NAME, "r+b") as fh:
        fh.truncate(PROCESSED_MANIFEST_CAP + 1)  # sparse: refused from fstat, unread
    with pytest.raises(ProcessedDataError, match="file too large") as info:
        ProcessedCorpus.open(processed)
    assert str(processed / MANIFEST_NAME) in info.value.message


# ------------------------------------------------------------------ token shards


def token_folder(folder: Path, **overrides) -> Path:
    """A one-shard-per-split token folder, built by hand, with manifest overrides."""
    folder.mkdir()
    return write_token_shards(folder, [np.arange(100) % 300], [np.arange(10) % 300],
                              **overrides)


@pytest.mark.parametrize("overrides, rule", [
    ({"dtype": "object"}, "invalid token manifest: dtype"),
    ({"dtype": "float64"}, "invalid token manifest: dtype"),
    ({"eot_id": 300}, "eot_id 300 is not below vocab_size"),
    ({"vocab_size": 2**40}, "invalid token manifest: vocab_size"),
    ({"surprise": 1}, "invalid token manifest: surprise"),
])
def test_token_manifest_fields_that_break_the_schema(tmp_path, overrides, rule):
    folder = token_folder(tmp_path / "tok", **overrides)
    with pytest.raises(DatasetError, match=rule) as info:
        TokenShards.open(folder, None)
    assert str(folder) in info.value.message


@pytest.mark.parametrize("name", ["/etc/passwd", "../train-00000.bin", "train-00000.bin/x",
                                  "train-0.bin"])
def test_token_manifest_shard_name_outside_the_pattern(tmp_path, name):
    folder = token_folder(tmp_path / "tok")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["train"]["shards"][0]["file"] = name
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"invalid token manifest: train\.shards\.0\.file"):
        TokenShards.open(folder, 300)


def test_token_split_count_disagrees_with_its_shards(tmp_path):
    folder = token_folder(tmp_path / "tok")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["train"]["tokens"] = 10**12
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="split token count disagrees") as info:
        TokenShards.open(folder, 300)
    assert str(folder / MANIFEST) in info.value.message


def test_token_manifest_duplicate_key(tmp_path):
    folder = token_folder(tmp_path / "tok")
    text = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text(text.replace('"vocab_size": 300',
                                                '"vocab_size": 300, "vocab_size": 70000'))
    with pytest.raises(DatasetError, match="duplicate key 'vocab_size'"):
        TokenShards.open(folder, 300)


def test_token_shard_that_is_a_fifo(tmp_path, no_hang):
    folder = token_folder(tmp_path / "tok")
    (folder / "val-00000.bin").unlink()
    os.mkfifo(folder / "val-00000.bin")
    with pytest.raises(DatasetError, match="not a regular file") as info:
        TokenShards.open(folder, 300)
    assert "val-00000.bin" in info.value.message


def test_token_folder_that_is_a_symlink(tmp_path):
    real = token_folder(tmp_path / "tok")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(DatasetError, match="not a token-shard folder") as info:
        TokenShards.open(tmp_path / "link", 300)
    assert str(tmp_path / "link") in info.value.message


# --------------------------------------------- checkpoint -> model (chat, eval, resume)


def checkpoint_with(run: Path, tokenizer_file: Path, model_config: dict) -> Path:
    """A checkpoint whose files all verify, but whose config.json says `model_config`."""
    weights = nn.Linear(2, 2)  # the loader must refuse before these matter
    return save_checkpoint(run, 1, model=weights, optimizer=None, trainer_state={"step": 1},
                           config={"model": model_config, "train": {}},
                           tokenizer_file=tokenizer_file)


SMALL = {"vocab_size": TOKENIZER_VOCAB, "n_layer": 1, "n_head": 2, "n_embd": 16,
         "block_size": 16}


@pytest.mark.parametrize("model_config, rule", [
    ({**SMALL, "n_embd": 100, "n_head": 3}, "must be divisible by n_head"),
    ({**SMALL, "n_layer": -1}, "greater than or equal to 1"),
    ({**SMALL, "activation": "relu"}, "Extra inputs are not permitted"),
    ("not a table", "valid dictionary"),
    ({**SMALL, "vocab_size": None}, "model.vocab_size: Field required"),
    ({k: v for k, v in SMALL.items() if k != "vocab_size"}, "model.vocab_size: Field required"),
])
def test_checkpoint_model_config_that_breaks_the_rules(tmp_path, tokenizer_file, model_config,
                                                       rule):
    folder = checkpoint_with(tmp_path / "run", tokenizer_file, model_config)
    with pytest.raises(CheckpointError, match=rule) as info:
        trained.load_trained(folder)
    assert str(folder / "config.json") in info.value.message


def test_checkpoint_tokenizer_vocab_differs_from_the_model(tmp_path, tokenizer_file,
                                                           monkeypatch):
    folder = checkpoint_with(tmp_path / "run", tokenizer_file, {**SMALL, "vocab_size": 300})
    monkeypatch.setattr(trained, "GPT", _never_built)
    with pytest.raises(CheckpointError, match=f"tokenizer vocab size {TOKENIZER_VOCAB} "
                                              "differs from the model's 300") as info:
        trained.load_trained(folder)
    assert str(folder) in info.value.message


def _never_built(config: ModelConfig) -> nn.Module:
    raise AssertionError(f"a model was built from a refused config: {config}")


def test_checkpoint_config_naming_a_huge_model_is_refused_before_building(
        tmp_path, tokenizer_file, monkeypatch):
    huge = {**SMALL, "n_layer": 256, "n_head": 256, "n_embd": 32768}
    folder = checkpoint_with(tmp_path / "run", tokenizer_file, huge)
    monkeypatch.setattr(trained, "GPT", _never_built)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        trained.load_trained(folder)


def resume_request(tmp_path: Path, tokenizer_file: Path, **train) -> TrainRequest:
    return TrainRequest(data=tmp_path / "unused", tokenizer=tokenizer_file,
                        out=tmp_path / "run", model=ModelConfig(**{**SMALL, "vocab_size": 256}),
                        train=TrainConfig(device="cpu", precision="fp32", **train),
                        resume=True, tokens_dir=tmp_path / "tokens")


@pytest.mark.parametrize("model_config, error, rule", [
    ({**SMALL, "n_embd": 100, "n_head": 3}, CheckpointError, "invalid model config: .*"
                                                             "config.json"),
    ({**SMALL, "vocab_size": 300}, ConfigError, "checkpoint vocab size 300 differs"),
    ({**SMALL, "n_layer": 256, "n_head": 64, "n_embd": 8192}, ConfigError,
     "exceeds the limit"),
])
def test_resume_from_a_checkpoint_with_a_hostile_model_config(tmp_path, tokenizer_file,
                                                              model_config, error, rule):
    checkpoint_with(tmp_path / "run", tokenizer_file, model_config)
    before = listing(tmp_path)
    request = resume_request(tmp_path, tokenizer_file, max_memory=1 << 30)
    with pytest.raises(error, match=rule):
        run_training(request, lambda event: None)
    assert listing(tmp_path) == before  # no lock, no metrics, no token shards


@pytest.mark.parametrize("entry", ["load_trained", "resume"])
def test_checkpoint_model_config_refusal_is_one_line_naming_the_field(tmp_path, tokenizer_file,
                                                                     entry):
    folder = checkpoint_with(tmp_path / "run", tokenizer_file, {**SMALL, "n_layer": -1})
    with pytest.raises(CheckpointError) as info:
        if entry == "load_trained":
            trained.load_trained(folder)
        else:
            run_training(resume_request(tmp_path, tokenizer_file), lambda event: None)
    assert "\n" not in info.value.message and "n_layer" in info.value.message


# ---------------------------------------------------------------- prompts


def test_prompt_file_that_is_a_symlink(tmp_path):
    (tmp_path / "real.txt").write_text("To be")
    (tmp_path / "link.txt").symlink_to(tmp_path / "real.txt")
    with pytest.raises(PromptError, match="refusing to follow a symlink") as info:
        read_prompt(None, tmp_path / "link.txt", GenerateConfig())
    assert str(tmp_path / "link.txt") in info.value.message


def test_prompt_file_that_is_a_fifo(tmp_path, no_hang):
    os.mkfifo(tmp_path / "prompt.txt")
    with pytest.raises(PromptError, match="not a regular file") as info:
        read_prompt(None, tmp_path / "prompt.txt", GenerateConfig())
    assert str(tmp_path / "prompt.txt") in info.value.message


def test_prompt_file_over_the_byte_cap(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("x" * 41)  # the cap is 4 bytes per allowed character
    with pytest.raises(PromptError, match="file too large.* the limit is 40") as info:
        read_prompt(None, path, GenerateConfig(max_prompt_chars=10))
    assert str(path) in info.value.message


def test_prompt_on_stdin_over_the_byte_cap(runner, tmp_path):
    result = runner.invoke(cli, ["generate", "--checkpoint", str(tmp_path), "--prompt", "-"],
                           input="y" * (4 * 16_000 + 1))
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: the prompt on standard input is over 64,000 bytes")


# ---------------------------------------------------------------------- CLI


def test_error_naming_a_hostile_path_is_one_escaped_line(runner, tmp_path):
    evil = tmp_path / "evil\n\u202e\x1b]52;c;aGk=\x07\x1b[2J.txt"
    result = runner.invoke(cli, ["preprocess", str(evil), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    error, hint = result.stderr.splitlines()
    assert error == (f"error: input not found: {tmp_path}/evil\\x0a\\u202e\\x1b]52;c;aGk="
                     "\\x07\\x1b[2J.txt")
    assert hint.startswith("hint: ")
    assert not {"\x1b", "\x07", "\u202e"} & set(result.output)
    assert not (tmp_path / "out").exists()


def test_checkpoint_path_that_is_a_fifo(runner, tmp_path, no_hang):
    os.mkfifo(tmp_path / "step-0000001")
    result = runner.invoke(cli, ["generate", "--checkpoint", str(tmp_path / "step-0000001"),
                                 "--prompt", "hi"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and "step-0000001" in result.stderr
    assert "Traceback" not in result.output



# ------------------------------------------------------------- the catalogue itself


def test_every_catalogue_row_names_a_test_that_exists():
    """docs/security.md's table cites node ids; each must name a test function here."""
    import ast
    import re

    root = Path(__file__).resolve().parents[1]
    table = (root / "docs" / "security.md").read_text()
    cited = re.findall(r"^\| \d+ \|.*`(tests/[\w/]+\.py)::(\w+)`", table, re.MULTILINE)
    assert len(cited) >= 60
    defined: dict[str, set[str]] = {}
    for path, name in cited:
        if path not in defined:
            tree = ast.parse((root / path).read_text())
            defined[path] = {node.name for node in ast.walk(tree)
                             if isinstance(node, ast.FunctionDef)}
        assert name in defined[path], f"{path}::{name} is cited but not defined"
