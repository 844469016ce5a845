"""Helper processes: how many to start, and that none outlives the process that started it.

Every pool in the package (preprocess's readers, the tokenizer's chunk counters and
encoders, the token-shard encoders of `train`) calls `die_with_parent()` first thing in
each helper, and sizes itself with `cap_workers`. This module starts no process itself
and imports nothing heavy, so a helper that imports it stays small.

Dying with the parent. A helper killed with its parent leaves nothing behind: its output
goes to the parent's staging folder, which the next run removes (`safeio`). A helper that
outlived a SIGKILLed parent used to finish its batch and write a spool into a staging
folder nobody would read. Two mechanisms, because helpers have two kinds of parent:

- a direct child (the `fork` and `spawn` start methods) asks Linux for SIGKILL when its
  parent dies (`prctl(PR_SET_PDEATHSIG)`), then checks the parent is still the one that
  started it: a parent that died before the `prctl` would never send the signal;
- a child of multiprocessing's fork server (whose own parent is the fork server, which
  outlives the process that asked for the helper), or any helper where `prctl` is
  missing, runs a watchdog thread: multiprocessing hands every helper a pipe end that
  reaches end-of-file when the requesting process is gone; the thread then ends the
  helper with `os._exit`. It acts within `WATCH_SECONDS`, or when the helper's current
  C call releases the interpreter lock.

How many. A helper costs a core and memory: `cap_workers` lowers a requested count to the
cores this process may run on (affinity and a cgroup CPU quota) and to what the memory
available fits at a measured cost per helper, and says why in a note the stage shows and
records. The outputs never depend on the count, so lowering it changes only the speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SIGKILL = 9
WATCH_SECONDS = 0.5
ORPHAN_EXIT = 1  # the status a helper ends with when its parent is gone (nobody reads it)

MiB = 1 << 20
# Of the memory available (MemAvailable), the share helpers may take: the rest stays for
# this process's own growth and everything else on the machine.
SAFE_FRACTION = 0.8
FALLBACK_MEMORY = 2 << 30
# Peak resident memory of one helper, measured (VmHWM, Linux x86-64, CPython 3.11, a
# 33 MB corpus; docs/preprocess.md, "Workers"), rounded up. A preprocess reader with
# pyarrow loaded peaks at ~100 MiB, plus up to ~4.6x the file it reads (the bytes, the
# decoded text, the cleaned text and its UTF-8: `READ_COPIES`). A chunk counter or an
# encoder at vocab 16,384 peaks at 35-43 MiB; its merge table grows with the vocabulary
# (`MERGE_BYTES` per merge: rank dict, token bytes, a share of the chunk cache).
READER_RSS = 112 * MiB
READ_COPIES = 5
TOKENIZER_RSS = 48 * MiB
MERGE_BYTES = 256


# ------------------------------------------------------------------------- lifetime


def die_with_parent() -> None:
    """Make this helper process end when the process that started it ends.

    Call it first in every helper (a pool's initializer, a `Process` target). A no-op in
    the main process. See the module docstring for the two mechanisms.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if os.getppid() == parent.pid and _ask_for_parent_death_signal():
        if os.getppid() != parent.pid:  # the parent died before the prctl: no signal comes
            os._exit(ORPHAN_EXIT)
        return
    threading.Thread(target=_watch, args=(parent.sentinel, os.getppid()), daemon=True,
                     name="fragment-parent-watchdog").start()


def _ask_for_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) == 0


def _watch(sentinel: int | None, ppid: int) -> None:
    """End this process once the requesting process is gone: its pipe end reaches EOF,
    or (where there is no pipe) this process was re-parented."""
    from multiprocessing.connection import wait

    while True:
        if sentinel is None:
            time.sleep(WATCH_SECONDS)
        elif wait([sentinel], WATCH_SECONDS):
            break
        if os.getppid() != ppid:
            break
    os._exit(ORPHAN_EXIT)


# --------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class WorkerCap:
    """A worker count after `cap_workers`, with the reason when it was lowered."""

    count: int
    requested: int
    reason: str | None = None

    @property
    def note(self) -> str | None:
        if self.reason is None:
            return None
        return f"workers = {self.requested} lowered to {self.count}: {self.reason}"


def cap_workers(requested: int, per_worker: int) -> WorkerCap:
    """`requested` lowered to the usable cores and to what available memory fits.

    `per_worker` is the resident memory one helper is expected to take (bytes). The
    count includes this process where the stage works in it too: it is never below 1.
    """
    cores = usable_cores()
    fits = max(1, int(available_memory() * SAFE_FRACTION) // max(per_worker, 1))
    if requested > cores and cores <= fits:
        noun = "core is" if cores == 1 else "cores are"
        return WorkerCap(cores, requested, f"{cores} CPU {noun} available to this process")
    if requested > fits:
        return WorkerCap(fits, requested,
                         f"the {available_memory() // MiB:,} MiB of memory available fit "
                         f"{fits} of ~{per_worker // MiB:,} MiB each")
    return WorkerCap(requested, requested)


def reader_bytes(largest_file: int) -> int:
    """Memory one preprocess reader needs to read files up to `largest_file` bytes."""
    return READER_RSS + READ_COPIES * largest_file


def tokenizer_bytes(vocab_size: int) -> int:
    """Memory one chunk counter or encoder needs at `vocab_size`."""
    return TOKENIZER_RSS + MERGE_BYTES * vocab_size


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, lowered by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """`"200000 100000"` -> 2; `"max 100000"` (no quota) or no file -> None."""
    with contextlib.suppress(OSError, ValueError, ZeroDivisionError):
        limit, period = path.read_text(encoding="ascii").split()[:2]
        if limit != "max":
            return max(1, -(-int(limit) // int(period)))  # a partial core counts as one
    return None


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, else free pages, else a 2 GiB guess."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    with contextlib.suppress(AttributeError, OSError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if pages > 0:
            return int(pages)
    return FALLBACK_MEMORY
