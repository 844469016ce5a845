"""The training loop: setup, `train_step`, `evaluate`, checkpoint hooks, exact resume.

Owns device/precision choice, the learning-rate schedule, gradient accumulation,
AMP, DDP wiring, NaN handling, Ctrl-C and the run-folder lock. It does not print:
progress goes out through `on_event(TrainEvent)`, and `metrics.jsonl` is the record.
Exact resume: with the same settings, on CPU in fp32, a run resumed from a checkpoint
ends with the same weights, bit for bit, as one that never stopped. Everything the
next step depends on (weights, optimizer moments, data cursor, RNG states, step,
elapsed training time) is in the checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F  # noqa: N812

from fragment_llm import __version__
from fragment_llm.config import TRANSCRIPT_CHAT_FORMAT, GivenSettings, ModelConfig, TrainConfig
from fragment_llm.data.shards import (
    BuildRequest,
    TokenShards,
    TokenStream,
    build_token_shards,
    eval_batches,
)
from fragment_llm.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    OutputError,
    TrainingError,
)
from fragment_llm.model.gpt import GPT, bits_per_byte, count_parameters, flops_per_token, lm_loss
from fragment_llm.model.size import MemoryPlan, default_memory_limit, plan_memory
from fragment_llm.safety.files import atomic_write_text, make_dirs, translate_os_errors
from fragment_llm.safety.signals import Terminated, raise_when_safe, uninterrupted
from fragment_llm.safety.workers import cap_workers, tokenizer_bytes
from fragment_llm.train.resume import ResumedSettings, resumed_settings
from fragment_llm.verify import (
    HINT_RESUME,
    checked_tokenizer,
    require,
    resume_links,
    tokens_links,
)

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
MAX_NONFINITE_IN_A_ROW = 3


# ------------------------------------------------------------------------ the request


@dataclass(frozen=True)
class TrainRequest:
    """Everything `train` needs, already validated by the config layer.

    On resume, `model` and `train` are checked against the checkpoint's recorded ones
    (fragment_llm/train/resume.py): `given` says which of their keys the user chose (None: a
    library caller chose every [train] value that is not None). `resumed` is filled in
    by `run_training` with the settings the run continues.
    """

    data: Path
    tokenizer: Path
    out: Path
    model: ModelConfig
    train: TrainConfig
    resume: bool = False
    tokens_dir: Path | None = None  # default: <data>/../tokens
    given: GivenSettings | None = None
    resumed: ResumedSettings | None = None


@dataclass
class TrainEvent:
    """One thing worth showing: kind is "plan", "step", "eval", "checkpoint" or "note"."""

    kind: str
    step: int
    values: dict[str, Any] = field(default_factory=dict)


EventFn = Callable[[TrainEvent], None]


@dataclass(frozen=True)
class TrainSummary:
    out: Path
    steps: int
    tokens: int
    seconds: float
    final_train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    checkpoint: Path | None
    interrupted: bool
    parameters: int
    terminated: bool = False  # the interruption was a SIGTERM (exit 143, not 130)


# ----------------------------------------------------------------- device & precision


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit choice must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available", hint="use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: MPS is not available", hint="use --device cpu")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def keep_freed_memory() -> None:
    """Have glibc keep large freed blocks for reuse instead of handing them back.

    A train step allocates and frees the same large tensors (logits, activations) every
    time. By default glibc serves each block over its mmap threshold with a fresh mmap
    and unmaps it on free, so the next step page-faults every page back in: measured at
    `small` on 2 cores, 3.6M minor faults in 40 steps and 1.32 s a step, against 0.32M
    and 1.01 s with this (RSS 1.39 instead of 1.16 GB; docs/benchmarks.md). Process-wide,
    so the CLI calls it for `fragment train` only. A no-op where glibc's mallopt is absent.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h> parameter numbers
    mallopt(m_mmap_max, 0)  # large blocks come from the heap, so they can be reused...
    mallopt(m_trim_threshold, 2**31 - 1)  # ...and the heap's top is never given back


