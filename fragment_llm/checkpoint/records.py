"""The typed records a checkpoint holds beside its tensors: the sha256 manifest, the
provenance table and the RNG state, validated by pydantic when they are read."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

from fragment_llm.checkpoint.layout import (
    MAX_STEP,
    FileName,
)
from fragment_llm.errors import CheckpointError
from fragment_llm.safety.files import (
    dump_json,
    sha256_bytes,
)
from fragment_llm.safety.text import escape_for_display

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
ProvenanceKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


# Printable ASCII only: provenance values end up in terminal output.
ProvenanceValue = Annotated[str, StringConstraints(pattern=r"^[\x20-\x7e]{0,4096}$")]


Provenance = Annotated[dict[ProvenanceKey, ProvenanceValue], Field(max_length=64)]


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


_PROVENANCE: TypeAdapter[dict[str, str]] = TypeAdapter(Provenance,
                                                       config=ConfigDict(strict=True))


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


def _validate_provenance(provenance: Mapping[str, str]) -> dict[str, str]:
    try:
        return _PROVENANCE.validate_python(dict(provenance))
    except ValidationError as exc:
        raise CheckpointError(f"provenance refused ({_first_errors(exc)})",
                              hint="keys: lowercase identifiers; values: printable ASCII"
                              ) from None


def model_config_sha256(model_config: Any) -> str:
    """The hash a checkpoint's provenance records for config.json's "model" table."""
    return sha256_bytes(json.dumps(model_config, sort_keys=True).encode())
