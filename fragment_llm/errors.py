"""The project's error types.

Every problem a user can cause (a bad flag, a hostile file, a full disk) raises a
`FragmentError` subclass. The CLI prints it as one line, `error: <what>, <where>`,
plus an optional `hint:` line, and exits 1. Anything else escaping a stage is a bug
and is reported as an internal error.
"""

from __future__ import annotations


class FragmentError(Exception):
    """A user-facing problem: `message` says what and where, `hint` what to do about it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(FragmentError):
    """A config file, flag or cross-stage setting breaks a rule."""


class InputDataError(FragmentError):
    """Raw input files for `preprocess` are missing, unsafe or unusable."""


class OutputError(FragmentError):
    """An output location is refused (exists, inside an input, not writable, disk full)."""


class ProcessedDataError(FragmentError):
    """A processed folder (`data/processed`) is missing, tampered with or malformed."""


class TokenizerError(FragmentError):
    """A tokenizer file or tokenizer training request is invalid."""


class DatasetError(FragmentError):
    """Token shards or their manifest are missing, tampered with or malformed."""


class ModelError(FragmentError):
    """A model configuration cannot be built."""


class TrainingError(FragmentError):
    """Training cannot go on (non-finite loss, a broken resume state)."""


class CheckpointError(FragmentError):
    """A checkpoint folder is missing, tampered with or malformed."""


class PromptError(FragmentError):
    """A prompt or sampling setting is refused."""
