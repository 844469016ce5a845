"""Writing a step folder: everything checked and serialised first, then built under a
hidden name, fsynced, sealed with the manifest, renamed into place, and older steps pruned."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import JsonValue
from safetensors import SafetensorError

from fragment_llm.checkpoint.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    ADAPTER_FORMAT,
    CONFIG_FILE,
    CONFIG_MAX_BYTES,
    FORMAT,
    JSON_MAX_DEPTH,
    KNOWN_FILES,
    MANIFEST_FILE,
    MODEL_FILE,
    MODEL_FORMAT,
    OPTIMIZER_FILE,
    OPTIMIZER_FORMAT,
    TOKENIZER_FILE,
    TOKENIZER_MAX_BYTES,
    TRAINER_STATE_FILE,
    TRAINER_STATE_MAX_BYTES,
    VERSION,
    _step_of,
    list_checkpoints,
    step_path,
)
from fragment_llm.checkpoint.optimizer import (
    flatten_optimizer_state,
)
from fragment_llm.checkpoint.records import (
    CheckpointConfig,
    Manifest,
    Provenance,
    TrainerState,
    _validate_manifest,
    _validate_provenance,
)
from fragment_llm.checkpoint.tensors import (
    _for_disk,
    _refuse_non_finite,
    model_tensors,
)
from fragment_llm.errors import CheckpointError, OutputError
from fragment_llm.safety.files import (
    dump_json,
    parse_json_guarded,
    read_capped,
    sha256_file,
    staged_dir,
    temp_name_for,
    translate_os_errors,
)


def build_manifest(folder: Path, step: int, provenance: Mapping[str, str]) -> Manifest:
    """Hash every known file present in `folder` into a sealed manifest (not written)."""
    files = {}
    for name in sorted(KNOWN_FILES - {MANIFEST_FILE}):
        if (folder / name).exists():
            files[name] = {"sha256": sha256_file(folder / name, CheckpointError),
                           "size": (folder / name).stat().st_size}
    body = {"format": FORMAT, "version": VERSION, "step": step, "files": files,
            "provenance": dict(provenance)}
    return _validate_manifest({**body, "checksum": Manifest.body_checksum(body)},
                              folder / MANIFEST_FILE)


@dataclass(frozen=True)
class AdapterWeights:
    """What an adapter step folder holds instead of the whole model: the adapter's own
    tensors and its config (finetune/artifact.py writes both)."""

    tensors: dict[str, torch.Tensor]
    config: Mapping[str, JsonValue]


@dataclass
class _Payload:
    """Everything a checkpoint holds, checked and serialised before a byte is written."""

    model: dict[str, torch.Tensor]
    model_meta: dict[str, str]
    optimizer: dict[str, torch.Tensor] | None
    optimizer_meta: dict[str, str]
    texts: dict[str, bytes] = field(default_factory=dict)
    weights_file: str = MODEL_FILE


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module | None,
                    optimizer: torch.optim.Optimizer | None,
                    trainer_state: TrainerState | Mapping[str, Any],
                    config: CheckpointConfig | Mapping[str, Any], tokenizer_file: Path,
                    provenance: Provenance | Mapping[str, str] | None = None,
                    keep_last: int = 3, adapter: AdapterWeights | None = None) -> Path:
    """Write `run_dir/step-NNNNNNN/` atomically, then prune to the newest `keep_last`.

    With `adapter`, the folder holds the adapter (its tensors and config) instead of
    the model's weights; `optimizer` is then the adapter's.

    The records are written as `document()` gives them, so loading the step gives back
    the same records; a plain mapping is written as it is (tests build odd ones).

    The folder is built under a hidden temporary name, every file fsynced, then renamed
    into place (replacing a same-step folder); a crash leaves only the temporary, which
    `clean_stale_temporaries` removes. Disk full raises `OutputError`; a NaN/inf tensor,
    non-JSON state or a bad step raises `CheckpointError` before anything is written.
    """
    target = step_path(run_dir, step)
    if type(keep_last) is not int or keep_last < 1:
        raise CheckpointError(f"keep_last must be an int >= 1, got {keep_last!r}")
    payload = _prepare(model, optimizer, trainer_state, config, tokenizer_file)
    if adapter is not None:
        _with_adapter(payload, adapter)
    if isinstance(provenance, Provenance):
        provenance = provenance.document()
    sealed = _validate_provenance(provenance or {})
    with staged_dir(target, overwrite=True) as tmp, translate_os_errors(target):
        _write_tensors(tmp / payload.weights_file, payload.model, payload.model_meta)
        if payload.optimizer is not None:
            _write_tensors(tmp / OPTIMIZER_FILE, payload.optimizer, payload.optimizer_meta)
        for name, data in payload.texts.items():
            _write_bytes(tmp / name, data)
        manifest = build_manifest(tmp, step, sealed)
        _write_bytes(tmp / MANIFEST_FILE, manifest.to_json().encode("ascii"))
    _prune(run_dir, keep_last, step)
    return target


def _prepare(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
             trainer_state: TrainerState | Mapping[str, Any],
             config: CheckpointConfig | Mapping[str, Any], tokenizer_file: Path) -> _Payload:
    stored, aliases = ({}, {}) if model is None else model_tensors(model)
    _refuse_non_finite(stored, "model")
    payload = _Payload(_for_disk(stored), {"format": MODEL_FORMAT,
                                           "aliases": _compact_json(aliases)}, None, {})
    if optimizer is not None:
        tensors, layout = flatten_optimizer_state(optimizer.state_dict())
        _refuse_non_finite(tensors, "optimizer")
        payload.optimizer = _for_disk(tensors)
        payload.optimizer_meta = {"format": OPTIMIZER_FORMAT, "layout": _compact_json(layout)}
    payload.texts[CONFIG_FILE] = _json_bytes(config, CONFIG_FILE, CONFIG_MAX_BYTES)
    payload.texts[TRAINER_STATE_FILE] = _json_bytes(trainer_state, TRAINER_STATE_FILE,
                                                    TRAINER_STATE_MAX_BYTES)
    payload.texts[TOKENIZER_FILE] = read_capped(tokenizer_file, TOKENIZER_MAX_BYTES,
                                                CheckpointError)
    return payload


def _with_adapter(payload: _Payload, adapter: AdapterWeights) -> None:
    _refuse_non_finite(adapter.tensors, "adapter")
    payload.model = _for_disk(adapter.tensors)
    payload.model_meta = {"format": ADAPTER_FORMAT}
    payload.weights_file = ADAPTER_FILE
    payload.texts[ADAPTER_CONFIG_FILE] = _json_bytes(adapter.config, ADAPTER_CONFIG_FILE,
                                                     CONFIG_MAX_BYTES)


def _compact_json(obj: JsonValue) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _json_bytes(obj: TrainerState | CheckpointConfig | Mapping[str, Any], name: str,
                cap: int) -> bytes:
    """Serialise and prove the loader will read back exactly `obj` (no tuples, int keys)."""
    if isinstance(obj, (TrainerState, CheckpointConfig)):
        obj = obj.document()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{name} must be a dict, got {type(obj).__name__}")
    try:
        text = dump_json(dict(obj))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{name} is not JSON-serialisable ({exc})") from None
    data = text.encode("ascii")
    if len(data) > cap:
        raise CheckpointError(f"{name} is {len(data)} bytes, over the {cap}-byte cap")
    if parse_json_guarded(data, name, CheckpointError, JSON_MAX_DEPTH) != dict(obj):
        raise CheckpointError(f"{name} does not round-trip through JSON",
                              hint="use lists instead of tuples and strings as dict keys")
    return data


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor],
                   metadata: dict[str, str]) -> None:
    try:
        safetensors.torch.save_file(tensors, path, metadata=metadata)
    except SafetensorError as exc:  # the library reports I/O failures as its own type
        if f"(os error {errno.ENOSPC})" in str(exc):
            # A plain OSError, so save_checkpoint reports "disk full" for the step folder
            # rather than the library's text about a hidden temporary file.
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise OutputError(f"cannot write {path}: {exc}") from None


def _write_bytes(path: Path, data: bytes) -> None:
    # fsync happens for the whole folder in staged_dir, before the rename.
    with open(path, "xb") as fh:
        fh.write(data)


def _prune(run_dir: Path, keep_last: int, newest: int) -> None:
    """Keep `newest` and the `keep_last - 1` steps before it. Higher steps (an abandoned
    future after resuming from an older checkpoint) are the trainer's call, not ours."""
    older = [p for p in list_checkpoints(run_dir) if _step_of(p) < newest]
    for path in older[:max(0, len(older) - (keep_last - 1))]:
        # Rename first: a crash mid-delete leaves a hidden temporary, not a damaged step.
        doomed = temp_name_for(path)
        with translate_os_errors(path):
            os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