def select_precision(requested: str, device: torch.device) -> str:
    """`auto`: bf16 on CUDA that has it, fp16 (+GradScaler) on older CUDA, else fp32.

    CPUs get fp32: without native bf16 matmul (this project's reference 2-core machine
    has none) bf16 autocast measured 0.6x the fp32 speed; see docs/benchmarks.md.
    """
    if requested != "auto":
        if requested in ("bf16", "fp16") and device.type == "mps":
            raise ConfigError(f"precision {requested} is not supported on MPS here",
                              hint="use --precision fp32")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# --------------------------------------------------------------------------- schedule


def lr_at(step: int, config: TrainConfig, progress: float,
          warmup_end: float | None = None, cosine_start: float = 0.0) -> float:
    """Linear warmup over `warmup_steps`, then cosine from `lr` to `lr * min_lr_ratio`.

    `progress` in [0, 1] is how far through the planned run we are: steps over
    `max_steps`, or elapsed over `max_time`, whichever is further. `warmup_end` is
    the progress at which warmup finished; the cosine spans the rest. It defaults to
    `warmup_steps / max_steps`, which is wrong for a time-bound run: there 100 warmup
    steps can be half of the run, and the cosine must not already be half done.
    Once `warmup_end` is set the warmup is over, whatever `warmup_steps` says now.
    `cosine_start` is explained at `cosine_position`.
    """
    warmup = min(config.warmup_steps, config.max_steps)
    if step < warmup and warmup_end is None:
        return config.lr * (step + 1) / warmup
    ratio = cosine_position(config, progress, warmup_end, cosine_start)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1.0 + math.cos(math.pi * ratio))


def cosine_position(config: TrainConfig, progress: float, warmup_end: float | None = None,
                    cosine_start: float = 0.0) -> float:
    """How far along the cosine the run is at `progress`: 0 at the peak, 1 at the floor.

    It goes linearly from `cosine_start` at `warmup_end` to 1 at the end of the budget.
    `cosine_start` is 0 unless the budget was extended on resume: the cosine then goes
    on from where it was, spread over what is left of the longer run.
    """
    warmup = min(config.warmup_steps, config.max_steps)
    warm = warmup / config.max_steps if warmup_end is None else min(warmup_end, 1.0)
    share = min(1.0, max(0.0, (progress - warm) / max(1e-9, 1.0 - warm)))
    return cosine_start + (1.0 - cosine_start) * share


def budget_progress(step: int, elapsed: float, config: TrainConfig) -> float:
    """How much of the budget is spent: steps over `max_steps` or training time over
    `max_time_s`, whichever is further, at most 1."""
    by_time = elapsed / config.max_time_s if config.max_time_s else 0.0
    return min(1.0, max(step / config.max_steps, by_time))


def build_optimizer(model: torch.nn.Module, config: TrainConfig,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, biases or gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per tensor: on CPU 3.7x faster than foreach (5 vs 19 ms a step at
    # small). MPS keeps foreach.
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=1e-8, fused=fused, foreach=None if fused else True)


# ------------------------------------------------------------------------ distributed


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a `torchrun` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        try:
            rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        except ValueError:
            raise ConfigError("RANK and WORLD_SIZE must be integers (set by torchrun)") from None
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"invalid RANK={rank} / WORLD_SIZE={world}")
        return cls(rank, world)


def init_distributed(env: DistEnv, device: torch.device) -> None:
    if env.world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=env.rank, world_size=env.world)


def agree(values: list[float], env: DistEnv, device: torch.device) -> list[float]:
    """The largest of each value over all ranks (one small all-reduce), so that every
    rank takes the same decision from it; in one process, the values themselves."""
    if env.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def broadcast_text(text: str | None, device: torch.device) -> str | None:
    """Rank 0's `text` on every rank, sent as UTF-8 bytes in a tensor: no object crosses
    the wire pickled (`broadcast_object_list` would unpickle whatever arrives)."""
    data = b"" if text is None else text.encode("utf-8")
    size = torch.tensor([-1 if text is None else len(data)], dtype=torch.int64, device=device)
    torch.distributed.broadcast(size, src=0)
    length = int(size.item())
    if length < 0:
        return None
    buffer = torch.zeros(length, dtype=torch.uint8, device=device)
    if data and torch.distributed.get_rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    torch.distributed.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).decode("utf-8")


