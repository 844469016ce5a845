"""Validated configuration for every stage.

Each stage has one frozen pydantic model (`extra="forbid"`, a range on every number).
A config file is TOML with one table per stage (`[preprocess]`, `[tokenizer]`, ...);
`resolve` layers defaults < file < command-line flags and validates the result before
any work starts, so a bad value is refused naming the field, its source and the rule.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fragment_llm.errors import ConfigError
from fragment_llm.safety.files import read_capped
from fragment_llm.safety.text import escape_for_display

MiB = 1 << 20
GiB = 1 << 30
MAX_CONFIG_FILE_BYTES = 1 * MiB
STAGE_TABLES = ("preprocess", "tokenizer", "model", "train", "finetune", "generate", "chat",
                "serve")


class StageConfig(BaseModel):
    """Base for stage configs: immutable, a misspelled key is an error, and so is a value
    of the wrong type: strict mode refuses `workers = true` or `workers = "2"` instead of
    quietly reading them as 1 and 2 (an int is still a valid float)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


Stage = TypeVar("Stage", bound=StageConfig)


class PreprocessConfig(StageConfig):
    text_field: str = Field("text", min_length=1, max_length=128,
                            description="JSONL key / Parquet column holding the text")
    max_file_bytes: int = Field(64 * MiB, ge=1, le=16 * GiB,
                                description="larger input files are rejected unread")
    max_total_bytes: int = Field(64 * GiB, ge=1, le=1 << 50,
                                 description="stop taking files once this many bytes were read")
    max_files: int = Field(1_000_000, ge=1, le=100_000_000,
                           description="inputs beyond this count are rejected")
    max_doc_chars: int = Field(16_000_000, ge=1, le=1 << 32,
                               description="longer documents are dropped")
    min_doc_chars: int = Field(16, ge=1, le=1_000_000,
                               description="shorter cleaned documents are dropped")
    max_line_bytes: int = Field(16 * MiB, ge=64, le=1 * GiB,
                                description="longer JSONL lines are skipped unparsed")
    max_json_depth: int = Field(32, ge=2, le=512, description="deeper JSONL lines are skipped")
    invalid_utf8: Literal["reject", "replace"] = Field(
        "reject", description="reject a file with invalid UTF-8, or replace bad bytes with U+FFFD")
    # At most 512 MiB: a reader holds one whole (compressed) shard in memory to hash it
    # and parse the very bytes it hashed (processed.MAX_SHARD_FILE_BYTES).
    shard_max_bytes: int = Field(128 * MiB, ge=1 * MiB, le=512 * MiB,
                                 description="text bytes per output shard before starting another")
    workers: int = Field(2, ge=1, le=256, description="processes that read and clean inputs")
    zstd_level: int = Field(1, ge=1, le=22, description="Parquet zstd compression level "
                            "(1: ~2x faster to write than 3, ~13% larger shards)")


