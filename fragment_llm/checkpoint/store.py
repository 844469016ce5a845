"""Checkpoints: one folder per step, safetensors tensors + JSON state + a sha256 manifest.

Owns the pinned layout of `RUN/step-0000100/`, atomic saving with pruning, finding the
latest valid checkpoint, and loading a folder as hostile input. The loader never calls
`torch.load` or unpickles anything, and it refuses a folder before allocating tensors
when names, shapes or dtypes disagree with the module or optimizer they are meant for.

It does not own what goes into `trainer_state.json` or `config.json` (the trainer's
dicts), building a model from a config (`model.py`), or checking the tokenizer copy
(`Tokenizer.load(ckpt.tokenizer_path)` does that). See docs/checkpoints.md.
"""

from __future__ import annotations

import base64
import binascii
import errno
import json
import math
import os
import random
import re
import shutil
import stat
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from fragment_llm.errors import CheckpointError, OutputError
from fragment_llm.safety.files import (
    OLD_MARKER,
    TEMP_MARKER,
    dump_json,
    open_regular,
    parse_json_guarded,
    read_capped,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
    staged_dir,
    temp_name_for,
    translate_os_errors,
)
from fragment_llm.safety.text import escape_for_display

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
REQUIRED_FILES = frozenset({MODEL_FILE, TRAINER_STATE_FILE, CONFIG_FILE, TOKENIZER_FILE})
KNOWN_FILES = REQUIRED_FILES | {OPTIMIZER_FILE, MANIFEST_FILE}
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

# The safetensors dtypes a checkpoint may hold; anything else is refused unread.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_TUPLE_TAG = "__tuple__"
_TENSOR_TAG = "__tensor__"

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ProvenanceKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
# Printable ASCII only: provenance values end up in terminal output.
ProvenanceValue = Annotated[str, StringConstraints(pattern=r"^[\x20-\x7e]{0,4096}$")]
Provenance = Annotated[dict[ProvenanceKey, ProvenanceValue], Field(max_length=64)]
FileName = Literal["model.safetensors", "optimizer.safetensors", "trainer_state.json",
                   "config.json", "tokenizer.json"]


# -------------------------------------------------------------------------- manifest


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    sha256: Sha256
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """`manifest.json`: what the folder must hold, byte for byte.

    `checksum` is the sha256 of this manifest's canonical JSON without `checksum`, so a
    flipped byte in the manifest itself is refused too, not only in the files it lists.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    format: Literal["fragment-checkpoint"]
    version: Literal[1]
    step: int = Field(ge=0, le=MAX_STEP)
    files: dict[FileName, FileEntry]
    provenance: Provenance
    checksum: Sha256

    @staticmethod
    def body_checksum(body: Mapping[str, Any]) -> str:
        return sha256_bytes(dump_json({k: v for k, v in body.items() if k != "checksum"})
                            .encode("ascii"))

    def to_json(self) -> str:
        return dump_json(self.model_dump(mode="json"))


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


def _validate_manifest(doc: Any, where: Path) -> Manifest:
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        raise CheckpointError(f"manifest breaks the schema ({_first_errors(exc)}), in {where}",
                              hint="the checkpoint is damaged or was not written by fragment"
                              ) from None


def _loc_text(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as one harmless line: its keys come from the file."""
    return escape_for_display(".".join(str(part) for part in loc))


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = [f"{_loc_text(e['loc']) or 'top level'}: {e['msg']}"
             for e in exc.errors()[:limit]]
    return "; ".join(parts)


def _read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_FILE
    if not os.path.lexists(path):
        raise CheckpointError(f"missing {MANIFEST_FILE}, in {folder}",
                              hint="the save was interrupted or the folder is not a checkpoint")
    doc = parse_json_guarded(read_capped(path, MANIFEST_MAX_BYTES, CheckpointError),
                             str(path), CheckpointError, max_depth=8)
    manifest = _validate_manifest(doc, path)
    if Manifest.body_checksum(doc) != manifest.checksum:
        raise CheckpointError(f"manifest checksum mismatch (edited or damaged), in {path}")
    named = STEP_NAME.fullmatch(folder.name)
    if named and int(named.group(1)) != manifest.step:
        raise CheckpointError(f"manifest says step {manifest.step} but the folder is "
                              f"{folder.name}, in {path}")
    return manifest


