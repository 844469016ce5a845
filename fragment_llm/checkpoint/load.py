"""Loading a checkpoint folder as hostile input, and finding the newest valid one.

The loader never calls `torch.load` or unpickles anything, and it refuses a folder
before allocating tensors when names, shapes or dtypes disagree with the module or
optimizer they are meant for. Its JSON files become typed records (records.py).

It does not own the folder's file names (layout.py), writing one (save.py), building a
model from its config (trained.py), or checking the tokenizer copy against the
provenance (provenance.py). See docs/checkpoints.md.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from fragment_llm.checkpoint.layout import (
    ABSENT,
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    ADAPTER_FORMAT,
    ADAPTER_REQUIRED_FILES,
    CONFIG_FILE,
    CONFIG_MAX_BYTES,
    DEFAULT_MAX_BYTES,
    JSON_MAX_DEPTH,
    KNOWN_FILES,
    MANIFEST_FILE,
    MANIFEST_MAX_BYTES,
    MODEL_FILE,
    OPTIMIZER_FILE,
    PICKLE_SUFFIXES,
    REQUIRED_FILES,
    STEP_NAME,
    TOKENIZER_FILE,
    TRAINER_STATE_FILE,
    TRAINER_STATE_MAX_BYTES,
    _step_entries,
    folder_identity,
)
from fragment_llm.checkpoint.optimizer import (
    IMPLEMENTATION_FLAGS,
    _check_optimizer_layout,
    _parse_optimizer_layout,
    unflatten_optimizer_state,
)
from fragment_llm.checkpoint.records import (
    CheckpointConfig,
    Document,
    FileEntry,
    Manifest,
    Provenance,
    TrainerState,
    _validate_manifest,
    model_config_sha256,
    read_document,
)
from fragment_llm.checkpoint.tensors import (
    _DTYPE_NAMES,
    SafetensorsHeader,
    _check_model_layout,
    _parse_aliases,
    _refuse_non_finite_file,
    _unwrap,
    _views_of,
    read_safetensors_header,
)
from fragment_llm.errors import CheckpointError
from fragment_llm.safety.files import (
    parse_json_guarded,
    read_capped,
    sha256_bytes,
    sha256_file,
)

# -------------------------------------------------------------------------- manifest


def _read_manifest(folder: Path) -> tuple[Manifest, str]:
    """The manifest, and the sha256 of its bytes."""
    path = folder / MANIFEST_FILE
    if not os.path.lexists(path):
        raise CheckpointError(f"missing {MANIFEST_FILE}, in {folder}",
                              hint="the save was interrupted or the folder is not a checkpoint")
    raw = read_capped(path, MANIFEST_MAX_BYTES, CheckpointError)
    doc = parse_json_guarded(raw, str(path), CheckpointError, max_depth=8)
    manifest = _validate_manifest(doc, path)
    if Manifest.body_checksum(doc) != manifest.checksum:
        raise CheckpointError(f"manifest checksum mismatch (edited or damaged), in {path}")
    named = STEP_NAME.fullmatch(folder.name)
    if named and int(named.group(1)) != manifest.step:
        raise CheckpointError(f"manifest says step {manifest.step} but the folder is "
                              f"{folder.name}, in {path}")
    return manifest, sha256_bytes(raw)


# --------------------------------------------------------------------------- finding


def latest_valid_checkpoint(run_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
                            ) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, loaded (its files hashed and scanned once),
    and each newer one skipped with its reason."""
    skipped: list[tuple[Path, str]] = []
    for path, problem in reversed(_step_entries(run_dir)):
        if problem is not None:
            skipped.append((path, problem))
            continue
        try:
            return load_checkpoint(path, max_bytes=max_bytes), skipped
        except CheckpointError as exc:
            if isinstance(exc, CheckpointRemovedError) or not os.path.lexists(path):
                continue  # pruned by a running trainer since the listing: gone, not damaged
            skipped.append((path, exc.message))
    return None, skipped


