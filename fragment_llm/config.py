"""Validated configuration for every stage.

Each stage has one frozen pydantic model (`extra="forbid"`, a range on every number).
A config file is TOML with one table per stage (`[preprocess]`, `[tokenizer]`, ...);
`resolve` layers defaults < file < command-line flags and validates the result before
any work starts, so a bad value is refused naming the field, its source and the rule.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fragment_llm.errors import ConfigError
from fragment_llm.safeio import read_capped

MiB = 1 << 20
GiB = 1 << 30
MAX_CONFIG_FILE_BYTES = 1 * MiB
STAGE_TABLES = ("preprocess", "tokenizer", "model", "train", "generate", "chat")


class StageConfig(BaseModel):
    """Base for stage configs: immutable, and a misspelled key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PreprocessConfig(StageConfig):
    text_field: str = Field("text", min_length=1, max_length=128,
                            description="JSONL key / Parquet column holding the text")
    max_file_bytes: int = Field(64 * MiB, ge=1, le=16 * GiB,
                                description="larger input files are rejected unread")
    max_total_bytes: int = Field(64 * GiB, ge=1, le=1 << 50,
                                 description="stop taking files once this many bytes were read")
    max_files: int = Field(1_000_000, ge=1, le=100_000_000,
                           description="inputs beyond this count are rejected")
    max_doc_chars: int = Field(16_000_000, ge=1, le=1 << 32,
                               description="longer documents are dropped")
    min_doc_chars: int = Field(16, ge=1, le=1_000_000,
                               description="shorter cleaned documents are dropped")
    max_line_bytes: int = Field(16 * MiB, ge=64, le=1 * GiB,
                                description="longer JSONL lines are skipped unparsed")
    max_json_depth: int = Field(32, ge=2, le=512, description="deeper JSONL lines are skipped")
    invalid_utf8: Literal["reject", "replace"] = Field(
        "reject", description="reject a file with invalid UTF-8, or replace bad bytes with U+FFFD")
    shard_max_bytes: int = Field(128 * MiB, ge=1 * MiB, le=4 * GiB,
                                 description="text bytes per output shard before starting another")
    workers: int = Field(2, ge=1, le=256, description="processes that read and clean inputs")
    zstd_level: int = Field(3, ge=1, le=22, description="Parquet zstd compression level")


class TokenizerConfig(StageConfig):
    vocab_size: int = Field(8192, ge=262, le=1 << 20,
                            description="256 bytes + merges + special tokens")
    pattern: str = Field("gpt4", min_length=1, max_length=64,
                         description="named split pattern: gpt2 or gpt4, or 'custom'")
    custom_pattern: str | None = Field(None, min_length=1, max_length=4096,
                                       description="the split regex when pattern = 'custom'")
    max_chars: int | None = Field(None, ge=1, le=1 << 40,
                                  description="train on at most this many characters")
    max_chunk_chars: int = Field(256, ge=8, le=1 << 16,
                                 description="longer pre-split chunks are cut for training")
    min_frequency: int = Field(2, ge=1, le=1 << 30, description="stop when the best pair is rarer")
    holdout_fraction: float = Field(0.01, ge=0.0, lt=1.0,
                                    description="documents held back to measure bytes per token")
    workers: int = Field(2, ge=1, le=256, description="processes for counting and encoding")


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """Parse a TOML config file into its stage tables, refusing anything unexpected."""
    raw = read_capped(path, MAX_CONFIG_FILE_BYTES, ConfigError)
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config is not UTF-8 (byte {exc.start}), in {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML ({exc}), in {path}") from None
    except RecursionError:
        raise ConfigError(f"TOML nested too deeply, in {path}") from None
    for key, value in doc.items():
        if key not in STAGE_TABLES:
            raise ConfigError(f"unknown table [{key}] in {path}",
                              hint=f"known tables: {', '.join(STAGE_TABLES)}")
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a table like [{key}], in {path}")
    return doc


def _allowed_range(model: type[StageConfig], name: str) -> str | None:
    field = model.model_fields.get(name)
    if field is None:
        return None
    bounds = []
    for rule in field.metadata:
        for kind, attr, symbol in ((Ge, "ge", ">="), (Gt, "gt", ">"), (Le, "le", "<="),
                                   (Lt, "lt", "<")):
            if isinstance(rule, kind):
                bounds.append(f"{symbol} {getattr(rule, attr)}")
    return ", ".join(bounds) or None


def _explain(model: type[StageConfig], table: str, exc: ValidationError,
             sources: dict[str, str]) -> ConfigError:
    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else "?"
    where = sources.get(name, "defaults")
    if first["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        return ConfigError(f"unknown key {table}.{name}, in {where}", hint=f"known keys: {known}")
    allowed = _allowed_range(model, name)
    hint = f"allowed: {allowed}" if allowed else None
    return ConfigError(f"invalid {table}.{name} = {first.get('input')!r}: {first['msg']}, "
                       f"in {where}", hint=hint)


def resolve(model: type[StageConfig], table: str, file_tables: dict[str, dict[str, Any]],
            config_path: Path | None, overrides: dict[str, Any],
            base: dict[str, Any] | None = None) -> Any:
    """Build a stage config: `base` (e.g. a preset) < the file's [table] < CLI flags.

    Flags whose value is None were not given and do not override anything.
    """
    values = dict(base or {})
    sources = {key: "preset" for key in values}
    for key, value in file_tables.get(table, {}).items():
        values[key] = value
        sources[key] = str(config_path)
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
            sources[key] = "--" + key.replace("_", "-")
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _explain(model, table, exc, sources) from None


def load_stage_config(model: type[StageConfig], table: str, config_path: Path | None,
                      overrides: dict[str, Any]) -> Any:
    """The usual entry point for a verb: read `--config` (if any), then `resolve`."""
    tables = read_config_file(config_path) if config_path is not None else {}
    return resolve(model, table, tables, config_path, overrides)
