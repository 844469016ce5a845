"""config: layering defaults < file < flags, and one-line refusals naming field and rule."""

from __future__ import annotations

import json
import math
import shutil
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from fragment_llm.config import (
    ChatConfig,
    GenerateConfig,
    ModelConfig,
    PreprocessConfig,
    TokenizerConfig,
    TrainConfig,
    load_stage_config,
    read_config_file,
)
from fragment_llm.errors import ConfigError
from tests.helpers import Corpus


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_flags_override_file_override_defaults(tmp_path):
    path = write(tmp_path, "[preprocess]\nmin_doc_chars = 5\nworkers = 1\n")
    config = load_stage_config(PreprocessConfig, "preprocess", path,
                               {"workers": 2, "text_field": None})
    assert (config.min_doc_chars, config.workers, config.text_field) == (5, 2, "text")


def test_configs_are_frozen():
    config = PreprocessConfig()
    with pytest.raises(ValidationError):
        config.workers = 3


def test_out_of_range_names_field_source_and_range(tmp_path):
    path = write(tmp_path, "[tokenizer]\nvocab_size = 10\n")
    with pytest.raises(ConfigError) as info:
        load_stage_config(TokenizerConfig, "tokenizer", path, {})
    assert "tokenizer.vocab_size" in str(info.value) and str(path) in str(info.value)
    assert info.value.hint.startswith("allowed: >= 262")


def test_unknown_key_and_table_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown key preprocess.workerz"):
        load_stage_config(PreprocessConfig, "preprocess",
                          write(tmp_path, "[preprocess]\nworkerz = 2\n"), {})
    with pytest.raises(ConfigError, match=r"unknown table \[trian\]"):
        read_config_file(write(tmp_path, "[trian]\nlr = 1\n"))


@pytest.mark.parametrize("payload,rule", [
    (b"[preprocess\n", "invalid TOML"),
    (b"\xff = 1", "not UTF-8"),
    (b"preprocess = 3\n", "must be a table"),
    (b"x = " + b"[" * 5000 + b"]" * 5000, "TOML"),
])
def test_hostile_config_files_are_refused(tmp_path, payload, rule):
    path = tmp_path / "c.toml"
    path.write_bytes(payload)
    with pytest.raises(ConfigError, match=rule):
        read_config_file(path)


def test_oversized_config_is_refused_unread(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="file too large"):
        read_config_file(path)


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="preprocess.workers"):
        load_stage_config(PreprocessConfig, "preprocess", None, {"workers": "many"})


# ------------------------------------------- every number: its whole range, or refused

STAGES = {"preprocess": PreprocessConfig, "tokenizer": TokenizerConfig, "model": ModelConfig,
          "train": TrainConfig, "generate": GenerateConfig, "chat": ChatConfig}
# Other fields an extreme needs to pass the cross-field rules (n_embd divisible by
# n_head, an even head dim for RoPE, n_head divisible by n_kv_head).
COMPANIONS = {("model", "n_head", 256): {"n_embd": 512},
              ("model", "n_kv_head", 256): {"n_head": 256, "n_embd": 512}}


def numeric_fields() -> list[tuple[str, str, type, dict[str, float]]]:
    """(table, field, int or float, its bounds {"ge": 1, "le": 256, ...}) for every
    int or float field of every stage config."""
    fields = []
    for table, model in STAGES.items():
        for name, info in model.model_fields.items():
            kinds = {int, float} & set(typing.get_args(info.annotation) or (info.annotation,))
            if not kinds or info.annotation is bool:
                continue
            bounds = {attr: getattr(rule, attr) for rule in info.metadata
                      for attr in ("ge", "gt", "le", "lt") if hasattr(rule, attr)}
            fields.append((table, name, float if float in kinds else int, bounds))
    return fields


def extremes(kind: type, bounds: dict[str, float]) -> list[tuple[str, object, bool]]:
    """(label, value, must be accepted): each end of the range, just outside it, the
    infinities and NaN, and for a float the smallest value above its minimum."""
    step_down = (lambda x: x - 1) if kind is int else (lambda x: math.nextafter(x, -math.inf))
    step_up = (lambda x: x + 1) if kind is int else (lambda x: math.nextafter(x, math.inf))
    low = bounds["ge"] if "ge" in bounds else step_up(bounds["gt"])
    high = bounds["le"] if "le" in bounds else step_down(bounds["lt"])
    cases = [("min", low, True), ("max", high, True),
             ("below min", step_down(low), False), ("above max", step_up(high), False),
             ("inf", math.inf, False), ("-inf", -math.inf, False), ("nan", math.nan, False)]
    if kind is float:  # temperature 0 is greedy, but 5e-324 divides by almost nothing
        cases.append(("just above min", step_up(low), True))
    return cases


CASES = [pytest.param(table, name, value, accepted, id=f"{table}.{name}={label}")
         for table, name, kind, bounds in numeric_fields()
         for label, value, accepted in extremes(kind, bounds)]


def test_every_number_has_a_range():
    unbounded = [f"{table}.{name}" for table, name, _, bounds in numeric_fields()
                 if not ({"ge", "gt"} & set(bounds) and {"le", "lt"} & set(bounds))]
    assert unbounded == []