def find_latest_valid(run_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES
                      ) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies (its path), and each newer one skipped."""
    found, skipped = latest_valid_checkpoint(run_dir, max_bytes=max_bytes)
    return (found.path if found is not None else None), skipped


HINT_TRAIN_FIRST = ("train a model first with `fragment train` (it writes checkpoints/), "
                    "or pass --checkpoint with a run folder or one of its step folders")


def resolve_checkpoint(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                       on_skip: Callable[[Path, str], None] | None = None) -> Path:
    """A run folder -> its latest valid checkpoint; a step folder -> itself.

    `on_skip(path, reason)` hears about each damaged newer checkpoint passed over.
    """
    _check_folder(path)
    if _is_step_folder(path):
        return path
    return open_checkpoint(path, max_bytes=max_bytes, on_skip=on_skip).path


def _is_step_folder(path: Path) -> bool:
    return bool(STEP_NAME.fullmatch(path.name)) or os.path.lexists(path / MANIFEST_FILE)


def open_checkpoint(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                    on_skip: Callable[[Path, str], None] | None = None) -> Checkpoint:
    """`resolve_checkpoint`, loaded: a step folder, or a run folder's latest valid step,
    verified once (not once to choose it and again to load it)."""
    _check_folder(path)
    if _is_step_folder(path):
        return load_checkpoint(path, max_bytes=max_bytes)
    found, skipped = latest_valid_checkpoint(path, max_bytes=max_bytes)
    for skipped_path, reason in skipped if on_skip is not None else ():
        on_skip(skipped_path, reason)
    if found is not None:
        return found
    if not skipped:  # a run folder with no steps yet, such as a fresh clone's checkpoints/
        raise CheckpointError(f"no valid checkpoint in {path} (no step-NNNNNNN folders)",
                              hint=HINT_TRAIN_FIRST)
    detail = "; ".join(f"{p.name}: {r}" for p, r in skipped)
    raise CheckpointError(f"no valid checkpoint in {path} ({detail})",
                          hint="pass a run folder holding step-NNNNNNN folders, or one "
                               "step folder")


# --------------------------------------------------------------------------- loading


def _check_folder(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}", hint=HINT_TRAIN_FIRST) from None
    if stat.S_ISLNK(mode):
        raise CheckpointError(f"refusing to follow a symlink: {path}",
                              hint="pass the real folder path")
    if not stat.S_ISDIR(mode):
        raise CheckpointError(f"not a checkpoint folder: {path}",
                              hint="pass a run folder or one of its step-NNNNNNN folders")


def _check_entries(folder: Path) -> set[str]:
    """Every entry must be a regular file (not a symlink, FIFO or folder) with a known name."""
    names = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.lower().endswith(PICKLE_SUFFIXES):
                raise CheckpointError(f"refusing {entry.name}: pickle-capable formats are "
                                      f"never loaded, in {folder}",
                                      hint="checkpoints hold only safetensors and JSON")
            if entry.name not in KNOWN_FILES:
                raise CheckpointError(f"unexpected file {entry.name!r}, in {folder}")
            if entry.is_symlink():
                raise CheckpointError(f"refusing to follow a symlink: {entry.name}, in {folder}")
            if not entry.is_file(follow_symlinks=False):
                raise CheckpointError(f"{entry.name} is not a regular file, in {folder}")
            names.add(entry.name)
    return names


def _verify_file(path: Path, entry: FileEntry, max_bytes: int) -> None:
    """Size first (cheap, and refuses a huge file unread), then sha256."""
    size = os.lstat(path).st_size
    if size != entry.size:
        raise CheckpointError(f"size mismatch for {path.name}: {size} bytes, the manifest "
                              f"says {entry.size}, in {path.parent}")
    if sha256_file(path, CheckpointError, max_bytes) != entry.sha256:
        raise CheckpointError(f"sha256 mismatch for {path.name} (damaged or tampered with), "
                              f"in {path.parent}")


def _read_verified(path: Path, entry: FileEntry, max_bytes: int) -> bytes:
    """Read once and check what was read, so the bytes used are the bytes verified."""
    data = read_capped(path, max_bytes, CheckpointError)
    if len(data) != entry.size or sha256_bytes(data) != entry.sha256:
        raise CheckpointError(f"{path.name} changed since its manifest was written (size or "
                              f"sha256 mismatch), in {path.parent}")
    return data


def _read_record(record: type[Document], path: Path, entry: FileEntry, cap: int
                 ) -> Document:
    doc = parse_json_guarded(_read_verified(path, entry, cap), str(path), CheckpointError,
                             JSON_MAX_DEPTH)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path.name} must hold a JSON object, in {path.parent}")
    return read_document(record, doc, path)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder. Tensors are read only by `load_*_into`, after the
    header has been checked against the target, and re-hashed as they are read (the
    folder may have been replaced by a running trainer in between)."""

    path: Path
    step: int
    config: CheckpointConfig
    trainer_state: TrainerState
    provenance: Provenance
    files: dict[str, FileEntry]
    model_header: SafetensorsHeader
    model_aliases: dict[str, str]
    optimizer_header: SafetensorsHeader | None
    optimizer_layout: dict[str, Any] | None
    max_bytes: int = DEFAULT_MAX_BYTES
    manifest_sha256: str = ""  # of manifest.json's bytes: this step folder's identity
    # An adapter's step folder (layout.py): `model_header` is adapter.safetensors's.
    weights_file: str = MODEL_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def is_adapter(self) -> bool:
        return self.weights_file == ADAPTER_FILE

    def read_adapter_config(self) -> dict[str, Any]:
        """adapter_config.json, verified against the manifest; its fields are checked by
        finetune/artifact.py (which knows what an adapter needs)."""
        path = self.path / ADAPTER_CONFIG_FILE
        doc = parse_json_guarded(_read_verified(path, self.files[ADAPTER_CONFIG_FILE],
                                                CONFIG_MAX_BYTES),
                                 str(path), CheckpointError, JSON_MAX_DEPTH)
        if not isinstance(doc, dict):
            raise CheckpointError(f"{path.name} must hold a JSON object, in {self.path}")
        return doc

    def read_weights(self) -> dict[str, torch.Tensor]:
        """The weights file's tensors as read (and re-hashed) now; the caller has checked
        the header against what it will copy them into."""
        where = self.path / self.weights_file
        data = _read_verified(where, self.files[self.weights_file], self.max_bytes)
        return _views_of(data, self.model_header, where)

    @property
    def has_optimizer(self) -> bool:
        return self.optimizer_header is not None

    def require_model(self) -> None:
        """Refuse an adapter's step folder where a whole model is needed, before its
        config is used to plan or build one."""
        if self.is_adapter:
            raise CheckpointError(f"{self.path} holds an adapter, not a model",
                                  hint="pass the base checkpoint, and this folder as --adapter")

    def load_model_into(self, model: torch.nn.Module) -> None:
        """Copy the weights into `model` (same names, shapes, dtypes and tying, or refused)."""
        self.require_model()
        target = _unwrap(model).state_dict()
        _check_model_layout(self.model_header, self.model_aliases, target,
                            self.path / MODEL_FILE)
        tensors = self.read_weights()
        with torch.no_grad():
            for name, value in tensors.items():
                target[name].copy_(value)  # state_dict tensors share the parameters' memory

    def load_optimizer_into(self, optimizer: torch.optim.Optimizer) -> None:
        """Restore the optimizer exactly; it must be built over the loaded model's parameters."""
        if self.optimizer_header is None or self.optimizer_layout is None:
            raise CheckpointError(f"no {OPTIMIZER_FILE} in {self.path}",
                                  hint="this checkpoint holds weights only; start a new run")
        where = self.path / OPTIMIZER_FILE
        skeleton = unflatten_optimizer_state(self.optimizer_header.tensors,
                                             self.optimizer_layout)
        _check_optimizer_layout(skeleton, optimizer, where)
        tensors = self._load_tensors(OPTIMIZER_FILE, self.optimizer_header)
        # How this device runs the step stays this device's choice: a run saved on a
        # GPU (fused) resumes on a CPU, and one saved before CPUs got fused as well.
        chosen = [{key: group[key] for key in IMPLEMENTATION_FLAGS if key in group}
                  for group in optimizer.param_groups]
        try:
            optimizer.load_state_dict(unflatten_optimizer_state(tensors, self.optimizer_layout))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"optimizer refused the state ({exc}), in {where}") from None
        for group, flags in zip(optimizer.param_groups, chosen, strict=True):
            group.update(flags)

    def _load_tensors(self, name: str, header: SafetensorsHeader) -> dict[str, torch.Tensor]:
        path = self.path / name
        data = _read_verified(path, self.files[name], self.max_bytes)
        try:
            tensors = load_safetensors_bytes(data)  # parses bytes; never torch's unpickler
        except SafetensorError as exc:
            raise CheckpointError(f"safetensors refused the file ({exc}), in {path}") from None
        loaded = {k: (_DTYPE_NAMES.get(t.dtype), tuple(t.shape)) for k, t in tensors.items()}
        if loaded != {k: (s.dtype, s.shape) for k, s in header.tensors.items()}:
            raise CheckpointError(f"safetensors read tensors that differ from the checked "
                                  f"header, in {path}")
        return tensors


