"""The one path from a checkpoint to a model ready for inference: `load_trained`.

`generate`, `chat` and `eval` get their model here: through the hostile-folder loader
(load.py), with the tokenizer copy inside the checkpoint checked against the
provenance and the model's vocabulary, the parameter count against the weights file
and the memory plan against the machine, all before any weight is read or allocated.
`check_weights_layout` is the same comparison from headers alone, for `fragment verify`.
It does not train, sample or measure; `train --resume` restores through `Checkpoint`
itself (train/run.py) and shares only `checkpoint_model_config`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from fragment_llm.checkpoint.layout import CONFIG_FILE, MODEL_FILE, OPTIMIZER_FILE
from fragment_llm.checkpoint.load import Checkpoint, open_checkpoint
from fragment_llm.checkpoint.provenance import checked_tokenizer
from fragment_llm.checkpoint.records import table_refusal
from fragment_llm.checkpoint.tensors import DTYPES
from fragment_llm.config import ModelConfig
from fragment_llm.errors import CheckpointError
from fragment_llm.model.gpt import GPT
from fragment_llm.model.size import check_inference_memory, count_parameters
from fragment_llm.tokenizer.tokenizer import Tokenizer

DEFAULT_BATCH_SIZE = 8  # eval's batch when the checkpoint records none


@dataclass
class Trained:
    """A model ready for inference, with the tokenizer it was trained with."""

    model: GPT
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    device: torch.device

    @property
    def step(self) -> int:
        return self.checkpoint.step

    @property
    def val_bpb(self) -> float | None:
        return self.checkpoint.config.val_bpb


def load_trained(path: Path, device: torch.device | None = None,
                 evaluating: bool = False) -> Trained:
    """Resolve a run or step folder, verify it, and build the model on `device`; for
    `generate`/`chat`, or for `eval` (its memory is planned for the run's batch size)."""
    device = device or torch.device("cpu")
    checkpoint = open_checkpoint(path)
    checkpoint.require_model()
    config = checkpoint_model_config(checkpoint)
    tokenizer = checked_tokenizer(checkpoint)  # the copy and config match the provenance
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"tokenizer vocab size {tokenizer.vocab_size} differs from the "
                              f"model's {config.vocab_size}, in {checkpoint.path}")
    _refuse_size_mismatch(config, checkpoint)
    eval_batch = (checkpoint.config.train_count("batch_size", DEFAULT_BATCH_SIZE)
                  if evaluating else None)
    check_inference_memory(config, checkpoint.path, device, eval_batch)
    # Built for real (not on the meta device): non-persistent buffers such as RoPE's
    # cos/sin tables are computed in __init__ and are not in the checkpoint.
    model = GPT(config).to(device)
    checkpoint.load_model_into(model)
    model.eval()
    return Trained(model, tokenizer, checkpoint, device)


def checkpoint_model_config(checkpoint: Checkpoint) -> ModelConfig:
    """The checkpoint's [model] config, or one line naming the field and the rule."""
    try:
        config = ModelConfig.model_validate(checkpoint.config.model)
    except ValidationError as exc:
        raise table_refusal("model", exc, checkpoint.path / CONFIG_FILE) from None
    if config.vocab_size is None:  # "the tokenizer's" in a [model] table; training records it
        raise CheckpointError(f"invalid model config: model.vocab_size: Field required, in "
                              f"{checkpoint.path / CONFIG_FILE}",
                              hint="use another checkpoint; this config.json was not written "
                                   "by `fragment train`")
    return config


def _refuse_size_mismatch(config: ModelConfig, checkpoint: Checkpoint) -> None:
    """Compare sizes before building: config.json is checked against model.safetensors
    (whose size is capped) so a hostile config cannot make us allocate a huge model."""
    expected = count_parameters(config)  # counted from the config: nothing allocated
    stored = sum(math.prod(spec.shape) for spec in checkpoint.model_header.tensors.values())
    if expected != stored:
        raise CheckpointError(f"{CONFIG_FILE} describes {expected:,} parameters but "
                              f"{MODEL_FILE} holds {stored:,}, in {checkpoint.path}",
                              hint="the two files do not belong together; use another "
                                   "checkpoint")


def check_weights_layout(checkpoint: Checkpoint, config: ModelConfig) -> str:
    """The safetensors headers against the model `config` builds, without reading a
    tensor or allocating one (`fragment verify`); says what matched."""
    expected, aliases, params = _expected_tensors(config)
    where = checkpoint.path / MODEL_FILE
    header = {name: (spec.dtype, spec.shape)
              for name, spec in checkpoint.model_header.tensors.items()}
    if set(header) != set(expected) or checkpoint.model_aliases != aliases:
        odd = sorted(set(header) ^ set(expected)) or ["(weight tying)"]
        raise CheckpointError(f"tensors differ from what {CONFIG_FILE} builds: "
                              f"{', '.join(odd[:5])}, in {where}")
    for name, (dtype, shape) in header.items():
        if (dtype, shape) != expected[name]:
            want_dtype, want_shape = expected[name]
            raise CheckpointError(f"tensor {name!r} is {dtype} {list(shape)}, {CONFIG_FILE} "
                                  f"builds {want_dtype} {list(want_shape)}, in {where}")
    layout = checkpoint.optimizer_layout
    if layout is not None:
        listed = sum(len(group["params"]) for group in layout["param_groups"])
        if listed != params:
            raise CheckpointError(f"optimizer holds {listed} parameters, the model {params}, "
                                  f"in {checkpoint.path / OPTIMIZER_FILE}")
    return f"{len(header)} tensors match {CONFIG_FILE} (read from headers only)"


def _expected_tensors(config: ModelConfig) -> tuple[dict[str, tuple[str, tuple[int, ...]]],
                                                    dict[str, str], int]:
    """Names, dtypes and shapes of the model `config` builds, on the meta device (no
    memory); tied names as {alias: first name}; and the number of parameters."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    with torch.device("meta"):
        model = GPT(config)
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        first.setdefault(id(param), name)
    specs = {name: (names.get(t.dtype, str(t.dtype)), tuple(t.shape))
             for name, t in model.state_dict().items() if name not in aliases}
    return specs, aliases, len(first)