@pytest.mark.parametrize("table, name, value, accepted", CASES)
def test_every_number_is_accepted_in_range_and_refused_outside(tmp_path, table, name, value,
                                                               accepted):
    """Through a TOML file, as a user would write it (TOML has inf and nan). Values in
    range must validate; anything else is one ConfigError naming the field. Whether an
    accepted extreme also *works* is tested where it is used (the sampling settings end
    to end in tests/inference/test_text.py)."""
    values = {name: value, **COMPANIONS.get((table, name, value), {})}
    path = write(tmp_path, f"[{table}]\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items()))
    if accepted:
        config = load_stage_config(STAGES[table], table, path, {})
        assert getattr(config, name) == value
    else:
        with pytest.raises(ConfigError, match=rf"invalid {table}\.{name} = "):
            load_stage_config(STAGES[table], table, path, {})


def numeric_flags() -> list[tuple[str, str]]:
    """(verb, --flag) for every option of every verb that takes a number."""
    from fragment_llm.cli.app import cli
    from fragment_llm.cli.train import ByteSize, Duration

    numeric = (click.types.IntParamType, click.types.FloatParamType, ByteSize, Duration)
    return [(name, option.opts[0]) for name, command in sorted(cli.commands.items())
            for option in command.params
            if isinstance(option, click.Option) and isinstance(option.type, numeric)]


@pytest.mark.parametrize("verb, flag", numeric_flags())
def test_every_numeric_flag_refuses_overflow_inf_and_nan(runner, tmp_path, monkeypatch,
                                                         verb, flag):
    """`--max-memory inf` was an OverflowError (exit 70). Every number a flag takes is
    refused in one line (exit 2 from click, 1 from the config), or is in range and the
    verb goes on to stop at the missing inputs of an empty folder (exit 1)."""
    from fragment_llm.cli.app import cli

    monkeypatch.chdir(tmp_path)
    extra = ["--prompt", "a"] if verb == "generate" else []
    for value in ("inf", "-inf", "nan", "1e400", "9" * 40, "-" + "9" * 40):
        result = runner.invoke(cli, [verb, flag, value, *extra], input="")
        assert result.exit_code in (1, 2), (value, result.output)
        assert "internal error" not in result.output and "Traceback" not in result.output


# ------------------------------ vocab_size: the tokenizer is its only source (CLI, end to end)

VOCAB = 320  # the tokenizer of the shared `corpus`
TINY_RUN = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16},
            "train": {"batch_size": 2, "max_steps": 2, "warmup_steps": 1, "eval_every": 0,
                      "eval_blocks": 1, "final_eval_blocks": 1, "checkpoint_every": 0,
                      "device": "cpu", "precision": "fp32", "workers": 1}}


def run_config(path: Path, **model: object) -> Path:
    """A config file for a tiny 2-step run, with `model` added to its [model] table."""
    tables = {"model": {**TINY_RUN["model"], **model}, "train": TINY_RUN["train"]}
    path.write_text("".join(f"[{table}]\n" + "".join(f"{k} = {v!r}\n" for k, v in keys.items())
                            for table, keys in tables.items()).replace("'", '"'))
    return path


def train_cli(corpus: Corpus, out: Path, config: Path, *flags: str):
    from fragment_llm.cli.app import FLAGS, cli

    FLAGS.debug = FLAGS.quiet = False
    processed, tokenizer = corpus.processed, corpus.tokenizer
    return CliRunner().invoke(cli, ["train", "--data", str(processed), "--tokenizer",
                                    str(tokenizer), "--out", str(out), "--config", str(config),
                                    *flags])


@pytest.fixture(scope="module")
def agreeing_run(corpus, tmp_path_factory) -> Path:
    """A finished run whose [model] table gave the tokenizer's vocab_size."""
    root = tmp_path_factory.mktemp("agreeing")
    result = train_cli(corpus, root / "run", run_config(root / "c.toml", vocab_size=VOCAB))
    assert result.exit_code == 0, result.output
    return root / "run"


def test_cli_train_refuses_a_model_vocab_size_that_disagrees_with_the_tokenizer(corpus, tmp_path):
    config = run_config(tmp_path / "bad.toml", vocab_size=4096)
    result = train_cli(corpus, tmp_path / "run", config)
    assert result.exit_code == 1, result.output
    error, hint = result.stderr.splitlines()
    assert error == (f"error: model.vocab_size is 4096 in {config}, but the tokenizer "
                     f"{corpus.tokenizer} has {VOCAB} tokens")
    assert hint == "hint: leave vocab_size out of [model]: it comes from the tokenizer"
    assert not (tmp_path / "run").exists()


def test_cli_train_accepts_a_model_vocab_size_that_agrees_and_records_it(agreeing_run):
    (step,) = sorted(agreeing_run.glob("step-*"))
    assert json.loads((step / "config.json").read_text())["model"]["vocab_size"] == VOCAB


@pytest.mark.parametrize("vocab, refused", [(4096, True), (VOCAB, False)])
def test_cli_resume_checks_a_given_vocab_size_against_the_run(corpus, agreeing_run, tmp_path,
                                                              vocab, refused):
    run = shutil.copytree(agreeing_run, tmp_path / "run")
    config = run_config(tmp_path / "resume.toml", vocab_size=vocab)
    result = train_cli(corpus, run, config, "--resume", "--max-steps", "3")
    if refused:
        assert result.exit_code == 1, result.output
        error = result.stderr.splitlines()[0]
        assert error == (f"error: model.vocab_size is {VOCAB} in the run being resumed "
                         f"({run / 'step-0000002'}), but {config} gives 4096")
    else:
        assert result.exit_code == 0, result.output
        assert (run / "step-0000003").is_dir()
