"""Where a run executes: device and precision choice, AMP, DDP collectives, the
run-folder lock and the Ctrl-C/SIGTERM flag.

Every rank takes the same decisions: `agree` all-reduces the stop flags once per step,
`run_on_main` lets rank 0 write while the others wait for its verdict.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from fragment_llm.errors import (
    ConfigError,
    OutputError,
    TrainingError,
)
from fragment_llm.safety.files import translate_os_errors
from fragment_llm.safety.signals import Terminated, raise_when_safe

LOCK_FILE = ".lock"


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
    _wait_for_gloo_to_let_go(tensor)
    return tensor.tolist()


def _wait_for_gloo_to_let_go(*tensors: torch.Tensor) -> None:
    """Return once gloo's worker thread has dropped its references to `tensors`, which
    a collective that has just returned was given.

    The collective returns as soon as its result is in; the gloo thread that ran it
    drops its references a moment later (after a quarter of 2,000 all-reduces timed
    here), and dropping a tensor that Python made takes the GIL. If this rank has gone
    on to leave meanwhile and the interpreter is shutting down, that thread is ended
    inside a C++ destructor and the process aborts ("terminate called without an active
    exception", SIGABRT) at the end of a run that went well: seen on a busy 2-core
    machine, on both ranks of a last-step save and on one rank after a SIGTERM. Waiting
    here, with the GIL free, keeps the drop inside the run. Gloo's CPU tensors only; a
    torch without `Tensor._use_count` does not wait.
    """
    deadline = time.monotonic() + 10.0  # a bound, not an expected wait (< 1 ms seen)
    for tensor in tensors:
        use_count = getattr(tensor, "_use_count", None)
        if tensor.device.type != "cpu" or use_count is None:
            continue
        while use_count() > 1 and time.monotonic() < deadline:  # 1: the Python tensor's
            time.sleep(0.0002)


def broadcast_text(text: str | None, device: torch.device) -> str | None:
    """Rank 0's `text` on every rank, sent as UTF-8 bytes in a tensor: no object crosses
    the wire pickled (`broadcast_object_list` would unpickle whatever arrives)."""
    data = b"" if text is None else text.encode("utf-8")
    size = torch.tensor([-1 if text is None else len(data)], dtype=torch.int64, device=device)
    torch.distributed.broadcast(size, src=0)
    _wait_for_gloo_to_let_go(size)
    length = int(size.item())
    if length < 0:
        return None
    buffer = torch.zeros(length, dtype=torch.uint8, device=device)
    if data and torch.distributed.get_rank() == 0:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    torch.distributed.broadcast(buffer, src=0)
    _wait_for_gloo_to_let_go(buffer)
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
        _wait_for_gloo_to_let_go(value)
        value /= env.world
    return value


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

    Whether to stop is decided from `agreed` (what `adopt` last took from every rank),
    never from `signum`: a signal that reaches a rank while it waits in the all-reduce
    of its flags is handled right after that all-reduce returns, so it is in this rank's
    `signum` but in no other rank's agreement. Stopping on it would leave this rank in
    its final evaluation and the others in their next step, each waiting in a different
    collective for ever; kept for the next agreement, it stops every rank a step later.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.agreed: int | None = None  # the signal every rank stops for, once agreed
        self.received = False
        self.previous: dict[int, Any] = {}

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
        """Take on what the ranks agreed they received (SIGTERM wins: the stricter stop)."""
        if sigterm:
            self.signum = signal.SIGTERM
        elif sigint and self.signum is None:
            self.signum = signal.SIGINT
        self.agreed = signal.SIGTERM if sigterm else signal.SIGINT if sigint else None

    def __enter__(self) -> InterruptFlag:
        with contextlib.suppress(ValueError):  # not the main thread: no handler, no flag
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