class CheckpointRemovedError(CheckpointError):
    """The step folder was removed (or replaced) while it was being read: not damage,
    but a running trainer pruning old checkpoints (`keep_checkpoints`) or re-saving one."""


def load_checkpoint(path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Checkpoint:
    """Verify a step folder as hostile input and return it, tensors not yet loaded.

    Order: the folder itself, its entries, the manifest, the file set, each file's size
    and sha256, the JSON files, both safetensors headers, then every floating-point
    value (streamed: NaN or inf is refused). docs/checkpoints.md. A folder that is gone
    or another one by the end raises `CheckpointRemovedError`, whatever failed on the way.
    """
    _check_folder(path)
    identity = folder_identity(path)
    try:
        checkpoint = _load_verified(path, max_bytes)
    except (CheckpointError, OSError) as exc:
        if folder_identity(path) != identity:
            raise _removed(path) from None
        if isinstance(exc, OSError):  # the folder is still there: a real read error
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
        raise
    if folder_identity(path) != identity:
        raise _removed(path)
    _check_model_config_hash(checkpoint)
    return checkpoint


def _removed(path: Path) -> CheckpointRemovedError:
    what = ("removed while being verified (a running trainer prunes old checkpoints)"
            if folder_identity(path) == ABSENT else
            "replaced while being verified (by a symlink or another folder)")
    return CheckpointRemovedError(f"{path} was {what}",
                                  hint="load it again once nothing writes there")


def _load_verified(path: Path, max_bytes: int) -> Checkpoint:
    present = _check_entries(path)
    manifest, manifest_sha256 = _read_manifest(path)
    listed = set(manifest.files)
    adapter = ADAPTER_FILE in listed or ADAPTER_FILE in present
    required = ADAPTER_REQUIRED_FILES if adapter else REQUIRED_FILES
    if adapter and MODEL_FILE in present | listed:
        raise CheckpointError(f"both {MODEL_FILE} and {ADAPTER_FILE}: a step folder holds a "
                              f"model or an adapter, in {path}")
    if missing := sorted((required | listed) - present):
        raise CheckpointError(f"missing {', '.join(missing)}, in {path}")
    if unlisted := sorted(present - listed - {MANIFEST_FILE}):
        raise CheckpointError(f"{', '.join(unlisted)} not listed in the manifest, in {path}")
    for name, entry in sorted(manifest.files.items()):
        _verify_file(path / name, entry, max_bytes)
    files = dict(manifest.files)
    weights_file = ADAPTER_FILE if adapter else MODEL_FILE
    model_header = read_safetensors_header(path / weights_file)
    opt_header = (read_safetensors_header(path / OPTIMIZER_FILE)
                  if OPTIMIZER_FILE in files else None)
    checkpoint = Checkpoint(
        path=path, step=manifest.step,
        config=_read_record(CheckpointConfig, path / CONFIG_FILE, files[CONFIG_FILE],
                            CONFIG_MAX_BYTES),
        trainer_state=_read_record(TrainerState, path / TRAINER_STATE_FILE,
                                   files[TRAINER_STATE_FILE], TRAINER_STATE_MAX_BYTES),
        provenance=Provenance.model_validate(manifest.provenance), files=files,
        model_header=model_header,
        model_aliases=(_adapter_aliases(model_header, path / ADAPTER_FILE) if adapter else
                       _parse_aliases(model_header, path / MODEL_FILE)),
        optimizer_header=opt_header,
        optimizer_layout=(_parse_optimizer_layout(opt_header, path / OPTIMIZER_FILE)
                          if opt_header is not None else None),
        max_bytes=max_bytes, manifest_sha256=manifest_sha256, weights_file=weights_file)
    _refuse_non_finite_file(path / weights_file, model_header)
    if opt_header is not None:  # `train --resume` would step from NaN moments
        _refuse_non_finite_file(path / OPTIMIZER_FILE, opt_header)
    return checkpoint


def _adapter_aliases(header: SafetensorsHeader, where: Path) -> dict[str, str]:
    """adapter.safetensors names its format and nothing else: an adapter's tensors are
    never tied, so it has no aliases (a renamed model file is refused here)."""
    if header.metadata != {"format": ADAPTER_FORMAT}:
        raise CheckpointError(f"adapter __metadata__ must be exactly "
                              f"format={ADAPTER_FORMAT!r}, in {where}")
    return {}


def _check_model_config_hash(checkpoint: Checkpoint) -> None:
    # A config.json edited and its manifest re-sealed passes every file hash; only the
    # provenance recorded at save time tells, and a run folder must then fall back to
    # the previous step rather than pick this one (find_latest_valid calls us).
    recorded = checkpoint.provenance.model_config_sha256
    actual = model_config_sha256(checkpoint.config.model)
    if recorded is not None and recorded != actual:
        raise CheckpointError(f"config.json's model table hashes to {actual[:16]}… but the "
                              f"checkpoint recorded {recorded[:16]}… when it was saved, in "
                              f"{checkpoint.path}", hint="the checkpoint was edited after it "
                              "was saved; use another checkpoint")