def run_on_main(env: DistEnv, device: torch.device, work: Callable[[], None]) -> None:
    """`work()` on rank 0 only; then every rank learns whether it worked.

    Rank 0 alone writes (checkpoints, the run folder). If it raised straight away, the
    other ranks would wait in their next collective for a peer that has left, and die
    there with gloo's "Connection closed by peer". Agreeing first lets all of them stop
    at the same place: rank 0 with its own error, the others with one line pointing at it.
    """
    error: Exception | None = None
    if env.is_main:
        try:
            work()
        except Exception as exc:  # raised below, once the other ranks know
            error = exc
    failed = agree([float(error is not None)], env, device)[0]
    if error is not None:
        raise error
    if failed:
        raise_peer_failed(env)


def raise_peer_failed(env: DistEnv) -> NoReturn:
    raise TrainingError(f"rank {env.rank}: stopping because rank 0 stopped",
                        hint="rank 0's error, printed above, says why")


def all_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world > 1:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= env.world
    return value


# ----------------------------------------------------------------------- run-folder lock


class RunLock:
    """An exclusive `flock` on OUT/.lock: a second trainer on the same folder is refused.

    The kernel drops the lock when the process dies, even by SIGKILL, so a crashed run
    never leaves a stale lock behind.
    """

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with translate_os_errors(self.path):  # read-only, no permission, a symlink: one line
            self.fd = os.open(self.path, flags, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise OutputError(f"another trainer is using {self.path.parent}",
                              hint="wait for it to finish, or choose another --out") from None
        with translate_os_errors(self.path):
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


class InterruptFlag:
    """First Ctrl-C or SIGTERM: finish the step, checkpoint, stop. Second: abort at once.

    SIGTERM (systemd, Docker, Kubernetes, Slurm, torchrun passing on a stop) is treated
    as Ctrl-C; `signum` records which came first, so the CLI can exit 130 or 143. Under
    torchrun a rank may also stop because another rank was signalled (`adopt`); only a
    second signal to this process itself aborts it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received = False
        self.previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def terminated(self) -> bool:
        return self.signum == signal.SIGTERM

    def _handle(self, signum: int, frame: object) -> None:
        if self.received:
            raise_when_safe(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())
        self.received = True
        if self.signum is None:
            self.signum = signum

    def adopt(self, sigint: bool, sigterm: bool) -> None:
        """Take on what the other ranks received (SIGTERM wins: the stricter stop)."""
        if sigterm:
            self.signum = signal.SIGTERM
        elif sigint and self.signum is None:
            self.signum = signal.SIGINT

    def __enter__(self) -> InterruptFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler, no flag
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# ------------------------------------------------------------------------------ trainer


@dataclass
class StepResult:
    loss: float
    lr: float
    grad_norm: float
    finite: bool


class Trainer:
    """Model, optimizer and data stream for one process, with `train_step`/`evaluate`."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, shards: TokenShards,
                 device: torch.device, precision: str, env: DistEnv) -> None:
        self.config, self.device, self.precision, self.env = config, device, precision, env
        torch.manual_seed(config.seed)
        self.model = GPT(model_config).to(device)
        if config.activation_checkpointing:
            self.model.activation_checkpointing = True
        self.forward_model: torch.nn.Module = self.model
        if env.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            with uninterrupted():  # its collectives must not be split by a signal
                self.forward_model = torch.nn.parallel.DistributedDataParallel(self.model, ids)
        if config.compile:
            self.forward_model = torch.compile(self.forward_model)
        self.optimizer = build_optimizer(self.model, config, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.stream = TokenStream(shards.train, model_config.block_size, config.seed,
                                  env.rank, env.world)
        self.shards = shards
        self.step = 0
        self.elapsed = 0.0
        self.nonfinite_in_a_row = 0
        self.warmup_end: float | None = None  # progress when warmup finished
        self.cosine_start = 0.0  # the cosine's position at warmup_end (see cosine_position)

    @property
    def progress(self) -> float:
        return budget_progress(self.step, self.elapsed, self.config)

    def extend_budget(self, recorded: TrainConfig) -> None:
        """Go on with the schedule after a resume that extended the `recorded` budget.

        Steps taken keep the learning rate they had. A run still in warmup simply
        continues: its cosine will span the longer run, exactly as if it had been planned
        that long. A run past warmup keeps its place on the cosine, so the learning rate
        is continuous here, and the rest of the cosine is spread over the rest of the new
        budget (a finished run extended stays at the floor).
        """
        if self.warmup_end is None and self.step < min(recorded.warmup_steps,
                                                       recorded.max_steps):
            return
        spent = budget_progress(self.step, self.elapsed, recorded)
        position = cosine_position(recorded, spent, self.warmup_end, self.cosine_start)
        self.warmup_end, self.cosine_start = self.progress, position

    @property
    def tokens_per_step(self) -> int:
        cfg = self.config
        return cfg.batch_size * cfg.grad_accum * self.env.world * self.model.config.block_size

    def train_step(self) -> StepResult:
        """One optimizer step: `grad_accum` micro-batches, clip, step (or skip if NaN)."""
        if self.warmup_end is None and self.step == min(self.config.warmup_steps,
                                                        self.config.max_steps):
            self.warmup_end = self.progress
        lr = lr_at(self.step, self.config, self.progress, self.warmup_end, self.cosine_start)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The mean over ranks: every rank then agrees on skipping a step and on stopping
        # after MAX_NONFINITE_IN_A_ROW (a NaN on one rank makes the mean NaN on all).
        loss = all_mean(self._accumulate_gradients(), self.env)
        self.scaler.unscale_(self.optimizer)
        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        finite = bool(torch.isfinite(loss)) and (self.precision == "fp16"
                                                 or bool(torch.isfinite(norm)))
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        return StepResult(float(loss), lr, float(norm), finite)

    def _accumulate_gradients(self) -> torch.Tensor:
        self.model.train()
        accum = self.config.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = (t.to(self.device, non_blocking=True)
                    for t in self.stream.next_batch(self.config.batch_size))
            last = micro == accum - 1
            sync = (self.forward_model.no_sync() if self.env.world > 1 and not last
                    else contextlib.nullcontext())
            with sync, autocast_for(self.precision, self.device):
                loss = lm_loss(self.forward_model(x), y) / accum
            self.scaler.scale(loss).backward()
            total += loss.detach().float()
        return total

    @torch.no_grad()
    def evaluate(self, max_blocks: int | None = None) -> tuple[float, float] | None:
        """Validation loss (nats/token) and bits per byte over up to `max_blocks` blocks
        (default `eval_blocks`), or None without a val split."""
        split = self.shards.val
        block = self.model.config.block_size
        if split.num_blocks(block) == 0:
            return None
        self.model.eval()
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        for x, y in eval_batches(split, block, self.config.batch_size,
                                 max_blocks or self.config.eval_blocks, self.env.rank,
                                 self.env.world):
            x, y = x.to(self.device), y.to(self.device)
            with autocast_for(self.precision, self.device):
                logits = self.model(x)
            nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            total += torch.stack([nll.double(), torch.tensor(y.numel(), device=self.device,
                                                            dtype=torch.float64)])
        total = all_mean(total, self.env)
        loss = float(total[0] / total[1])
        val = self.shards.manifest.val
        return loss, bits_per_byte(loss, val.tokens, val.text_bytes)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "elapsed_s": self.elapsed, "data": self.stream.state_dict(),
                "scaler": self.scaler.state_dict(), "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "warmup_end_progress": self.warmup_end, "cosine_start": self.cosine_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.step = int(state["step"])
            self.elapsed = float(state["elapsed_s"])
            self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
            warmup_end = state.get("warmup_end_progress")
            self.warmup_end = None if warmup_end is None else float(warmup_end)
            self.cosine_start = float(state.get("cosine_start", 0.0))
            if not 0.0 <= self.cosine_start <= 1.0:
                raise ValueError(f"cosine_start {self.cosine_start} is outside [0, 1]")
            self.stream.load_state_dict(state["data"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingError(f"trainer_state.json is incomplete ({exc})") from None


# ----------------------------------------------------------------------- orchestration


def _effective_model_config(request: TrainRequest, vocab_size: int) -> ModelConfig:
    try:
        return ModelConfig.model_validate({**request.model.model_dump(), "vocab_size": vocab_size})
    except ValueError as exc:
        raise ConfigError(f"model config does not fit the tokenizer: {exc}") from None


def prepare_shards(request: TrainRequest, env: DistEnv, vocab_size: int,
                   on_event: EventFn, device: torch.device) -> TokenShards:
    """Rank 0 tokenizes (or reuses the cache); every rank then opens and verifies."""
    tokens_root = request.tokens_dir or request.data.parent / "tokens"
    build = BuildRequest(request.data, request.tokenizer, tokens_root,
                         request.train.val_fraction, workers=request.train.workers)
    folder, error = None, None
    if env.is_main:
        try:
            folder = build_token_shards(build, lambda phase, done, total: on_event(
                TrainEvent("progress", 0, {"phase": phase, "done": done, "total": total})))
        except BaseException as exc:  # Ctrl-C and SIGTERM too: the others wait for us
            if env.world == 1:
                raise
            error = exc
    if env.world > 1:
        with uninterrupted():  # two collectives: a signal must not split them
            text = broadcast_text(str(folder) if folder else None, device)
        folder = Path(text) if text else None
    if error is not None:
        raise error
    if folder is None:
        raise_peer_failed(env)
    return TokenShards.open(folder, vocab_size)


def check_memory(plan: MemoryPlan, limit: int) -> None:
    if plan.total > limit:
        raise ConfigError(
            f"estimated peak memory {plan.total / 2**20:,.0f} MiB exceeds the limit of "
            f"{limit / 2**20:,.0f} MiB (--max-memory)",
            hint="lower --batch-size (raise --grad-accum to keep tokens per step), use a "
                 "smaller --preset, or add --activation-checkpointing")


def run_training(request: TrainRequest, on_event: EventFn, dry_run: bool = False) -> TrainSummary:
    """Train (or resume) a GPT on the processed corpus; see the module docstring.

    Under torchrun, the process group this starts is destroyed on every way out
    (done, interrupted, refused, failed), so no rank leaves a peer waiting on it.
    """
    started_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        return _train(request, on_event, dry_run)
    finally:
        if started_group and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(request: TrainRequest, on_event: EventFn, dry_run: bool) -> TrainSummary:
    from fragment_llm.tokenizer.tokenizer import Tokenizer

    env = DistEnv.from_environ()
    resume_from = _find_resume_point(request, env, on_event) if request.resume else None
    if resume_from is not None:  # the run's own settings, before anything uses them
        resumed = resumed_settings(resume_from, request.model, request.train, request.given)
        request = dataclasses.replace(request, model=resumed.model, train=resumed.train,
                                      resumed=resumed)
    device = select_device(request.train.device)
    precision = select_precision(request.train.precision, device)
    init_distributed(env, device)
    tokenizer = Tokenizer.load(request.tokenizer)
    request = _with_capped_workers(request, tokenizer.vocab_size, on_event)
    model_config = (request.model if resume_from
                    else _effective_model_config(request, tokenizer.vocab_size))
    if model_config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"checkpoint vocab size {model_config.vocab_size} differs from the "
                          f"tokenizer's {tokenizer.vocab_size}")
    if resume_from is not None:  # refuse a changed tokenizer before tokenizing anything
        checked_tokenizer(resume_from)
        require(resume_links(resume_from, tokenizer), CheckpointError, HINT_RESUME)
    plan = plan_memory(model_config, request.train, precision, device.type)
    check_memory(plan, request.train.max_memory or default_memory_limit(device))
    shards = prepare_shards(request, env, tokenizer.vocab_size, on_event, device)
    _check_shard_chain(request, tokenizer, shards, resume_from)
    trainer = Trainer(model_config, request.train, shards, device, precision, env)
    if resume_from is not None:
        _restore(trainer, resume_from)
        if request.resumed is not None and request.resumed.budget_extended:
            trainer.extend_budget(request.resumed.recorded)
    on_event(TrainEvent("plan", trainer.step, _plan_values(trainer, plan, device, precision)))
    if dry_run:
        on_event(TrainEvent("probe", trainer.step, {"seconds_per_step": _probe(trainer)}))
        return _summary(request, trainer, None, None, interrupted=False, seconds=0.0)
    if resume_from is not None:
        on_event(TrainEvent("note", trainer.step,
                            {"message": f"resumed from {resume_from.path}"}))
    with contextlib.ExitStack() as stack:
        interrupt = stack.enter_context(InterruptFlag())
        run_on_main(env, device, lambda: _open_run_folder(request.out, stack))
        loop = TrainLoop(request, trainer, tokenizer, model_config, on_event)
        return loop.run(interrupt)


def _open_run_folder(out: Path, stack: contextlib.ExitStack) -> None:
    make_dirs(out, hint="choose another --out")
    stack.enter_context(RunLock(out))
    _remove_killed_runs_temporaries(out)


def _with_capped_workers(request: TrainRequest, vocab_size: int,
                         on_event: EventFn) -> TrainRequest:
    """`[train] workers` lowered to the cores and memory there are, with a note; the
    lowered value is what the run's config records."""
    cap = cap_workers(request.train.workers, tokenizer_bytes(vocab_size))
    if cap.note is None:
        return request
    on_event(TrainEvent("note", 0, {"message": cap.note}))
    return dataclasses.replace(request, train=request.train.model_copy(
        update={"workers": cap.count}))


def _check_shard_chain(request: TrainRequest, tokenizer: Any, shards: TokenShards,
                       resume_from: Any) -> None:
    """The same link checks as `fragment verify`: the shards were built from this
    tokenizer (their manifest is unedited), and a resumed run uses the shards it began on."""
    require(tokens_links(shards, tokenizer, str(request.tokenizer)), DatasetError,
            hint=f"delete {shards.folder}; `fragment train` rebuilds it from {request.data}")
    if resume_from is not None:
        require(resume_links(resume_from, tokenizer, shards), CheckpointError, HINT_RESUME)


def _plan_values(trainer: Trainer, plan: MemoryPlan, device: torch.device,
                 precision: str) -> dict[str, Any]:
    cfg = trainer.model.config
    return {"parameters": count_parameters(trainer.model),
            "non_embedding_parameters": count_parameters(trainer.model, exclude_embeddings=True),
            "flops_per_token": flops_per_token(cfg), "memory_bytes": plan.total,
            "tokens_per_step": trainer.tokens_per_step, "device": str(device),
            "precision": precision, "world_size": trainer.env.world,
            "train_tokens": trainer.shards.manifest.train.tokens,
            "val_tokens": trainer.shards.manifest.val.tokens,
            "max_steps": trainer.config.max_steps, "max_time_s": trainer.config.max_time_s,
            "step": trainer.step, "elapsed_s": trainer.elapsed}


def _probe(trainer: Trainer, steps: int = 2) -> float:
    """Seconds per optimizer step, measured after one warm-up step; state is discarded."""
    snapshot = trainer.stream.cursor
    trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    trainer.stream.cursor = snapshot
    return (time.perf_counter() - start) / steps


def _remove_killed_runs_temporaries(out: Path) -> None:
    """Half-written or half-pruned step folders of a killed run. Saving step N only
    cleans up after step N, so a step this run never writes again would keep its
    leftovers forever. Called holding the lock: no live trainer is writing here."""
    from fragment_llm.checkpoint.store import clean_stale_temporaries

    clean_stale_temporaries(out)


def _find_resume_point(request: TrainRequest, env: DistEnv, on_event: EventFn):
    from fragment_llm.checkpoint.store import latest_valid_checkpoint

    latest, damaged = latest_valid_checkpoint(request.out)
    for path, reason in damaged:
        on_event(TrainEvent("note", 0, {"message": f"skipping damaged checkpoint {path}: "
                                                   f"{reason}"}))
    if latest is None:
        on_event(TrainEvent("note", 0, {"message": f"no checkpoint in {request.out}; "
                                                   "starting from scratch"}))
        return None
    return latest


def _restore(trainer: Trainer, checkpoint) -> None:
    checkpoint.load_model_into(trainer.model)
    checkpoint.load_optimizer_into(trainer.optimizer)
    trainer.load_state_dict(checkpoint.trainer_state)
    from fragment_llm.checkpoint.store import restore_rng_state

    restore_rng_state(checkpoint.trainer_state["rng"])


def _summary(request: TrainRequest, trainer: Trainer, last: StepResult | None,
             evaluation: tuple[float, float] | None, *, interrupted: bool, seconds: float,
             checkpoint: Path | None = None, terminated: bool = False) -> TrainSummary:
    return TrainSummary(
        out=request.out, steps=trainer.step, tokens=trainer.step * trainer.tokens_per_step,
        seconds=seconds, final_train_loss=last.loss if last else None,
        val_loss=evaluation[0] if evaluation else None,
        val_bpb=evaluation[1] if evaluation else None, checkpoint=checkpoint,
        interrupted=interrupted, parameters=count_parameters(trainer.model),
        terminated=terminated)


class TrainLoop:
    """The loop around `Trainer`: when to log, evaluate, checkpoint and stop.

    Under torchrun every rank runs the same collectives in the same order on every way
    out: whether to stop is agreed before each step (`_should_stop`), a NaN stop follows
    from the loss averaged over ranks, and rank 0's writes end in an agreement
    (`run_on_main`, or a metrics failure held until the next `_should_stop`).
    """

    def __init__(self, request: TrainRequest, trainer: Trainer, tokenizer: Any,
                 model_config: ModelConfig, on_event: EventFn) -> None:
        self.request, self.trainer, self.tokenizer = request, trainer, tokenizer
        self.model_config, self.on_event = model_config, on_event
        self.failure: Exception | None = None  # rank 0's, until the ranks agree to stop
        self.metrics = MetricsLog(request.out / METRICS_FILE, trainer.env.is_main)
        self._hold_failure(lambda: self.metrics.truncate_after(trainer.step))
        self.evaluation: tuple[float, float] | None = None
        self.checkpoint: Path | None = None
        self.saved_step: int | None = None

    def _hold_failure(self, work: Callable[[], None]) -> None:
        """Run rank 0's `work`; with peers, keep its error for the next agreement."""
        try:
            work()
        except Exception as exc:
            if self.trainer.env.world == 1:
                raise
            self.failure = self.failure or exc

    def run(self, interrupt: InterruptFlag) -> TrainSummary:
        cfg, trainer = self.request.train, self.trainer
        started, last = time.perf_counter(), None
        while not self._should_stop(interrupt):
            step_start = time.perf_counter()
            last = trainer.train_step()
            seconds = time.perf_counter() - step_start
            trainer.elapsed += seconds
            self._after_step(last, seconds)
            if trainer.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise TrainingError(
                    f"loss or gradients were not finite for {MAX_NONFINITE_IN_A_ROW} steps in "
                    f"a row (step {trainer.step})",
                    hint="lower --lr, keep --grad-clip on, or use --precision fp32")
            # The planned last step is saved once, after the final evaluation, so its
            # config.json records the figure the run ended on.
            if (cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0
                    and trainer.step < cfg.max_steps):
                self._save()
        # As agreed by the last `_should_stop`: a signal arriving from here on must not
        # make this rank's final evaluation differ from the others'.
        interrupted, terminated = interrupt.requested, interrupt.terminated
        self._final_evaluation(interrupted)
        if self.saved_step != trainer.step:  # the same on every rank (not only rank 0)
            self._save()
        if self.failure is not None:  # no collective follows: rank 0 may stop alone
            raise self.failure
        return _summary(self.request, trainer, last, self.evaluation,
                        interrupted=interrupted, terminated=terminated,
                        seconds=time.perf_counter() - started, checkpoint=self.checkpoint)

    def _should_stop(self, interrupt: InterruptFlag) -> bool:
        """The same answer on every rank. Ranks time themselves, and a signal may reach
        one rank a step before another: elapsed time, signals and rank 0's failure are
        agreed (the largest over ranks) in one all-reduce before each step."""
        cfg, trainer = self.request.train, self.trainer
        elapsed, sigint, sigterm, failed = agree(
            [trainer.elapsed, float(interrupt.signum == signal.SIGINT),
             float(interrupt.terminated), float(self.failure is not None)],
            trainer.env, trainer.device)
        if self.failure is not None:
            raise self.failure
        if failed:
            raise_peer_failed(trainer.env)
        trainer.elapsed = elapsed
        interrupt.adopt(sigint > 0, sigterm > 0)
        out_of_time = cfg.max_time_s is not None and trainer.elapsed >= cfg.max_time_s
        return interrupt.requested or trainer.step >= cfg.max_steps or out_of_time

    def _after_step(self, result: StepResult, seconds: float) -> None:
        cfg, step = self.request.train, self.trainer.step
        values = {"step": step, "train_loss": result.loss, "lr": result.lr,
                  "grad_norm": result.grad_norm, "skipped": not result.finite,
                  "tokens_per_s": self.trainer.tokens_per_step / max(seconds, 1e-9),
                  "elapsed_s": self.trainer.elapsed, "progress": self.trainer.progress}
        if cfg.eval_every and step % cfg.eval_every == 0:
            values.update(self._evaluate(log=False))
        if step % cfg.log_every == 0 or step == 1 or "val_loss" in values:
            self._hold_failure(lambda: self.metrics.write(values))
        self.on_event(TrainEvent("step", step, values))

    def _final_evaluation(self, interrupted: bool) -> None:
        """The number a run ends on: `final_eval_blocks` spread over the held-out split.
        After Ctrl-C, the quicker periodic size (the user is waiting to get out)."""
        cfg, step = self.request.train, self.trainer.step
        evaluated_now = self.evaluation is not None and self.metrics.last_eval_step == step
        if interrupted or cfg.final_eval_blocks <= cfg.eval_blocks:
            if not evaluated_now:
                self._evaluate()
            return
        self._evaluate(max_blocks=cfg.final_eval_blocks)

    def _evaluate(self, log: bool = True, max_blocks: int | None = None) -> dict[str, float]:
        self.evaluation = self.trainer.evaluate(max_blocks)
        self.metrics.last_eval_step = self.trainer.step
        if self.evaluation is None:
            return {}
        values = {"val_loss": self.evaluation[0], "val_bpb": self.evaluation[1]}
        if log:
            self._hold_failure(lambda: self.metrics.write({"step": self.trainer.step, **values}))
        self.on_event(TrainEvent("eval", self.trainer.step, values))
        return values

    def _save(self) -> None:
        """Rank 0 writes the checkpoint; every rank waits for it and learns the outcome."""
        from fragment_llm.checkpoint.store import step_path

        trainer = self.trainer
        run_on_main(trainer.env, trainer.device, self._write_checkpoint)
        self.saved_step = trainer.step
        self.checkpoint = step_path(self.request.out, trainer.step)

    def _write_checkpoint(self) -> None:
        from fragment_llm.checkpoint.store import capture_rng_state, save_checkpoint

        if self.failure is not None:  # a metrics write failed: stop here, with everyone
            raise self.failure
        trainer = self.trainer
        state = {**trainer.state_dict(), "rng": capture_rng_state()}
        path = save_checkpoint(
            self.request.out, trainer.step, model=trainer.model,
            optimizer=trainer.optimizer, trainer_state=state, config=self._config_record(),
            tokenizer_file=self.request.tokenizer, provenance=self._provenance(),
            keep_last=self.request.train.keep_checkpoints)
        self.on_event(TrainEvent("checkpoint", trainer.step, {"path": str(path)}))

    def _config_record(self) -> dict[str, Any]:
        evaluation = self.evaluation
        return {"model": self.model_config.model_dump(mode="json"),
                "train": self.request.train.model_dump(mode="json"),
                "fragment_version": __version__,
                # How chat renders turns for this model (chat.py): plain-text documents
                # train a model that continues a "User: ... Assistant:" transcript.
                "chat_format": TRANSCRIPT_CHAT_FORMAT,
                "val_loss": evaluation[0] if evaluation else None,
                "val_bpb": evaluation[1] if evaluation else None,
                # What resuming changed ([train] holds the values in force now).
                "resume_changes": (self.request.resumed.change_record()
                                   if self.request.resumed else [])}

    def _provenance(self) -> dict[str, str]:
        from fragment_llm.checkpoint.store import model_config_sha256

        shards = self.trainer.shards
        return {"tokenizer_sha256": self.tokenizer.sha256,
                "tokens_manifest_sha256": shards.manifest_sha256,
                "processed_manifest_sha256": shards.manifest.processed_manifest_sha256,
                "model_config_sha256": model_config_sha256(self._config_record()["model"])}


class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per line, appended and flushed by rank 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.last_eval_step: int | None = None

    def write(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in values.items()}
        line = (json.dumps(clean, sort_keys=True) + "\n").encode("utf-8")
        # O_NOFOLLOW: a metrics.jsonl planted as a symlink must not redirect our appends
        # into some other file; a full disk is one OutputError line, not an internal error.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with translate_os_errors(self.path):
            fd = os.open(self.path, flags, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (and any torn last line)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                if int(json.loads(line).get("step", -1)) <= step:
                    kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
