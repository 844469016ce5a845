"""The adapter as an artifact: `adapter_config.json`, loading an adapter step folder as
hostile input, and a base model with its adapter applied.

An adapter step folder is a checkpoint step folder (checkpoint/layout.py) holding
`adapter.safetensors` and `adapter_config.json` instead of the model's weights; the
checkpoint loader verifies its manifest, hashes, entries and finite values. Here: the
config's rules (method, rank cap, targets), the tensor names and shapes the base's model
config implies (checked on the header, before a byte of tensor data is read), and the
base itself: an adapter is refused against any base but the one it was trained on,
named by the sha256 of that base's manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from fragment_llm.checkpoint.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FORMAT,
    MANIFEST_FILE,
    MANIFEST_MAX_BYTES,
    STEP_NAME,
    list_checkpoints,
)
from fragment_llm.checkpoint.load import Checkpoint, open_checkpoint
from fragment_llm.checkpoint.records import model_config_sha256, recorded_path
from fragment_llm.checkpoint.save import AdapterWeights
from fragment_llm.checkpoint.trained import Trained, checkpoint_model_config, load_trained
from fragment_llm.config import ModelConfig
from fragment_llm.errors import CheckpointError
from fragment_llm.finetune.adapters import (
    MAX_RANK,
    TARGETS,
    AdapterSpec,
    adapter_tensors,
    attach_adapters,
    expected_adapter_shapes,
    load_adapter_tensors,
)
from fragment_llm.safety.files import sha256_bytes
from fragment_llm.safety.text import escape_for_display

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
TargetName = Literal["qkv", "attn_proj", "mlp_fc", "mlp_proj"]
HINT_BASE = "pass the base checkpoint the adapter was trained on with --checkpoint/--base"


class AdapterRecord(BaseModel):
    """`adapter_config.json` (pinned keys; extend, never rename)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    format: Literal["fragment-adapter"]
    version: Literal[1]
    method: Literal["lora", "dora"]
    rank: int = Field(ge=1, le=MAX_RANK)
    alpha: float = Field(gt=0.0, le=1e4)
    dropout: float = Field(ge=0.0, lt=1.0)
    targets: list[TargetName] = Field(min_length=1, max_length=len(TARGETS))
    rslora: bool
    base_manifest_sha256: Sha256
    base_model_config_sha256: Sha256
    # Where the base was when the adapter was trained: the default base to load.
    base_checkpoint: Annotated[str, StringConstraints(pattern=r"^[\x20-\x7e]{1,4096}$")]

    def spec(self) -> AdapterSpec:
        return AdapterSpec(method=self.method, rank=self.rank, alpha=self.alpha,
                           dropout=self.dropout, targets=tuple(self.targets),
                           rslora=self.rslora)


def adapter_record(spec: AdapterSpec, base: Checkpoint) -> AdapterRecord:
    """The config of an adapter with `spec`, trained on `base`."""
    return AdapterRecord(
        format=ADAPTER_FORMAT, version=1, method=spec.method, rank=spec.rank,
        alpha=float(spec.alpha), dropout=float(spec.dropout), targets=list(spec.targets),
        rslora=spec.rslora, base_manifest_sha256=base.manifest_sha256,
        base_model_config_sha256=model_config_sha256(base.config.model),
        base_checkpoint=recorded_path(base.path))


def adapter_weights(model: torch.nn.Module, record: AdapterRecord) -> AdapterWeights:
    """What an adapter step folder holds: the adapter's tensors and its config."""
    return AdapterWeights(adapter_tensors(model), record.model_dump(mode="json"))


@dataclass(frozen=True)
class Adapter:
    """A verified adapter step folder and its config."""

    checkpoint: Checkpoint
    record: AdapterRecord

    @property
    def base_path(self) -> Path:
        return Path(self.record.base_checkpoint)


def load_adapter(path: Path) -> Adapter:
    """An adapter run folder (its newest valid step) or step folder, verified as hostile
    input: the checkpoint loader's checks, then adapter_config.json's rules."""
    return adapter_of(open_checkpoint(path))


def adapter_of(checkpoint: Checkpoint) -> Adapter:
    """A verified step folder as an adapter: it must hold one, with a valid config."""
    if not checkpoint.is_adapter:
        raise CheckpointError(f"{checkpoint.path} holds a whole model, not an adapter",
                              hint="pass it as --checkpoint; --adapter takes a LoRA/DoRA "
                                   "fine-tuning run's folder")
    where = checkpoint.path / ADAPTER_CONFIG_FILE
    try:
        record = AdapterRecord.model_validate(checkpoint.read_adapter_config())
    except ValidationError as exc:
        error = exc.errors()[0]
        field = escape_for_display(".".join(str(part) for part in error["loc"])) or "(top)"
        raise CheckpointError(f"invalid adapter config: {field}: {error['msg']}, in {where}",
                              hint="use another adapter; this one was not written by "
                                   "`fragment finetune`") from None
    return Adapter(checkpoint, record)


def check_adapter_base(adapter: Adapter, base: Checkpoint) -> None:
    """The adapter was trained on exactly this base (its manifest, so its weights)."""
    recorded, actual = adapter.record.base_manifest_sha256, base.manifest_sha256
    if recorded != actual:
        raise CheckpointError(f"adapter {adapter.checkpoint.path} was trained on a base whose "
                              f"manifest hashes to {recorded[:16]}…, but {base.path} hashes "
                              f"to {actual[:16]}…", hint=HINT_BASE)
    if adapter.record.base_model_config_sha256 != model_config_sha256(base.config.model):
        raise CheckpointError(f"adapter {adapter.checkpoint.path} was trained on another "
                              f"model config than {base.path}'s", hint=HINT_BASE)


