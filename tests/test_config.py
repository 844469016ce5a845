"""config: layering defaults < file < flags, and one-line refusals naming field and rule."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fragment_llm.config import (
    PreprocessConfig,
    TokenizerConfig,
    load_stage_config,
    read_config_file,
)
from fragment_llm.errors import ConfigError


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