# ------------------------------------------------------------------ safetensors header


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as its header describes it; `begin`/`end` index the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorSpec]
    metadata: dict[str, str]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and check a safetensors header ourselves, reading only the header bytes.

    The library tolerates things we do not (duplicate names: the last one wins), so
    this runs before the file is ever handed to it.
    """
    fd = open_regular(path, CheckpointError)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        length = _header_length(fh.read(8), size, path)
        raw = fh.read(length)
    if len(raw) != length:
        raise CheckpointError(f"safetensors header truncated while reading, in {path}")
    return _parse_header(raw, size - 8 - length, path)


def _header_length(prefix: bytes, file_size: int, where: Path) -> int:
    """Bytes 0..8 are the header length, unsigned 64-bit little-endian."""
    if len(prefix) < 8:
        raise CheckpointError(f"safetensors file shorter than its 8-byte header length, "
                              f"in {where}")
    length = int.from_bytes(prefix, "little")
    if length > HEADER_MAX_BYTES:
        raise CheckpointError(f"safetensors header length {length} exceeds the "
                              f"{HEADER_MAX_BYTES}-byte cap, in {where}")
    if 8 + length > file_size:
        raise CheckpointError(f"safetensors header length {length} does not fit in the "
                              f"{file_size}-byte file, in {where}")
    return length


def _parse_header(raw: bytes, data_len: int, where: Path) -> SafetensorsHeader:
    doc = parse_json_guarded(raw, f"the safetensors header of {where}", CheckpointError,
                             max_depth=4)
    if not isinstance(doc, dict):
        raise CheckpointError(f"safetensors header is not a JSON object, in {where}")
    metadata = _header_metadata(doc.pop("__metadata__", {}), where)
    if len(doc) > MAX_TENSORS:
        raise CheckpointError(f"safetensors header lists {len(doc)} tensors, more than "
                              f"{MAX_TENSORS}, in {where}")
    tensors = {name: _tensor_spec(name, entry, where) for name, entry in doc.items()}
    _check_coverage(tensors, data_len, where)
    return SafetensorsHeader(tensors, metadata)


def _header_metadata(value: Any, where: Path) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CheckpointError(f"safetensors __metadata__ must map strings to strings, "
                              f"in {where}")
    return value


def _tensor_spec(name: str, entry: Any, where: Path) -> TensorSpec:
    if not 0 < len(name) <= MAX_NAME_CHARS:
        raise CheckpointError(f"tensor name of {len(name)} characters refused, in {where}")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"tensor {name!r} must have exactly dtype, shape and "
                              f"data_offsets, in {where}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list is unhashable
        raise CheckpointError(f"tensor {name!r} has dtype {dtype!r}, not one of "
                              f"{', '.join(DTYPES)}, in {where}")
    if not _int_list(shape, max_len=MAX_DIMS) or not _int_list(offsets, exact_len=2) \
            or offsets[0] > offsets[1]:
        raise CheckpointError(f"tensor {name!r} needs a shape of at most {MAX_DIMS} "
                              f"non-negative ints and data_offsets [begin, end], in {where}")
    if math.prod(shape) * DTYPES[dtype].itemsize != offsets[1] - offsets[0]:
        raise CheckpointError(f"tensor {name!r} shape {shape} of {dtype} does not match its "
                              f"{offsets[1] - offsets[0]}-byte data span, in {where}")
    return TensorSpec(dtype, tuple(shape), offsets[0], offsets[1])


def _int_list(value: Any, max_len: int | None = None, exact_len: int | None = None) -> bool:
    # `type(x) is int`: JSON true/false must not pass as 1/0.
    return (isinstance(value, list) and all(type(x) is int and x >= 0 for x in value)
            and (max_len is None or len(value) <= max_len)
            and (exact_len is None or len(value) == exact_len))


def _check_coverage(tensors: Mapping[str, TensorSpec], data_len: int, where: Path) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing past the end."""
    cursor = 0
    for name, spec in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if spec.end > data_len:
            raise CheckpointError(f"tensor {name!r} data_offsets end at {spec.end}, past the "
                                  f"{data_len}-byte data section, in {where}")
        if spec.begin < cursor:
            raise CheckpointError(f"tensor {name!r} data_offsets overlap another tensor, "
                                  f"in {where}")
        if spec.begin > cursor:
            raise CheckpointError(f"data section has a gap before tensor {name!r} (offsets "
                                  f"do not cover it exactly), in {where}")
        cursor = spec.end
    if cursor != data_len:
        raise CheckpointError(f"tensors cover {cursor} of the {data_len} data bytes (offsets "
                              f"do not cover it exactly), in {where}")


