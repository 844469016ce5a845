"""The pinned layout of a run folder: `RUN/step-NNNNNNN/` and the files inside it, their
size caps, step names, listing the step folders, and removing what a killed save left.
The only module that knows a run folder's file names (docs/checkpoints.md).

A step folder holds a whole model (`model.safetensors`) or, written by a LoRA/DoRA
fine-tuning run, an adapter (`adapter.safetensors` + `adapter_config.json`) meant for the
base checkpoint that config names; both share the manifest, the records and the loader."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from fragment_llm.errors import CheckpointError
from fragment_llm.safety.files import (
    OLD_MARKER,
    TEMP_MARKER,
    remove_stale_temps,
)

FORMAT = "fragment-checkpoint"
VERSION = 1
MODEL_FORMAT = "fragment-model"
OPTIMIZER_FORMAT = "fragment-optimizer"

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_FORMAT = "fragment-adapter"
METRICS_FILE = "metrics.jsonl"  # beside the step folders: one JSON object per logged step
REQUIRED_FILES = frozenset({MODEL_FILE, TRAINER_STATE_FILE, CONFIG_FILE, TOKENIZER_FILE})
ADAPTER_REQUIRED_FILES = (REQUIRED_FILES - {MODEL_FILE}) | {ADAPTER_FILE, ADAPTER_CONFIG_FILE}
KNOWN_FILES = REQUIRED_FILES | ADAPTER_REQUIRED_FILES | {OPTIMIZER_FILE, MANIFEST_FILE}

# Formats that can carry pickled code; named in the refusal so nobody "just renames" one.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".npy", ".npz", ".joblib")

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_MAX_BYTES = 8 * GiB  # per tensor or tokenizer file
MANIFEST_MAX_BYTES = 1 * MiB
CONFIG_MAX_BYTES = 1 * MiB
TRAINER_STATE_MAX_BYTES = 64 * MiB
TOKENIZER_MAX_BYTES = 256 * MiB
HEADER_MAX_BYTES = 100 * MiB
MAX_TENSORS = 100_000
MAX_DIMS = 8
MAX_NAME_CHARS = 1024
JSON_MAX_DEPTH = 64

MAX_STEP = 9_999_999
STEP_NAME = re.compile(r"step-(\d{7})")
_TEMP_NAME = re.compile(rf"\.(step-\d{{7}})(?:{re.escape(TEMP_MARKER)}|{re.escape(OLD_MARKER)})")


FileName = Literal["model.safetensors", "optimizer.safetensors", "trainer_state.json",
                   "config.json", "tokenizer.json", "adapter.safetensors",
                   "adapter_config.json"]


def step_path(run_dir: Path, step: int) -> Path:
    """`(Path("run"), 100) -> run/step-0000100`."""
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"checkpoint step must be an int in 0..{MAX_STEP}, got {step!r}")
    return run_dir / f"step-{step:07d}"


def clean_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove half-written step folders left by killed runs; call once at start.

    A run killed while replacing a same-step folder left the old one under a hidden
    name; `remove_stale_temps` puts it back rather than losing it.
    """
    if not run_dir.is_dir():
        return []
    with os.scandir(run_dir) as entries:
        names = {m.group(1) for e in entries if (m := _TEMP_NAME.match(e.name))}
    removed: list[Path] = []
    for name in sorted(names):
        removed += remove_stale_temps(run_dir / name)
    return removed


def _step_of(path: Path) -> int:
    match = STEP_NAME.fullmatch(path.name)
    if match is None:
        raise CheckpointError(f"not a step folder name: {path}")
    return int(match.group(1))


def _step_entries(run_dir: Path) -> list[tuple[Path, str | None]]:
    """Step-named entries by step ascending, with why each is unusable (None: a folder)."""
    if not os.path.lexists(run_dir):
        return []
    if not run_dir.is_dir():
        raise CheckpointError(f"not a folder: {run_dir}")
    found = []
    with os.scandir(run_dir) as entries:
        for entry in entries:
            if STEP_NAME.fullmatch(entry.name):
                problem = ("is a symlink, never followed" if entry.is_symlink() else
                           None if entry.is_dir(follow_symlinks=False) else "is not a folder")
                found.append((Path(entry.path), problem))
    return sorted(found, key=lambda item: item[0].name)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Real `step-NNNNNNN` folders in `run_dir`, oldest first; symlinks are ignored."""
    return [path for path, problem in _step_entries(run_dir) if problem is None]


ABSENT = (0, 0, 0)  # the identity of a path that names nothing


def folder_identity(path: Path) -> tuple[int, int, int]:
    """Which folder `path` names right now: swapped for a symlink or another folder
    mid-load, it names something else, and what was verified is not what was asked for;
    removed (renamed away by pruning), it names nothing: `ABSENT`."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return ABSENT
    return (info.st_mode, info.st_dev, info.st_ino)
