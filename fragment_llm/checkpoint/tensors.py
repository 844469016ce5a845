"""safetensors files read as hostile input: our own header parser (sizes, dtypes,
coverage), name/shape/tying checks against the target module before any tensor is read,
zero-copy views of verified bytes, and the streaming scan for NaN/inf."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fragment_llm.checkpoint.layout import (
    HEADER_MAX_BYTES,
    MAX_DIMS,
    MAX_NAME_CHARS,
    MAX_TENSORS,
    MODEL_FORMAT,
    MiB,
)
from fragment_llm.errors import CheckpointError
from fragment_llm.safety.files import (
    JsonValue,
    open_regular,
    parse_json_guarded,
)

# The safetensors dtypes a checkpoint may hold; anything else is refused unread.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


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
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"safetensors __metadata__ must map strings to strings, "
                              f"in {where}")
    if len(doc) > MAX_TENSORS:
        raise CheckpointError(f"safetensors header lists {len(doc)} tensors, more than "
                              f"{MAX_TENSORS}, in {where}")
    tensors = {name: _tensor_spec(name, entry, where) for name, entry in doc.items()}
    _check_coverage(tensors, data_len, where)
    return SafetensorsHeader(tensors, metadata)


def _tensor_spec(name: str, entry: object, where: Path) -> TensorSpec:
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


def _int_list(value: object, max_len: int | None = None, exact_len: int | None = None) -> bool:
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


_REBUILD_HINT = ("build the model from this checkpoint's config.json (and its tokenizer.json "
                 "for the vocabulary) instead of the current settings")


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


def _alias_key(name: str, tensor: torch.Tensor) -> Hashable:
    """Two state-dict names are aliases when they are the same view of the same memory
    (a tied `lm_head.weight` is the embedding's Parameter)."""
    if tensor.numel() == 0:  # empty tensors may all report data_ptr 0
        return ("empty", name)
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
            tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with aliases removed, plus `{alias: stored name}`.

    safetensors refuses shared storage; the first name of each group (registration
    order) is stored and the others are recorded so loading can check the tying.
    """
    state = _unwrap(model).state_dict()
    # {"wte.weight": W, "lm_head.weight": W, "b": B} -> [["wte.weight", "lm_head.weight"], ["b"]]
    groups: dict[Hashable, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(_alias_key(name, tensor), []).append(name)
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for group in groups.values():
        stored[group[0]] = state[group[0]]
        aliases.update({name: group[0] for name in group[1:]})
    return stored, aliases


def _partition(names: Iterable[str], root_of: Callable[[str], Hashable]) -> set[frozenset[str]]:
    groups: dict[Hashable, set[str]] = {}
    for name in names:
        groups.setdefault(root_of(name), set()).add(name)
    return {frozenset(g) for g in groups.values()}


def _check_model_layout(header: SafetensorsHeader, aliases: Mapping[str, str],
                        target: Mapping[str, torch.Tensor], where: Path) -> None:
    saved = set(header.tensors) | set(aliases)
    if missing := sorted(set(target) - saved):
        raise CheckpointError(f"{where} lacks {len(missing)} tensor(s) the model has: "
                              f"{_preview(missing)}", hint=_REBUILD_HINT)
    if extra := sorted(saved - set(target)):
        raise CheckpointError(f"{where} has {len(extra)} tensor(s) the model does not have: "
                              f"{_preview(extra)}", hint=_REBUILD_HINT)
    keys = {name: _alias_key(name, tensor) for name, tensor in target.items()}
    if _partition(saved, lambda n: aliases.get(n, n)) != _partition(target, keys.__getitem__):
        raise CheckpointError(f"weight tying differs: {where} ties "
                              f"{sorted(aliases.items()) or 'nothing'}, the model does not "
                              f"match", hint=_REBUILD_HINT)
    for name, spec in header.tensors.items():
        _check_spec(name, spec, target[name], where)


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def metadata_document(header: SafetensorsHeader, file_format: str, key: str, where: Path,
                      max_depth: int) -> JsonValue:
    """The one JSON document our safetensors files carry beside their format name
    (`aliases` for weights, `layout` for optimizer state), parsed as untrusted JSON."""
    meta = header.metadata
    if set(meta) != {"format", key} or meta["format"] != file_format:
        raise CheckpointError(f"{file_format.removeprefix('fragment-')} __metadata__ must be "
                              f"exactly format={file_format!r} and {key}, in {where}")
    return parse_json_guarded(meta[key], f"the {key} metadata of {where}", CheckpointError,
                              max_depth=max_depth)


def _parse_aliases(header: SafetensorsHeader, where: Path) -> dict[str, str]:
    aliases = metadata_document(header, MODEL_FORMAT, "aliases", where, max_depth=2)
    if not isinstance(aliases, dict) or not all(
            isinstance(v, str) and v in header.tensors and k not in header.tensors
            for k, v in aliases.items()):
        raise CheckpointError(f"aliases metadata must map names not stored to stored tensor "
                              f"names, in {where}")
    return aliases


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