def check_adapter_tensors(adapter: Adapter, config: ModelConfig) -> None:
    """Names, shapes and dtypes in adapter.safetensors's header against what the base's
    config and the adapter's rank imply: refused before any tensor data is read."""
    expected = expected_adapter_shapes(config, adapter.record.spec())
    stored = {name: spec.shape for name, spec in adapter.checkpoint.model_header.tensors.items()}
    where = adapter.checkpoint.path / adapter.checkpoint.weights_file
    if missing := sorted(expected.keys() - stored.keys()):
        raise CheckpointError(f"adapter lacks {escape_for_display(missing[0])} "
                              f"({len(missing)} missing), in {where}")
    if extra := sorted(stored.keys() - expected.keys()):
        raise CheckpointError(f"unexpected adapter tensor {escape_for_display(extra[0])} "
                              f"({len(extra)} unexpected), in {where}")
    for name, shape in sorted(expected.items()):
        if tuple(stored[name]) != shape:
            raise CheckpointError(f"adapter tensor {name} has shape {list(stored[name])}, the "
                                  f"base and rank {adapter.record.rank} need {list(shape)}, "
                                  f"in {where}")
    bad = sorted(name for name, spec in adapter.checkpoint.model_header.tensors.items()
                 if spec.dtype != "F32")
    if bad:
        raise CheckpointError(f"adapter tensor {bad[0]} is not float32, in {where}")


def base_step(path: Path, manifest_sha256: str) -> Path:
    """A base given as a run folder means its step the adapter was trained on (found by
    its manifest's sha256), not its newest one; a step folder is itself. When no step
    matches, `path`: loading it then refuses it, naming both hashes."""
    if STEP_NAME.fullmatch(path.name) or os.path.lexists(path / MANIFEST_FILE):
        return path
    for step in reversed(list_checkpoints(path) if path.is_dir() else []):
        with contextlib.suppress(OSError):
            manifest = step / MANIFEST_FILE
            if not manifest.is_symlink() and manifest.stat().st_size <= MANIFEST_MAX_BYTES \
                    and sha256_bytes(manifest.read_bytes()) == manifest_sha256:
                return step
    return path


def adapter_layout(checkpoint: Checkpoint, config: ModelConfig) -> str:
    """`fragment verify`'s weights check for an adapter step folder: its config's rules,
    and its tensors against the base's model config."""
    adapter = adapter_of(checkpoint)
    check_adapter_tensors(adapter, config)
    record = adapter.record
    return (f"{record.method} rank {record.rank} on {', '.join(record.targets)}: "
            f"{len(checkpoint.model_header.tensors)} tensors fit the base's model config")


def recorded_base(checkpoint: Checkpoint) -> Path | None:
    """Where the checkpoint a step started from was: an adapter's config says, and a
    fine-tuned, merged or --init-from checkpoint's provenance (None: not recorded, or
    an adapter config that is refused, which its own checks report)."""
    if not checkpoint.is_adapter:
        where = checkpoint.provenance.document().get("base_checkpoint")
        return Path(where) if isinstance(where, str) and where else None
    try:
        return adapter_of(checkpoint).base_path
    except CheckpointError:
        return None


def apply_adapter(model: torch.nn.Module, adapter: Adapter, config: ModelConfig) -> None:
    """Attach the adapter's layers to `model` (the base, loaded) and load its tensors."""
    check_adapter_tensors(adapter, config)
    attach_adapters(model, adapter.record.spec())
    tensors = adapter.checkpoint.read_weights()
    try:
        load_adapter_tensors(model, tensors)
    except ValueError as exc:
        raise CheckpointError(f"adapter refused ({exc}), in {adapter.checkpoint.path}") from None


@dataclass
class Tuned(Trained):
    """A base model with an adapter applied, ready for inference."""

    adapter: Adapter | None = None

    @property
    def chat_format(self) -> str | None:
        if self.adapter is not None:
            return self.adapter.checkpoint.config.chat_format
        return self.checkpoint.config.chat_format


def load_tuned(checkpoint: Path | None, adapter_path: Path | None,
               device: torch.device | None = None, evaluating: bool = False) -> Tuned:
    """`load_trained`, plus the adapter when one is given: the base is `checkpoint`, or
    the one the adapter recorded; either way it must be the one it was trained on."""
    if adapter_path is None:
        if checkpoint is None:
            raise CheckpointError("no checkpoint given")
        return Tuned(**_fields(load_trained(checkpoint, device, evaluating)))
    adapter = load_adapter(adapter_path)
    base = base_step(checkpoint if checkpoint is not None else adapter.base_path,
                     adapter.record.base_manifest_sha256)
    trained = load_trained(base, device, evaluating)
    check_adapter_base(adapter, trained.checkpoint)
    apply_adapter(trained.model, adapter, checkpoint_model_config(trained.checkpoint))
    trained.model.eval()
    return Tuned(**_fields(trained), adapter=adapter)


def _fields(trained: Trained) -> dict[str, object]:
    return {field.name: getattr(trained, field.name) for field in dataclasses.fields(Trained)}