def _check_spec(name: str, spec: TensorSpec, target: torch.Tensor, where: Path) -> None:
    expected = _DTYPE_NAMES.get(target.dtype, str(target.dtype))
    if spec.dtype != expected:
        raise CheckpointError(f"tensor {name!r} is {spec.dtype} in {where}, the target "
                              f"expects {expected}", hint=_REBUILD_HINT)
    if spec.shape != tuple(target.shape):
        raise CheckpointError(f"tensor {name!r} has shape {list(spec.shape)} in {where}, the "
                              f"target expects {list(target.shape)}", hint=_REBUILD_HINT)


_PROVENANCE: TypeAdapter[dict[str, str]] = TypeAdapter(Provenance,
                                                       config=ConfigDict(strict=True))
_REBUILD_HINT = ("build the model from this checkpoint's config.json (and its tokenizer.json "
                 "for the vocabulary) instead of the current settings")


# ------------------------------------------------------------------- model tensors


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """DDP wraps a model as `.module`, torch.compile as `._orig_mod`; checkpoints hold the
    plain model's names, so both save and load look through the wrappers here, once."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _alias_key(name: str, tensor: torch.Tensor) -> tuple[Any, ...]:
    """Two state-dict names are aliases when they are the same view of the same memory
    (a tied `lm_head.weight` is the embedding's Parameter)."""
    if tensor.numel() == 0:  # empty tensors may all report data_ptr 0
        return ("empty", name)
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def _alias_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """`{"wte.weight": W, "lm_head.weight": W, "b": B}`
    -> `[["wte.weight", "lm_head.weight"], ["b"]]`."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(_alias_key(name, tensor), []).append(name)
    return list(groups.values())


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with aliases removed, plus `{alias: stored name}`.

    safetensors refuses shared storage; the first name of each group (registration
    order) is stored and the others are recorded so loading can check the tying.
    """
    state = _unwrap(model).state_dict()
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for group in _alias_groups(state):
        stored[group[0]] = state[group[0]]
        aliases.update({name: group[0] for name in group[1:]})
    return stored, aliases


def _partition(names: Iterable[str], root_of: Callable[[str], Any]) -> set[frozenset[str]]:
    groups: dict[Any, set[str]] = {}
    for name in names:
        groups.setdefault(root_of(name), set()).add(name)
    return {frozenset(g) for g in groups.values()}


def _check_model_layout(header: SafetensorsHeader, aliases: Mapping[str, str],
                        target: Mapping[str, torch.Tensor], where: Path) -> None:
    saved = set(header.tensors) | set(aliases)
    _check_names(saved, set(target), where)
    keys = {name: _alias_key(name, tensor) for name, tensor in target.items()}
    if _partition(saved, lambda n: aliases.get(n, n)) != _partition(target, keys.__getitem__):
        raise CheckpointError(f"weight tying differs: {where} ties "
                              f"{sorted(aliases.items()) or 'nothing'}, the model does not "
                              f"match", hint=_REBUILD_HINT)
    for name, spec in header.tensors.items():
        _check_spec(name, spec, target[name], where)


def _check_names(saved: set[str], expected: set[str], where: Path) -> None:
    if missing := sorted(expected - saved):
        raise CheckpointError(f"{where} lacks {len(missing)} tensor(s) the model has: "
                              f"{_preview(missing)}", hint=_REBUILD_HINT)
    if extra := sorted(saved - expected):
        raise CheckpointError(f"{where} has {len(extra)} tensor(s) the model does not have: "
                              f"{_preview(extra)}", hint=_REBUILD_HINT)


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _parse_aliases(header: SafetensorsHeader, where: Path) -> dict[str, str]:
    meta = header.metadata
    if set(meta) != {"format", "aliases"} or meta["format"] != MODEL_FORMAT:
        raise CheckpointError(f"model __metadata__ must be exactly format={MODEL_FORMAT!r} and "
                              f"aliases, in {where}")
    aliases = parse_json_guarded(meta["aliases"], f"the aliases metadata of {where}",
                                 CheckpointError, max_depth=2)
    if not isinstance(aliases, dict) or not all(
            isinstance(v, str) and v in header.tensors and k not in header.tensors
            for k, v in aliases.items()):
        raise CheckpointError(f"aliases metadata must map names not stored to stored tensor "
                              f"names, in {where}")
    return aliases


# ------------------------------------------------------------------ optimizer state


def flatten_optimizer_state(state_dict: Mapping[str, Any]
                            ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors and a JSON-safe layout.

    `{"state": {0: {"step": t, "exp_avg": a}}, "param_groups": [{"betas": (0.9, 0.95), ...}]}`
    -> `({"state.0.step": t, "state.0.exp_avg": a},
         {"state": {"0": {"step": {"__tensor__": "state.0.step"}, ...}},
          "param_groups": [{"betas": {"__tuple__": [0.9, 0.95]}, ...}]})`.
    Tuples are tagged so the round trip is exact (`betas` comes back a tuple).
    """
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pid, entry in state_dict["state"].items():
        if type(pid) is not int:
            raise CheckpointError(f"optimizer state key {pid!r} is not a parameter index")
        state[str(pid)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
                state[str(pid)][key] = {_TENSOR_TAG: f"state.{pid}.{key}"}
            else:
                state[str(pid)][key] = _encode(value, f"optimizer state {pid}/{key}")
    groups = [_encode(dict(g), f"optimizer param group {i}")
              for i, g in enumerate(state_dict["param_groups"])]
    return tensors, {"state": state, "param_groups": groups}


def unflatten_optimizer_state(tensors: Mapping[str, Any], layout: Any) -> dict[str, Any]:
    """Inverse of `flatten_optimizer_state`; checks the layout as untrusted input.

    Every tensor must be referenced exactly once. `tensors` may map names to anything
    (the loader passes header `TensorSpec`s first, to check before reading data).
    """
    if not isinstance(layout, dict) or set(layout) != {"state", "param_groups"} \
            or not isinstance(layout["state"], dict) \
            or not isinstance(layout["param_groups"], list):
        raise CheckpointError("optimizer layout must be {state: {...}, param_groups: [...]}")
    used: set[str] = set()
    state = {_param_index(pid): _decode_entry(entry, tensors, used, pid)
             for pid, entry in layout["state"].items()}
    if unused := sorted(set(tensors) - used):
        raise CheckpointError(f"optimizer tensors not referenced by the layout: "
                              f"{_preview(unused)}")
    groups = [_decode_group(g, i) for i, g in enumerate(layout["param_groups"])]
    return {"state": state, "param_groups": groups}


def _param_index(text: str) -> int:
    if not re.fullmatch(r"0|[1-9]\d{0,8}", text):
        raise CheckpointError(f"optimizer state key {text!r} is not a parameter index")
    return int(text)


def _decode_entry(entry: Any, tensors: Mapping[str, Any], used: set[str],
                  pid: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise CheckpointError(f"optimizer state {pid} is not an object")
    out = {}
    for key, value in entry.items():
        if isinstance(value, dict) and set(value) == {_TENSOR_TAG}:
            name = value[_TENSOR_TAG]
            if name not in tensors or name in used:
                raise CheckpointError(f"optimizer state {pid}/{key} references tensor "
                                      f"{name!r}, which is missing or used twice")
            used.add(name)
            out[key] = tensors[name]
        else:
            out[key] = _decode(value, f"optimizer state {pid}/{key}")
    return out


def _decode_group(group: Any, index: int) -> dict[str, Any]:
    decoded = _decode(group, f"optimizer param group {index}")
    params = decoded.get("params") if isinstance(decoded, dict) else None
    if not isinstance(params, list) or not all(type(p) is int for p in params):
        raise CheckpointError(f"optimizer param group {index} needs a list of int params")
    return decoded


def _encode(value: Any, where: str) -> Any:
    """Python value -> JSON value; only what round-trips exactly is accepted."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"refusing a non-finite value {value} at {where}")
        return value
    if isinstance(value, tuple):
        return {_TUPLE_TAG: [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        if _TUPLE_TAG in value or _TENSOR_TAG in value:
            raise CheckpointError(f"reserved key in a value at {where}")
        return {k: _encode(v, f"{where}/{k}") for k, v in value.items()}
    raise CheckpointError(f"cannot store a {type(value).__name__} at {where}",
                          hint="optimizer hyperparameters must be numbers, strings, "
                               "booleans, None, or lists/tuples of them")


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE_TAG} and isinstance(value[_TUPLE_TAG], list):
            return tuple(_decode(v, where) for v in value[_TUPLE_TAG])
        if _TUPLE_TAG in value or _TENSOR_TAG in value:
            raise CheckpointError(f"misplaced {_TUPLE_TAG}/{_TENSOR_TAG} tag at {where}")
        return {k: _decode(v, f"{where}/{k}") for k, v in value.items()}
    return value


def _parse_optimizer_layout(header: SafetensorsHeader, where: Path) -> dict[str, Any]:
    meta = header.metadata
    if set(meta) != {"format", "layout"} or meta["format"] != OPTIMIZER_FORMAT:
        raise CheckpointError(f"optimizer __metadata__ must be exactly "
                              f"format={OPTIMIZER_FORMAT!r} and layout, in {where}")
    layout = parse_json_guarded(meta["layout"], f"the layout metadata of {where}",
                                CheckpointError, max_depth=16)
    try:
        unflatten_optimizer_state(header.tensors, layout)  # structure only: specs, no data
    except CheckpointError as exc:
        raise CheckpointError(f"{exc.message}, in {where}") from None
    return layout


# Param-group keys that pick how a step is computed (one kernel per tensor, per list, or
# fused), not what it computes: a saved value neither has to match nor is restored.
IMPLEMENTATION_FLAGS = ("foreach", "fused")


def _check_optimizer_layout(skeleton: Mapping[str, Any], optimizer: torch.optim.Optimizer,
                            where: Path) -> None:
    """Groups, parameter counts, hyperparameter keys and state shapes must fit `optimizer`."""
    target = optimizer.state_dict()["param_groups"]
    saved = skeleton["param_groups"]
    if len(saved) != len(target):
        raise CheckpointError(f"{where} has {len(saved)} param group(s), the optimizer has "
                              f"{len(target)}", hint=_REBUILD_HINT)
    for i, (s, t) in enumerate(zip(saved, target, strict=True)):
        if s["params"] != t["params"]:
            raise CheckpointError(f"param group {i} in {where} holds {len(s['params'])} "
                                  f"parameters, the optimizer's holds {len(t['params'])}",
                                  hint=_REBUILD_HINT)
        if set(s) != set(t):
            raise CheckpointError(f"param group {i} in {where} has keys {sorted(s)}, the "
                                  f"optimizer's has {sorted(t)}",
                                  hint="resume with the same optimizer and torch version")
        for key in sorted(set(s) - {"params"}):
            if key not in IMPLEMENTATION_FLAGS:
                _check_hyperparameter(i, key, s[key], t[key], where)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, entry in skeleton["state"].items():
        _check_param_state(pid, entry, params, where)


def _check_hyperparameter(group: int, key: str, saved: Any, current: Any, where: Path) -> None:
    """A saved hyperparameter must suit the optimizer as built now, or its first step
    crashes: numbers stay finite numbers, tuples keep their shape, and flags keep their
    value (`amsgrad` without its state). The caller skips IMPLEMENTATION_FLAGS."""
    same_flag = not isinstance(current, bool) or saved == current
    if _hyperparameter_kind(saved) != _hyperparameter_kind(current) or not same_flag:
        raise CheckpointError(f"param group {group} in {where} has {key} = "
                              f"{escape_for_display(repr(saved), 80)}, the "
                              f"optimizer has {current!r}",
                              hint="resume with the same optimizer settings")


def _hyperparameter_kind(value: Any) -> Any:
    """`0.9 -> 'number'`, `(0.9, 0.95) -> ('number', 'number')`, `None -> 'flag'`."""
    if value is None or isinstance(value, bool):
        return "flag"
    if isinstance(value, int | float):
        return "number" if math.isfinite(value) else "non-finite"
    if isinstance(value, tuple):
        return tuple(map(_hyperparameter_kind, value))
    return type(value).__name__


def _check_param_state(pid: int, entry: Mapping[str, Any], params: list[torch.Tensor],
                       where: Path) -> None:
    if pid >= len(params):
        raise CheckpointError(f"optimizer state for parameter {pid} in {where}, but the "
                              f"optimizer has {len(params)} parameters", hint=_REBUILD_HINT)
    for key, spec in entry.items():
        # 0-dim tensors (`step`) keep their own dtype; moments match their parameter.
        if isinstance(spec, TensorSpec) and spec.shape != ():
            _check_spec(f"state.{pid}.{key}", spec, params[pid], where)


# ------------------------------------------------------------------------ RNG state


class _NumpyRng(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    algorithm: Literal["MT19937"]
    keys: str  # base64 of 624 little-endian uint32
    pos: int = Field(ge=0, le=624)
    has_gauss: int = Field(ge=0, le=1)
    cached_gaussian: float


class _PythonRng(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    version: int
    internal: str  # base64 of 625 little-endian uint32: 624 words of state + position
    gauss_next: float | None


class RngState(BaseModel):
    """Every random generator a run draws from, as JSON (byte states in base64)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    torch_cpu: str
    torch_cuda: list[str] | None = Field(None, max_length=1024)
    numpy: _NumpyRng
    python: _PythonRng


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, size: int, what: str, where: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(f"{what} RNG state is not base64, in {where}") from None
    if len(data) != size:
        raise CheckpointError(f"{what} RNG state is {len(data)} bytes, expected {size}, "
                              f"in {where}")
    return data


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy's legacy global and Python's `random`."""
    algorithm, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    cuda = ([_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
            if torch.cuda.is_available() else None)
    state = RngState(
        torch_cpu=_b64(torch.get_rng_state().numpy().tobytes()), torch_cuda=cuda,
        numpy=_NumpyRng(algorithm=algorithm, keys=_b64(keys.astype("<u4").tobytes()),
                        pos=int(pos), has_gauss=int(has_gauss),
                        cached_gaussian=float(cached)),
        python=_PythonRng(version=version, gauss_next=gauss_next,
                          internal=_b64(np.array(internal, dtype="<u4").tobytes())))
    return state.model_dump(mode="json")


def restore_rng_state(state: Mapping[str, Any], where: str = TRAINER_STATE_FILE) -> None:
    """Put every generator back exactly, or none of them: each state is tried on a
    scratch generator first. CUDA states are skipped when CUDA is absent."""
    try:
        rng = RngState.model_validate(state)
    except ValidationError as exc:
        raise CheckpointError(f"RNG state breaks the schema ({_first_errors(exc)}), "
                              f"in {where}") from None
    cpu = _byte_tensor(_unb64(rng.torch_cpu, torch.get_rng_state().numel(), "torch CPU", where))
    keys = np.frombuffer(_unb64(rng.numpy.keys, 624 * 4, "numpy", where), dtype="<u4")
    np_state = (rng.numpy.algorithm, keys.astype(np.uint32), rng.numpy.pos,
                rng.numpy.has_gauss, rng.numpy.cached_gaussian)
    words = np.frombuffer(_unb64(rng.python.internal, 625 * 4, "python", where), dtype="<u4")
    py_state = (rng.python.version, tuple(int(w) for w in words), rng.python.gauss_next)
    cuda = (_cuda_states(rng.torch_cuda, where)
            if rng.torch_cuda is not None and torch.cuda.is_available() else None)
    try:
        torch.Generator().set_state(cpu)
        np.random.RandomState().set_state(np_state)
        random.Random().setstate(py_state)  # noqa: S311 (a scratch generator, not crypto)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"RNG state refused ({exc}), in {where}") from None
    torch.set_rng_state(cpu)
    np.random.set_state(np_state)
    random.setstate(py_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _cuda_states(states: list[str], where: str) -> list[torch.Tensor]:
    current = torch.cuda.get_rng_state_all()
    if len(states) != len(current):
        raise CheckpointError(f"RNG state has {len(states)} CUDA devices, this machine has "
                              f"{len(current)}, in {where}",
                              hint="resume on the same number of visible GPUs")
    return [_byte_tensor(_unb64(s, c.numel(), "torch CUDA", where))
            for s, c in zip(states, current, strict=True)]


# ---------------------------------------------------------------------------- saving


def step_path(run_dir: Path, step: int) -> Path:
    """`(Path("run"), 100) -> run/step-0000100`."""
    if type(step) is not int or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"checkpoint step must be an int in 0..{MAX_STEP}, got {step!r}")
    return run_dir / f"step-{step:07d}"


@dataclass
class _Payload:
    """Everything a checkpoint holds, checked and serialised before a byte is written."""

    model: dict[str, torch.Tensor]
    model_meta: dict[str, str]
    optimizer: dict[str, torch.Tensor] | None
    optimizer_meta: dict[str, str]
    texts: dict[str, bytes] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, trainer_state: Mapping[str, Any],
                    config: Mapping[str, Any], tokenizer_file: Path,
                    provenance: Mapping[str, str] | None = None, keep_last: int = 3) -> Path:
    """Write `run_dir/step-NNNNNNN/` atomically, then prune to the newest `keep_last`.

    The folder is built under a hidden temporary name, every file fsynced, then renamed
    into place (replacing a same-step folder); a crash leaves only the temporary, which
    `clean_stale_temporaries` removes. Disk full raises `OutputError`; a NaN/inf tensor,
    non-JSON state or a bad step raises `CheckpointError` before anything is written.
    """
    target = step_path(run_dir, step)
    if type(keep_last) is not int or keep_last < 1:
        raise CheckpointError(f"keep_last must be an int >= 1, got {keep_last!r}")
    payload = _prepare(model, optimizer, trainer_state, config, tokenizer_file)
    sealed = _validate_provenance(provenance or {})
    with staged_dir(target, overwrite=True) as tmp, translate_os_errors(target):
        _write_payload(tmp, payload)
        manifest = build_manifest(tmp, step, sealed)
        _write_bytes(tmp / MANIFEST_FILE, manifest.to_json().encode("ascii"))
    _prune(run_dir, keep_last, step)
    return target


def _prepare(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             trainer_state: Mapping[str, Any], config: Mapping[str, Any],
             tokenizer_file: Path) -> _Payload:
    stored, aliases = model_tensors(model)
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


def _refuse_non_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) \
                and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"refusing to save a non-finite checkpoint: {what} tensor "
                                  f"{name!r} holds NaN or inf",
                                  hint="training diverged; lower the learning rate or resume "
                                       "from an earlier checkpoint")


def _for_disk(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no shared memory (safetensors refuses it)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {tensor.dtype}, which checkpoints "
                                  f"do not store (allowed: {', '.join(DTYPES)})")
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:  # a partial overlap that is not a plain alias
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _compact_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _json_bytes(obj: Mapping[str, Any], name: str, cap: int) -> bytes:
    """Serialise and prove the loader will read back exactly `obj` (no tuples, int keys)."""
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


def _validate_provenance(provenance: Mapping[str, str]) -> dict[str, str]:
    try:
        return _PROVENANCE.validate_python(dict(provenance))
    except ValidationError as exc:
        raise CheckpointError(f"provenance refused ({_first_errors(exc)})",
                              hint="keys: lowercase identifiers; values: printable ASCII"
                              ) from None


def _write_payload(folder: Path, payload: _Payload) -> None:
    _write_tensors(folder / MODEL_FILE, payload.model, payload.model_meta)
    if payload.optimizer is not None:
        _write_tensors(folder / OPTIMIZER_FILE, payload.optimizer, payload.optimizer_meta)
    for name, data in payload.texts.items():
        _write_bytes(folder / name, data)


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


# --------------------------------------------------------------------------- finding


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


def _check_file_set(folder: Path, present: set[str], manifest: Manifest) -> None:
    listed = set(manifest.files)
    if missing := sorted((REQUIRED_FILES | listed) - present):
        raise CheckpointError(f"missing {', '.join(missing)}, in {folder}")
    if unlisted := sorted(present - listed - {MANIFEST_FILE}):
        raise CheckpointError(f"{', '.join(unlisted)} not listed in the manifest, in {folder}")


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


def _read_json_object(path: Path, entry: FileEntry, cap: int) -> dict[str, Any]:
    doc = parse_json_guarded(_read_verified(path, entry, cap), str(path), CheckpointError,
                             JSON_MAX_DEPTH)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path.name} must hold a JSON object, in {path.parent}")
    return doc


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint folder. Tensors are read only by `load_*_into`, after the
    header has been checked against the target, and re-hashed as they are read (the
    folder may have been replaced by a running trainer in between)."""

    path: Path
    step: int
    config: dict[str, Any]
    trainer_state: dict[str, Any]
    provenance: dict[str, str]
    files: dict[str, FileEntry]
    model_header: SafetensorsHeader
    model_aliases: dict[str, str]
    optimizer_header: SafetensorsHeader | None
    optimizer_layout: dict[str, Any] | None
    max_bytes: int = DEFAULT_MAX_BYTES

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def has_optimizer(self) -> bool:
        return self.optimizer_header is not None

    def load_model_into(self, model: torch.nn.Module) -> None:
        """Copy the weights into `model` (same names, shapes, dtypes and tying, or refused)."""
        target = _unwrap(model).state_dict()
        where = self.path / MODEL_FILE
        _check_model_layout(self.model_header, self.model_aliases, target, where)
        data = _read_verified(where, self.files[MODEL_FILE], self.max_bytes)
        tensors = _views_of(data, self.model_header, where)
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


def _views_of(data: bytes, header: SafetensorsHeader, where: Path) -> dict[str, torch.Tensor]:
    """Read-only tensors viewing the verified bytes of a safetensors file, no copy.

    The weights are then copied once, into the model: a chat process holds the file's
    bytes and the model, not a third copy as `safetensors.torch.load` would make. The
    header is parsed again from these very bytes and must equal the checked one.
    """
    length = _header_length(data[:8], len(data), where)
    start = 8 + length
    if _parse_header(data[8:start], len(data) - start, where) != header:
        raise CheckpointError(f"safetensors header changed after it was checked, in {where}",
                              hint="load it again once nothing writes to the checkpoint")
    views = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bytes are read-only; we only read
        for name, spec in header.tensors.items():
            dtype = DTYPES[spec.dtype]
            count = math.prod(spec.shape)
            flat = (torch.frombuffer(data, dtype=dtype, count=count, offset=start + spec.begin)
                    if count else torch.empty(0, dtype=dtype))
            views[name] = flat.view(spec.shape)
    return views


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
    manifest = _read_manifest(path)
    _check_file_set(path, present, manifest)
    for name, entry in sorted(manifest.files.items()):
        _verify_file(path / name, entry, max_bytes)
    files = dict(manifest.files)
    model_header = read_safetensors_header(path / MODEL_FILE)
    opt_header = (read_safetensors_header(path / OPTIMIZER_FILE)
                  if OPTIMIZER_FILE in files else None)
    checkpoint = Checkpoint(
        path=path, step=manifest.step,
        config=_read_json_object(path / CONFIG_FILE, files[CONFIG_FILE], CONFIG_MAX_BYTES),
        trainer_state=_read_json_object(path / TRAINER_STATE_FILE, files[TRAINER_STATE_FILE],
                                        TRAINER_STATE_MAX_BYTES),
        provenance=dict(manifest.provenance), files=files,
        model_header=model_header,
        model_aliases=_parse_aliases(model_header, path / MODEL_FILE),
        optimizer_header=opt_header,
        optimizer_layout=(_parse_optimizer_layout(opt_header, path / OPTIMIZER_FILE)
                          if opt_header is not None else None),
        max_bytes=max_bytes)
    _refuse_non_finite_file(path / MODEL_FILE, model_header)
    if opt_header is not None:  # `train --resume` would step from NaN moments
        _refuse_non_finite_file(path / OPTIMIZER_FILE, opt_header)
    return checkpoint


def model_config_sha256(model_config: Any) -> str:
    """The hash a checkpoint's provenance records for config.json's "model" table."""
    return sha256_bytes(json.dumps(model_config, sort_keys=True).encode())


def _check_model_config_hash(checkpoint: Checkpoint) -> None:
    # A config.json edited and its manifest re-sealed passes every file hash; only the
    # provenance recorded at save time tells, and a run folder must then fall back to
    # the previous step rather than pick this one (find_latest_valid calls us).
    recorded = checkpoint.provenance.get("model_config_sha256")
    actual = model_config_sha256(checkpoint.config.get("model"))
    if recorded is not None and recorded != actual:
        raise CheckpointError(f"config.json's model table hashes to {actual[:16]}… but the "
                              f"checkpoint recorded {recorded[:16]}… when it was saved, in "
                              f"{checkpoint.path}", hint="the checkpoint was edited after it "
                              "was saved; use another checkpoint")


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


# ------------------------------------------------------------------ finite values

FINITE_CHUNK_BYTES = 4 * MiB  # a multiple of every dtype's size: no value is split
# Where each float dtype keeps its exponent: all ones there is inf or NaN (IEEE 754;
# BF16 is the top half of F32). Integer and bool tensors hold no such value.
_EXPONENT_BITS: dict[str, tuple[str, int]] = {
    "F64": ("<u8", 0x7FF0_0000_0000_0000), "F32": ("<u4", 0x7F80_0000),
    "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


def _refuse_non_finite_file(path: Path, header: SafetensorsHeader) -> None:
    """Every floating-point value in the file must be finite. Read a chunk at a time
    (bounded memory, about as fast as hashing), never as tensors."""
    fd = open_regular(path, CheckpointError)
    try:
        size = os.fstat(fd).st_size
        start = 8 + _header_length(os.pread(fd, 8, 0), size, path)
        for name, spec in header.tensors.items():
            if spec.dtype in _EXPONENT_BITS and _holds_non_finite(fd, start, spec, path):
                raise CheckpointError(
                    f"tensor {name!r} holds NaN or inf, in {path}",
                    hint="the weights are unusable (`fragment train` never saves them: the "
                         "file was edited); use an earlier checkpoint")
    finally:
        os.close(fd)


def _holds_non_finite(fd: int, start: int, spec: TensorSpec, path: Path) -> bool:
    unsigned, exponent = _EXPONENT_BITS[spec.dtype]
    for begin in range(spec.begin, spec.end, FINITE_CHUNK_BYTES):
        size = min(FINITE_CHUNK_BYTES, spec.end - begin)
        chunk = os.pread(fd, size, start + begin)
        if len(chunk) != size:
            raise CheckpointError(f"{path.name} got shorter while being read, in {path.parent}")
        bits = np.frombuffer(chunk, dtype=unsigned)
        if np.any(np.bitwise_and(bits, exponent) == exponent):
            return True
    return False
