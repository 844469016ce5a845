"""A GGUF (version 3) file writer, self-contained: F32 and Q8_0 tensors, typed metadata.

The format (ggml's docs/gguf.md), all little-endian: the magic `GGUF`, the version, the
tensor count and the metadata count (u64); each metadata entry as key (a string: u64
length + UTF-8 bytes), value type (u32) and value; each tensor's info as name, number
of dimensions (u32), the dimensions innermost first (u64 each), its ggml type (u32) and
its data's offset from the data section (u64); padding to `ALIGNMENT`; then the tensor
data, each tensor starting on an `ALIGNMENT` boundary.

Q8_0 cuts each row into blocks of 32 values, stored as one float16 scale
d = max|x| / 127 and 32 int8 values round(x / d): 34 bytes for 128, an error of at most
d / 2 per value. It is ggml's own reference quantiser (and gguf-py's `quants.quantize`,
which the tests compare byte for byte). A tensor whose rows are not a multiple of 32
values stays F32, as llama.cpp's converter leaves it.

The `gguf` Python package is not needed to write: the tests use its reader to read the
files back.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

import numpy as np
import torch

MAGIC: Final = b"GGUF"
VERSION: Final = 3
ALIGNMENT: Final = 32
Q8_0_BLOCK: Final = 32
# ggml tensor types, and GGUF metadata value types (ggml's gguf.h).
GGML_F32, GGML_Q8_0 = 0, 8
FILE_TYPES: Final = {"f32": 0, "q8_0": 7}  # general.file_type: LLAMA_FTYPE_ALL_F32, MOSTLY_Q8_0
_U32, _I32, _F32, _BOOL, _STRING, _ARRAY, _U64 = 4, 5, 6, 7, 8, 9, 10

MetadataValue = int | float | bool | str | list[int] | list[str]


@dataclass(frozen=True)
class Metadata:
    """One metadata entry. Integers are written as u32 (`signed`: i32), arrays of
    integers as i32 (token types), arrays of strings as strings."""

    key: str
    value: MetadataValue
    signed: bool = False


def q8_0_blocks(values: np.ndarray) -> np.ndarray:
    """fp32 values (rows, n) with n a multiple of 32 -> the Q8_0 bytes (rows, n / 32 * 34)."""
    blocks = values.astype(np.float32).reshape(-1, Q8_0_BLOCK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    with np.errstate(divide="ignore"):
        inverse = np.where(d == 0, 0, 1 / d)
    scaled = blocks * inverse
    # Round half away from zero, as C's roundf: numpy's round goes half to even.
    quants = (np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)).astype(np.int8)
    packed = np.concatenate([d.astype(np.float16).view(np.uint8), quants.view(np.uint8)],
                            axis=1)  # (blocks, 2 + 32)
    return packed.reshape(values.shape[0], -1)


def q8_0_dequantize(data: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The Q8_0 bytes back to fp32 values of `shape` (what llama.cpp computes with)."""
    blocks = np.ascontiguousarray(data).reshape(-1, 2 + Q8_0_BLOCK)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    quants = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * quants).reshape(shape)


def ggml_type(shape: tuple[int, ...], quantize: str) -> int:
    """Q8_0 for matrices whose rows split into blocks when `quantize` is "q8_0", else F32
    (norm gains always: they are small, and sensitive)."""
    if quantize == "q8_0" and len(shape) == 2 and shape[1] % Q8_0_BLOCK == 0:
        return GGML_Q8_0
    return GGML_F32


def encoded(tensor: torch.Tensor, kind: int) -> bytes:
    """A tensor's data as ggml type `kind`."""
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return q8_0_blocks(values).tobytes() if kind == GGML_Q8_0 else values.astype("<f4").tobytes()


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(entry: Metadata) -> bytes:
    value = entry.value
    if isinstance(value, bool):
        return struct.pack("<I?", _BOOL, value)
    if isinstance(value, int):
        return struct.pack("<Ii", _I32, value) if entry.signed else struct.pack("<II", _U32, value)
    if isinstance(value, float):
        return struct.pack("<If", _F32, value)
    if isinstance(value, str):
        return struct.pack("<I", _STRING) + _string(value)
    if all(isinstance(item, str) for item in value):
        items = b"".join(_string(str(item)) for item in value)
        return struct.pack("<IIQ", _ARRAY, _STRING, len(value)) + items
    return struct.pack("<IIQ", _ARRAY, _I32, len(value)) + np.asarray(value, "<i4").tobytes()


def _padding(size: int) -> bytes:
    return b"\0" * (-size % ALIGNMENT)


def write_gguf(out: BinaryIO, metadata: Iterable[Metadata],
               tensors: dict[str, torch.Tensor], quantize: str) -> int:
    """Write a whole GGUF file to `out`; returns its size in bytes. Tensors are encoded
    one at a time, so memory holds one encoded tensor beyond the tensors given."""
    entries = list(metadata)
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    types = {name: ggml_type(shape, quantize) for name, shape in shapes.items()}
    header = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(entries))]
    header += [_string(entry.key) + _value(entry) for entry in entries]
    offset = 0
    for name, shape in shapes.items():
        header.append(_string(name) + struct.pack("<I", len(shape))
                      + struct.pack(f"<{len(shape)}Q", *reversed(shape))  # innermost first
                      + struct.pack("<IQ", types[name], offset))
        offset += _data_size(shape, types[name])
        offset += -offset % ALIGNMENT
    head = b"".join(header)
    out.write(head + _padding(len(head)))
    written = len(head) + len(_padding(len(head)))
    for name, tensor in tensors.items():
        data = encoded(tensor, types[name])
        out.write(data + _padding(len(data)))
        written += len(data) + len(_padding(len(data)))
    return written


def _data_size(shape: tuple[int, ...], kind: int) -> int:
    count = int(np.prod(shape))
    return count // Q8_0_BLOCK * (2 + Q8_0_BLOCK) if kind == GGML_Q8_0 else 4 * count


def write_gguf_file(path: Path, metadata: Iterable[Metadata], tensors: dict[str, torch.Tensor],
                    quantize: str) -> int:
    """`write_gguf` into a new file at `path` (inside a staged folder: not atomic itself)."""
    with path.open("xb") as out:
        return write_gguf(out, metadata, tensors, quantize)
