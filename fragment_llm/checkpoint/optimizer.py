"""Optimizer state as flat tensors plus a JSON layout, and back, with every group,
hyperparameter and per-parameter entry checked against the optimizer it is loaded into."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import JsonValue

from fragment_llm.checkpoint.layout import (
    OPTIMIZER_FORMAT,
)
from fragment_llm.checkpoint.tensors import (
    _REBUILD_HINT,
    SafetensorsHeader,
    TensorSpec,
    _check_spec,
    _preview,
    metadata_document,
)
from fragment_llm.errors import CheckpointError
from fragment_llm.safety.text import escape_for_display

_TUPLE_TAG = "__tuple__"
_TENSOR_TAG = "__tensor__"


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


def unflatten_optimizer_state(tensors: Mapping[str, object], layout: object) -> dict[str, Any]:
    """Inverse of `flatten_optimizer_state`; checks the layout as untrusted input.

    Every tensor must be referenced exactly once. `tensors` may map names to anything
    (the loader passes header `TensorSpec`s first, to check before reading data).
    """
    if not isinstance(layout, dict) or set(layout) != {"state", "param_groups"} \
            or not isinstance(layout["state"], dict) \
            or not isinstance(layout["param_groups"], list):
        raise CheckpointError("optimizer layout must be {state: {...}, param_groups: [...]}")
    used: set[str] = set()
    state = {}
    for pid, entry in layout["state"].items():
        if not re.fullmatch(r"0|[1-9]\d{0,8}", pid):
            raise CheckpointError(f"optimizer state key {pid!r} is not a parameter index")
        state[int(pid)] = _decode_entry(entry, tensors, used, pid)
    if unused := sorted(set(tensors) - used):
        raise CheckpointError(f"optimizer tensors not referenced by the layout: "
                              f"{_preview(unused)}")
    groups = []
    for index, group in enumerate(layout["param_groups"]):
        decoded = _decode(group, f"optimizer param group {index}")
        params = decoded.get("params") if isinstance(decoded, dict) else None
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            raise CheckpointError(f"optimizer param group {index} needs a list of int params")
        groups.append(decoded)
    return {"state": state, "param_groups": groups}


def _decode_entry(entry: object, tensors: Mapping[str, object], used: set[str],
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


def _encode(value: object, where: str) -> JsonValue:
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


def _decode(value: object, where: str) -> object:
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
    layout = metadata_document(header, OPTIMIZER_FORMAT, "layout", where, max_depth=16)
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


def _check_hyperparameter(group: int, key: str, saved: object, current: object,
                          where: Path) -> None:
    """A saved hyperparameter must suit the optimizer as built now, or its first step
    crashes: numbers stay finite numbers, tuples keep their shape, and flags keep their
    value (`amsgrad` without its state). The caller skips IMPLEMENTATION_FLAGS."""
    same_flag = not isinstance(current, bool) or saved == current
    if _hyperparameter_kind(saved) != _hyperparameter_kind(current) or not same_flag:
        raise CheckpointError(f"param group {group} in {where} has {key} = "
                              f"{escape_for_display(repr(saved), 80)}, the "
                              f"optimizer has {current!r}",
                              hint="resume with the same optimizer settings")


def _hyperparameter_kind(value: object) -> str | tuple[object, ...]:
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
