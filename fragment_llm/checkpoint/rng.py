"""Capture and restore every random generator a step depends on (Python, NumPy, torch
CPU and CUDA), so a resumed run draws the same numbers as one that never stopped."""

from __future__ import annotations

import base64
import binascii
import random

import numpy as np
import torch
from pydantic import JsonValue, ValidationError

from fragment_llm.checkpoint.layout import (
    TRAINER_STATE_FILE,
)
from fragment_llm.checkpoint.records import (
    RngState,
    _first_errors,
    _NumpyRng,
    _PythonRng,
)
from fragment_llm.errors import CheckpointError


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


def capture_rng_state() -> dict[str, JsonValue]:
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


def restore_rng_state(state: JsonValue, where: str = TRAINER_STATE_FILE) -> None:
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