class TokenizerConfig(StageConfig):
    # 16384: on the Shakespeare corpus a 10-minute `small` run ends ~0.09 bits/byte lower
    # than at 8192 (whole words become tokens; docs/benchmarks.md, quality experiments).
    vocab_size: int = Field(16384, ge=262, le=1 << 20,
                            description="256 bytes + merges + special tokens")
    pattern: str = Field("gpt4", min_length=1, max_length=64,
                         description="named split pattern: gpt2 or gpt4, or 'custom'")
    custom_pattern: str | None = Field(None, min_length=1, max_length=4096,
                                       description="the split regex when pattern = 'custom'")
    max_chars: int | None = Field(None, ge=1, le=1 << 40,
                                  description="train on at most this many characters")
    max_chunk_chars: int = Field(256, ge=8, le=1 << 16,
                                 description="longer pre-split chunks are cut for training")
    min_frequency: int = Field(2, ge=1, le=1 << 30, description="stop when the best pair is rarer")
    holdout_fraction: float = Field(0.01, ge=0.0, lt=1.0,
                                    description="documents held back to measure bytes per token")
    workers: int = Field(2, ge=1, le=256, description="processes for counting and encoding")


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file of at most 1 MiB (no symlink, no FIFO); every failure is one
    `ConfigError` line naming the file."""
    raw = read_capped(path, MAX_CONFIG_FILE_BYTES, ConfigError)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config is not UTF-8 (byte {exc.start}), in {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML ({exc}), in {path}") from None
    except ValueError:  # tomllib's int() refuses numbers of more than 4300 digits
        raise ConfigError(f"invalid TOML (a number of more than 4300 digits), in {path}"
                          ) from None
    except RecursionError:
        raise ConfigError(f"TOML nested too deeply, in {path}") from None


def read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    """Parse a TOML config file into its stage tables, refusing anything unexpected."""
    doc = read_toml(path)
    for key, value in doc.items():
        if key not in STAGE_TABLES:
            raise ConfigError(f"unknown table [{escape_for_display(key)}] in {path}",
                              hint=f"known tables: {', '.join(STAGE_TABLES)}")
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a table like [{key}], in {path}")
    return doc


def _allowed_range(model: type[StageConfig], name: str) -> str | None:
    field = model.model_fields.get(name)
    if field is None:
        return None
    bounds = []
    for rule in field.metadata:
        for kind, attr, symbol in ((Ge, "ge", ">="), (Gt, "gt", ">"), (Le, "le", "<="),
                                   (Lt, "lt", "<")):
            if isinstance(rule, kind):
                bounds.append(f"{symbol} {getattr(rule, attr)}")
    return ", ".join(bounds) or None


def _explain(model: type[StageConfig], table: str, exc: ValidationError,
             sources: dict[str, str]) -> ConfigError:
    first = exc.errors()[0]
    if not first["loc"]:  # a cross-field rule: name the table and every source involved
        where = ", ".join(sorted(set(sources.values()))) or "defaults"
        message = str(first["msg"]).removeprefix("Value error, ")
        return ConfigError(f"invalid [{table}]: {message}, in {where}")
    name = str(first["loc"][0])
    where = sources.get(name, "defaults")
    if first["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields)
        # The key comes from the file: escaped, so the message stays one harmless line.
        return ConfigError(f"unknown key {table}.{escape_for_display(name)}, in {where}",
                           hint=f"known keys: {known}")
    allowed = _allowed_range(model, name)
    hint = f"allowed: {allowed}" if allowed else None
    shown = escape_for_display(repr(first.get("input")), 80)  # a value may be huge
    return ConfigError(f"invalid {table}.{name} = {shown}: {first['msg']}, in {where}",
                       hint=hint)


def resolve(model: type[Stage], table: str, file_tables: dict[str, dict[str, Any]],
            config_path: Path | None, overrides: dict[str, Any],
            base: dict[str, Any] | None = None) -> Stage:
    """Build a stage config: `base` (e.g. a preset) < the file's [table] < CLI flags.

    Flags whose value is None were not given and do not override anything.
    """
    values = dict(base or {})
    sources = {key: "preset" for key in values}
    for key, value in file_tables.get(table, {}).items():
        values[key] = value
        sources[key] = str(config_path)
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
            sources[key] = "--" + key.replace("_", "-")
    return validate_stage(model, table, values, sources)


def validate_stage(model: type[Stage], table: str, values: dict[str, Any],
                   sources: dict[str, str]) -> Stage:
    """Validate layered `values`; a refusal names the field and `sources[field]`, where
    that value came from (a file, a flag, an experiment plan's run)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _explain(model, table, exc, sources) from None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """`90s`, `10m`, `2h`, `1.5h` or plain seconds -> seconds; None if it is not one,
    or not in (0, 1e8] (NaN and inf are not)."""
    text = text.strip().lower()
    unit = text[-1] if text and text[-1] in _DURATION_UNITS else "s"
    number = text[:-1] if text and text[-1] in _DURATION_UNITS else text
    try:
        seconds = float(number) * _DURATION_UNITS[unit]
    except ValueError:
        return None
    return seconds if 0 < seconds <= 1e8 else None


def load_stage_config(model: type[Stage], table: str, config_path: Path | None,
                      overrides: dict[str, Any]) -> Stage:
    """The usual entry point for a verb: read `--config` (if any), then `resolve`."""
    tables = read_config_file(config_path) if config_path is not None else {}
    return resolve(model, table, tables, config_path, overrides)


PositionsName = Literal["rope", "learned", "sinusoidal"]
NormName = Literal["rmsnorm", "layernorm"]
MlpName = Literal["swiglu", "gelu", "relu2"]


class ModelConfig(StageConfig):
    """The GPT's shape and components (see docs/model.md). Defaults are the `small` preset's
    shape and components; its `zero_init_proj` (the start of training only) stays off.

    `vocab_size` has no default of its own: the tokenizer is its only source. None (the
    default) means "the tokenizer's", filled in by training; a [model] vocab_size that
    disagrees with the tokenizer is refused (train/run.py). A checkpoint's config.json
    records the number, and a model cannot be built or sized without it.
    """

    vocab_size: int | None = Field(None, ge=256, le=1 << 20,
                                   description="token ids are 0..vocab_size-1; None = the "
                                               "tokenizer's (the only source)")
    n_layer: int = Field(6, ge=1, le=256, description="transformer blocks")
    n_head: int = Field(4, ge=1, le=256, description="query heads per block")
    n_kv_head: int | None = Field(None, ge=1, le=256,
                                  description="key/value heads (grouped-query); None = n_head")
    n_embd: int = Field(256, ge=8, le=32768, description="residual stream width")
    block_size: int = Field(256, ge=1, le=1 << 17, description="context window in tokens")
    positions: PositionsName = Field("rope", description="rope, learned or sinusoidal")
    norm: NormName = Field("rmsnorm", description="rmsnorm or layernorm (pre-norm)")
    mlp: MlpName = Field("swiglu", description="swiglu, gelu or relu2")
    mlp_hidden: int | None = Field(None, ge=1, le=1 << 18,
                                   description="MLP hidden width; None = 8/3 n_embd rounded up "
                                               "to 64 for swiglu, 3/2 of that for relu2 (the "
                                               "same parameters), 4 n_embd for gelu")
    tie_embeddings: bool = Field(True, description="the output layer reuses the token embedding")
    dropout: float = Field(0.0, ge=0.0, le=0.9, description="embedding, attention and residual")
    rope_theta: float = Field(10000.0, ge=1.0, le=1e9, description="RoPE base wavelength")
    norm_eps: float = Field(1e-5, gt=0.0, le=0.1, description="added to the variance in norms")
    # Candidate options (issue 19). Each default is the model as it was before them, so a
    # checkpoint whose config.json lacks them loads and means the same. None of them has a
    # counterpart in Hugging Face's GPT-2/LLaMA or in GGUF: an exporter refuses a config
    # where `candidate_options` is not empty.
    qk_norm: bool = Field(False, description="RMSNorm (no gain) on each head's q and k, "
                                             "before RoPE")
    logit_softcap: float | None = Field(None, gt=0.0, le=1e4, allow_inf_nan=False,
                                        description="logits = cap * tanh(logits / cap); "
                                                    "None = off")
    zero_init_proj: bool = Field(False, description="attn.proj and mlp.proj start at zero")
    x0_mix: bool = Field(False, description="each block's input gets a learned per-layer "
                                            "multiple of the embedding x0 (starts at 0)")

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head}), e.g. n_embd = "
                             f"{self.n_embd // self.n_head * self.n_head or self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head "
                             f"({self.kv_heads}): each key/value head serves a group of heads")
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"positions = 'rope' needs an even head dim, but n_embd "
                             f"({self.n_embd}) / n_head ({self.n_head}) = {self.head_dim}")
        return self

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used: n_kv_head, or n_head when unset."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def candidate_options(self) -> tuple[str, ...]:
        """The issue-19 options this config turns on that change what the weights compute,
        by field name: () for a model Hugging Face and GGUF describe; an exporter refuses
        the others, naming these. `zero_init_proj` is not one: it only sets the start."""
        on = {"mlp": self.mlp == "relu2", "qk_norm": self.qk_norm,
              "logit_softcap": self.logit_softcap is not None, "x0_mix": self.x0_mix}
        return tuple(name for name, used in on.items() if used)

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width. SwiGLU's 8/3 keeps its three matrices at GPT-2's 4x MLP cost;
        ReLU^2 has two matrices, so 3/2 of SwiGLU's width gives it exactly SwiGLU's
        parameters and matmul FLOPs (1056 at n_embd 256, where 4 n_embd would be 1024)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        swiglu = -(-8 * self.n_embd // 192) * 64  # ceil(8/3 n_embd / 64) * 64
        if self.mlp == "swiglu":
            return swiglu
        if self.mlp == "relu2":
            return swiglu * 3 // 2
        return 4 * self.n_embd


# Named sets of [model] keys; a config file and flags override them (vocab_size comes from
# the tokenizer, so no preset names it). Parameter counts at vocab 8192, with tied
# embeddings (docs/model.md):
#   tiny   0.85M non-embedding,  1.9M total: tests and the quick start
#   small   4.8M non-embedding,  6.9M total (9.0M at the default vocab 16384): the default
#   base   39.6M non-embedding, 44.9M total
_COMPONENTS = {"n_kv_head": None, "positions": "rope", "norm": "rmsnorm", "mlp": "swiglu",
               "tie_embeddings": True, "dropout": 0.0}
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, **_COMPONENTS},
    # small is 6 x 256: ~9M parameters at the default vocabulary 16384, of which the
    # embedding is half. In 10 minutes on 2 cores it makes ~540 steps where 8 x 320 made
    # 355, and ends at 1.963 bits/byte, not 2.055 (docs/benchmarks.md, training quality).
    # zero_init_proj goes with small's Muon + warmup-stable-decay (TRAIN_PRESETS): the
    # three were measured together (issue 19, docs/benchmarks.md); it sets only the start.
    "small": {"n_layer": 6, "n_head": 4, "n_embd": 256, "block_size": 256, **_COMPONENTS,
              "zero_init_proj": True},
    "base": {"n_layer": 8, "n_head": 10, "n_embd": 640, "block_size": 512, **_COMPONENTS},
}


PrecisionName = Literal["auto", "fp32", "bf16", "fp16"]
ScheduleName = Literal["cosine", "wsd"]
OptimizerName = Literal["adamw", "muon"]
DeviceName = Literal["auto", "cpu", "cuda", "mps"]


class TrainConfig(StageConfig):
    """The `[train]` table. The first nine keys are pinned (portable configs)."""

    batch_size: int = Field(16, ge=1, le=65536, description="sequences per micro-step")
    grad_accum: int = Field(1, ge=1, le=4096, description="micro-steps per optimizer step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate")
    max_steps: int = Field(2000, ge=1, le=100_000_000, description="optimizer steps planned")
    warmup_steps: int = Field(100, ge=0, le=100_000_000,
                              description="linear warmup steps (at most max_steps are used)")
    weight_decay: float = Field(0.1, ge=0.0, le=10.0, description="AdamW decay on matrices")
    grad_clip: float = Field(1.0, ge=0.0, le=1e6, description="max global grad norm; 0 = off")
    seed: int = Field(1337, ge=0, le=2**63 - 1, description="weights, dropout and data order")
    precision: PrecisionName = Field("auto", description="auto, fp32, bf16 or fp16")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="final lr as a fraction of lr")
    beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0.0, lt=1.0, description="AdamW beta2")
    max_time_s: float | None = Field(None, gt=0.0, le=1e8,
                                     description="stop (and end the schedule) after this long")
    eval_every: int = Field(200, ge=0, le=100_000_000, description="steps between evals; 0 = end")
    eval_blocks: int = Field(64, ge=1, le=1_000_000,
                             description="validation blocks per eval, spread over the split")
    final_eval_blocks: int = Field(512, ge=1, le=1_000_000,
                                   description="validation blocks for the eval that ends a run")
    log_every: int = Field(10, ge=1, le=1_000_000, description="steps between metrics lines")
    checkpoint_every: int = Field(500, ge=0, le=100_000_000,
                                  description="steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="newest checkpoints kept")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="documents held out")
    device: DeviceName = Field("auto", description="auto = cuda, then mps, then cpu")
    compile: bool = Field(False, description="torch.compile the model (optional)")
    activation_checkpointing: bool = Field(False, description="recompute block activations")
    max_memory: int | None = Field(None, ge=1 << 20, le=1 << 50,
                                   description="refuse plans above this many bytes")
    workers: int = Field(2, ge=1, le=256, description="processes for tokenizing the corpus")
    epochs: float | None = Field(None, gt=0.0, le=1e6, allow_inf_nan=False,
                                 description="passes over the training split; sets max_steps")
    # Candidate options (issue 19); each default is training as it was before them, so a
    # checkpoint's [train] table that lacks them resumes unchanged (docs/training.md).
    schedule: ScheduleName = Field("cosine", description="after warmup: cosine to the floor, "
                                                         "or wsd: hold the peak, then decay")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0,
                                  description="wsd: the share of the run after warmup spent "
                                              "decaying linearly to lr * min_lr_ratio")
    optimizer: OptimizerName = Field("adamw", description="adamw, or muon for the blocks' "
                                                          "matrices with AdamW for the rest")
    muon_lr: float = Field(0.02, gt=0.0, le=1.0,
                           description="Muon's peak lr; the schedule scales it as it does lr")
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Muon's Nesterov momentum")
    muon_momentum_start: float = Field(0.85, ge=0.0, lt=1.0,
                                       description="Muon's momentum at step 0, raised linearly")
    muon_momentum_warmup_steps: int = Field(300, ge=0, le=100_000_000,
                                            description="steps to reach muon_momentum; 0 = at once")
    muon_ns_steps: int = Field(5, ge=1, le=20,
                               description="Newton-Schulz iterations per update (fewer: cheaper, "
                                           "rougher)")
    muon_weight_decay: float = Field(0.0, ge=0.0, le=10.0,
                                     description="decoupled decay of the Muon matrices, times lr")


# Training values that go with each model preset; flags and [train] override them.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"batch_size": 16, "lr": 2e-3, "max_steps": 200, "warmup_steps": 20,
             "eval_every": 100, "checkpoint_every": 100},
    # The fewest bits per byte from 10 minutes on 2 cores (docs/benchmarks.md, training
    # quality; whole held-out split). Batch 8: 4 and 16 lose. A run this short is still
    # learning fast at its end, so the cosine stops at half the peak rather than 10%;
    # beta1 0.8 and beta2 0.99 suit 2,048 noisy tokens a step; the longer warmup and the
    # tighter clip let the peak lr rise to 1.5e-3 without the spike 2e-3 gives.
    # Issue 19's plans (3 seeds, 10 minutes): Muon for the blocks' matrices at 3
    # Newton-Schulz steps, warmup-stable-decay and zero-initialised projections end
    # lower than AdamW + cosine at every seed, though Muon makes 10% fewer steps. ReLU² and
    # QK-norm gain more but are not defaults: no Llama export can hold them.
    "small": {"batch_size": 8, "lr": 1.5e-3, "max_steps": 3000, "warmup_steps": 50,
              "beta1": 0.8, "beta2": 0.99, "min_lr_ratio": 0.5, "grad_clip": 0.5,
              "optimizer": "muon", "muon_ns_steps": 3, "schedule": "wsd"},
    "base": {"batch_size": 8, "grad_accum": 4, "lr": 6e-4, "max_steps": 10000,
             "warmup_steps": 300},
}
DEFAULT_PRESET = "small"


@dataclass(frozen=True)
class Given:
    """Where a value the user chose came from: a flag, a config file, or a preset."""

    source: str  # as the user wrote it: "--max-steps", "run.toml", "--preset tiny"
    from_preset: bool = False


@dataclass(frozen=True)
class GivenSettings:
    """The [model] and [train] keys the user chose, as opposed to defaults, and where.

    A fresh run layers them over a preset; a resumed run takes everything else from
    its checkpoint, and checks these against it (fragment_llm/train/resume.py).
    """

    model: dict[str, Given]
    train: dict[str, Given]

    @classmethod
    def collect(cls, preset: str | None, file_tables: dict[str, dict[str, Any]],
                config_path: Path | None, flags: dict[str, str]) -> GivenSettings:
        """`flags` maps each [train] key given on the command line to its flag's name.
        A [model] vocab_size given in the file is kept here: it must agree with the
        tokenizer (train/run.py) and, on resume, with the run (train/resume.py)."""
        tables = {}
        for table, presets in (("model", MODEL_PRESETS), ("train", TRAIN_PRESETS)):
            given = {key: Given(f"--preset {preset}", from_preset=True)
                     for key in (presets[preset] if preset else {})}
            given.update({key: Given(str(config_path)) for key in file_tables.get(table, {})})
            if table == "train":
                given.update({key: Given(flag) for key, flag in flags.items()})
            tables[table] = given
        return cls(**tables)


# A checkpoint's config.json "chat_format": how `fragment chat` renders turns for it.
# Plain-text corpora give "transcript" ("User: ...\nAssistant:"); "special_tokens"
# (<|user|> ... <|end|>) is for models trained on data rendered with those tokens.
TRANSCRIPT_CHAT_FORMAT = "transcript"
SPECIAL_TOKENS_CHAT_FORMAT = "special_tokens"


AdapterTarget = Literal["qkv", "attn_proj", "mlp_fc", "mlp_proj"]


class FinetuneConfig(StageConfig):
    """The `[finetune]` table: how `fragment finetune` tunes a base model on
    conversations (docs/finetune.md). The [train] table sets the optimisation."""

    method: Literal["full", "lora", "dora"] = Field(
        "lora", description="full: every weight; lora/dora: a small adapter, base frozen")
    rank: int = Field(16, ge=1, le=256, description="LoRA/DoRA rank r")
    alpha: float = Field(32.0, gt=0.0, le=1e4, allow_inf_nan=False,
                         description="LoRA scale numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    targets: list[AdapterTarget] = Field(
        ["qkv", "attn_proj", "mlp_fc", "mlp_proj"], min_length=1, max_length=4,
        description="projections that get an adapter")
    rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised LoRA)")

    @model_validator(mode="after")
    def _distinct_targets(self) -> FinetuneConfig:
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets must not repeat")
        return self


# [train] values for `fragment finetune` (flags and [train] override them): a short run
# over a small dataset, evaluated and saved often. An adapter starts at zero and wants
# a larger step than the full model, whose pretrained weights a large one would wreck.
FINETUNE_TRAIN: dict[str, Any] = {
    "batch_size": 8, "lr": 2e-3, "max_steps": 300, "warmup_steps": 20, "weight_decay": 0.0,
    "eval_every": 100, "eval_blocks": 32, "final_eval_blocks": 256, "checkpoint_every": 100,
    "val_fraction": 0.05, "min_lr_ratio": 0.1}
FINETUNE_FULL_LR = 3e-4


MAX_NEW_TOKENS = 4096  # per answer; the wall-clock limit max_time_s also applies


class GenerateConfig(StageConfig):
    """The `[generate]` table: sampling, hard limits and prompt caps (docs/chat.md).

    Every number is range-checked and NaN/inf are refused, so `temperature = nan` or
    `top_p = 0` fails here with the field's name instead of producing garbage later.
    """

    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS, description="tokens per answer")
    temperature: float = Field(0.8, ge=0.0, le=100.0, allow_inf_nan=False,
                               description="softmax temperature; 0 = greedy (argmax)")
    top_k: int | None = Field(50, ge=1, le=1 << 20,
                              description="sample among the k likeliest tokens; None = all")
    top_p: float = Field(0.95, gt=0.0, le=1.0, allow_inf_nan=False,
                         description="nucleus: the smallest set holding this probability")
    repetition_penalty: float = Field(1.0, ge=1.0, le=10.0, allow_inf_nan=False,
                                      description="divide the logits of seen tokens; 1 = off")
    seed: int | None = Field(None, ge=0, le=2**63 - 1,
                             description="same seed, prompt and settings -> same text")
    max_time_s: float = Field(120.0, gt=0.0, le=86400.0, allow_inf_nan=False,
                              description="stop an answer after this many seconds")
    max_prompt_chars: int = Field(16_000, ge=1, le=1 << 24, description="longer prompts refused")
    max_prompt_tokens: int = Field(4096, ge=1, le=1 << 20, description="longer prompts refused")
    stop: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = Field(
        (), max_length=16, strict=False,  # TOML and JSON give lists, not tuples
        description="stop strings (checked on the decoded text)")
    threads: int = Field(1, ge=1, le=256,
                         description="torch threads; one decodes batch 1 fastest on a busy "
                                     "2-core machine (docs/benchmarks-generate.md)")


class ChatConfig(GenerateConfig):
    """The `[chat]` table: the sampling settings plus the conversation's own."""

    max_new_tokens: int = Field(200, ge=1, le=MAX_NEW_TOKENS, description="tokens per answer")
    system: str | None = Field(None, max_length=16_000, description="system prompt")
    history: bool = Field(True, description="keep readline history in ~/.cache/fragment-llm")


MAX_SLOTS = 64


class ServeConfig(GenerateConfig):
    """The `[serve]` table: where `fragment serve` listens, its limits, and the sampling
    defaults a request that names none gets (docs/serve.md).

    `max_new_tokens` is the server's cap on a request's `max_tokens` (and its default);
    `max_time_s` caps each request's wall-clock time, queueing included.
    """

    host: str = Field("127.0.0.1", min_length=1, max_length=253,
                      description="address to bind; anything but loopback needs an API key")
    port: int = Field(8000, ge=0, le=65535, description="TCP port; 0 = any free port")
    slots: int = Field(2, ge=1, le=MAX_SLOTS, description="answers generated at once")
    queue: int = Field(8, ge=0, le=1024,
                       description="requests that may wait for a slot; more get 429")
    max_body_bytes: int = Field(1 * MiB, ge=1024, le=64 * MiB,
                                description="request bodies over this get 413, unparsed")
    max_json_depth: int = Field(16, ge=4, le=256, description="deepest nesting of a body")
    max_messages: int = Field(256, ge=1, le=4096, description="messages per chat request")
    max_new_tokens: int = Field(256, ge=1, le=MAX_NEW_TOKENS,
                                description="cap on a request's max_tokens (and its default)")
    max_time_s: float = Field(60.0, gt=0.0, le=3600.0, allow_inf_nan=False,
                              description="per-request wall-clock cap, queueing included")
    cors_origins: tuple[Annotated[str, Field(min_length=1, max_length=253)], ...] = Field(
        (), max_length=16, strict=False,
        description="origins allowed to call the API from a browser; none = no CORS")
    model_name: str | None = Field(None, min_length=1, max_length=64,
                                   pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$",
                                   description="the id /v1/models lists; None = the folder's name")
    api_key_file: Path | None = Field(None, strict=False,
                                      description="file holding the API key (never the key "
                                                  "itself on the command line)")
    access_log: bool = Field(True, description="one line per request: route, status, tokens, "
                                               "seconds; never the request's text")
