"""The typed records a checkpoint holds beside its tensors, validated by pydantic when
they are read: the sha256 manifest and its provenance table, `config.json`
(`CheckpointConfig`), `trainer_state.json` (`TrainerState`) and the RNG state inside it.

The JSON documents are read exactly as leniently as the loader always has (any JSON
object, keys it does not name kept): the tables inside them are checked where they are
used, with the messages users know, so a step that breaks them still loads, `verify`
names the rule, and a run folder does not fall back past it. `document()` gives back
the object key for key; writing it through `dump_json` gives the same bytes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

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
ProvenanceTable = Annotated[dict[ProvenanceKey, ProvenanceValue], Field(max_length=64)]


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
    provenance: ProvenanceTable
    checksum: Sha256

    @staticmethod
    def body_checksum(body: Mapping[str, JsonValue]) -> str:
        return sha256_bytes(dump_json({k: v for k, v in body.items() if k != "checksum"})
                            .encode("ascii"))

    def to_json(self) -> str:
        return dump_json(self.model_dump(mode="json"))


def _validate_manifest(doc: object, where: Path) -> Manifest:
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        raise CheckpointError(f"manifest breaks the schema ({_first_errors(exc)}), in {where}",
                              hint="the checkpoint is damaged or was not written by fragment"
                              ) from None


def _loc_text(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as one harmless line: its keys come from the file."""
    return escape_for_display(".".join(str(part) for part in loc))


def table_refusal(table: str, exc: ValidationError, where: Path) -> CheckpointError:
    """A config.json table that breaks its config's rules, as one line naming the field:
    `invalid model config: model.n_layer: Input should be greater than or equal to 1`."""
    error = exc.errors()[0]
    field = _loc_text(error["loc"]) or table
    return CheckpointError(f"invalid {table} config: {table}.{field}: {error['msg']}, in "
                           f"{where}", hint="use another checkpoint; this config.json was "
                                            "not written by `fragment train`")


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = [f"{_loc_text(e['loc']) or 'top level'}: {e['msg']}"
             for e in exc.errors()[:limit]]
    return "; ".join(parts)


_PROVENANCE: TypeAdapter[dict[str, str]] = TypeAdapter(ProvenanceTable,
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


def recorded_path(path: Path) -> str:
    """A path as a provenance value: printable ASCII (other characters as Python escapes,
    so the value stays a faithful pointer to show, if not always to open), capped."""
    return ascii(str(path))[1:-1][:4096] or "."


def model_config_sha256(model_config: JsonValue) -> str:
    """The hash a checkpoint's provenance records for config.json's "model" table."""
    return sha256_bytes(json.dumps(model_config, sort_keys=True).encode())


# ------------------------------------------------------------ the JSON documents


class _Document(BaseModel):
    """A checkpoint's JSON object: the fields fragment writes, named; any other key kept."""

    # protected_namespaces: pydantic before 2.10 warns about `model_config_sha256`.
    model_config = ConfigDict(frozen=True, extra="allow", protected_namespaces=())

    def document(self) -> dict[str, JsonValue]:
        """The object again, key for key (a field absent from the file stays absent)."""
        return self.model_dump(mode="json", exclude_unset=True)


def _absent_unless(*kinds: type) -> BeforeValidator:
    """Read a value of another JSON type as absent, as every reader of it always has."""
    return BeforeValidator(lambda value: value if isinstance(value, kinds) else None)


def _number_or_absent(value: JsonValue) -> float | None:
    if not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer past float's range: no figure anyone wrote
        return None


def _tables(value: JsonValue) -> list[JsonValue]:
    return [entry for entry in value if isinstance(entry, dict)] if isinstance(value, list) else []


class CheckpointConfig(_Document):
    """`config.json`: how the run was set up and the figure it ended on (train/run.py).

    `model` and `train` stay as written: provenance hashes `model`, `ModelConfig`
    validates it where a model is built (checkpoint/trained.py), and `TrainConfig`
    validates `train` when the run is resumed (train/resume.py).
    """

    model: JsonValue = None
    train: Annotated[dict[str, JsonValue] | None, _absent_unless(dict)] = None
    fragment_version: Annotated[str | None, _absent_unless(str)] = None
    chat_format: Annotated[str | None, _absent_unless(str)] = None  # inference/chat.py
    val_loss: Annotated[float | None, BeforeValidator(_number_or_absent)] = None
    val_bpb: Annotated[float | None, BeforeValidator(_number_or_absent)] = None
    # What each resume changed ([train] holds the values in force now), oldest first.
    resume_changes: Annotated[list[dict[str, JsonValue]], BeforeValidator(_tables)] = []

    def train_count(self, key: str, default: int) -> int:
        """A positive integer the [train] table recorded (`batch_size`, `eval_blocks`), or
        `default`: a table resume would refuse still says how the run was measured."""
        value = (self.train or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        return default


class TrainerState(_Document):
    """`trainer_state.json`: where the run stands, everything the next step depends on
    besides the tensors. Each value stays as written: `Trainer.load_state_dict` and
    `restore_rng_state` check them on resume ("trainer_state.json is incomplete ...")."""

    step: JsonValue = None
    elapsed_s: JsonValue = None  # training seconds so far (the time budget)
    data: JsonValue = None  # the batch stream's position (data/shards.py)
    scaler: JsonValue = None  # the AMP gradient scaler's state
    nonfinite_in_a_row: JsonValue = None
    warmup_end_progress: JsonValue = None
    cosine_start: JsonValue = None
    rng: JsonValue = None  # an `RngState` (checkpoint/rng.py)


class Provenance(_Document):
    """What the checkpoint was made from, as its manifest records it: the sha256 of
    each input (checkpoint/provenance.py follows them; `fragment verify` shows them)."""

    tokenizer_sha256: str | None = None
    tokens_manifest_sha256: str | None = None
    processed_manifest_sha256: str | None = None
    model_config_sha256: str | None = None  # of config.json's "model" table


Document = TypeVar("Document", bound=_Document)


def read_document(record: type[Document], doc: dict[str, JsonValue], where: Path
                  ) -> Document:
    """`doc` as `record`; a refusal is one line naming the file."""
    try:
        return record.model_validate(doc)
    except ValidationError as exc:
        raise CheckpointError(f"{where.name} breaks the schema ({_first_errors(exc)}), in "
                              f"{where.parent}") from None
