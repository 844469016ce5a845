"""Safe file I/O shared by every stage: capped reads, guarded JSON, atomic writes.

Reads never follow a symlink at the last path component, never open anything but a
regular file (a FIFO must not block a run), and never read more than a cap. Writes go
to a temporary name beside the target, are fsynced, then renamed into place, so a crash
or a full disk leaves either the old file or the new one, never half of either. Without
`overwrite`, the rename itself refuses an existing target (`rename_noreplace`), so two
runs started together cannot both write one output: the second is told it exists.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import numpy as np

from fragment_llm.errors import FragmentError, OutputError
from fragment_llm.safety.signals import uninterrupted

TEMP_MARKER = ".fragment-tmp-"
OLD_MARKER = ".fragment-old-"
HASH_CHUNK = 1 << 20
HINT_OVERWRITE = "pass --overwrite to replace it, or choose another --out"

# What json.loads returns. Untrusted documents are checked field by field (or by pydantic)
# before anything reads them as a narrower type.
JsonValue = dict[str, "JsonValue"] | list["JsonValue"] | str | int | float | bool | None

ErrorFactory = Callable[[str], FragmentError]


# --------------------------------------------------------------------------- reading


def open_regular(path: Path, error: type[FragmentError]) -> int:
    """Open `path` read-only without following a final symlink or blocking on a FIFO.

    Returns a file descriptor that is known (by fstat on the open descriptor, so there
    is no race with a swap) to refer to a regular file.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"file not found: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"refusing to follow a symlink: {path}") from None
        raise error(f"cannot open {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"not a regular file: {path}")
    return fd


def read_capped(path: Path, max_bytes: int, error: type[FragmentError]) -> bytes:
    """Read a whole regular file, refusing it before reading if it exceeds `max_bytes`."""
    fd = open_regular(path, error)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > max_bytes:
            raise error(f"file too large: {path} is {size} bytes, the limit is {max_bytes}")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while we read it
        raise error(f"file too large: {path} grew past {max_bytes} bytes while being read")
    return data


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, error: type[FragmentError], max_bytes: int | None = None) -> str:
    """Stream a regular file through sha256 without holding it in memory."""
    digest = hashlib.sha256()
    fd = open_regular(path, error)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise error(f"file too large: {path} is {size} bytes, the limit is {max_bytes}")
        while block := fh.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------- guarded JSON

# One pass over the bytes, 256 KiB at a time: memory stays a few arrays of one chunk.
DEPTH_CHUNK_BYTES = 1 << 18
_BACKSLASH, _QUOTE = ord("\\"), ord('"')
_OPENERS, _CLOSERS = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


def json_depth(data: bytes | str, chunk_bytes: int = DEPTH_CHUNK_BYTES) -> int:
    """Deepest bracket nesting in a JSON text, ignoring brackets inside strings.

    `'{"a": [1, [2]], "b": "[[["}' -> 3`. Cheap enough to run before `json.loads`,
    whose C parser recurses once per level.

    Linear in every case, vectorised with numpy: a quote is escaped when an odd run of
    backslashes comes right before it, a bracket is inside a string when an odd number
    of unescaped quotes comes before it. (A regular expression that skips strings is
    quadratic on an unterminated string of escaped quotes: it retries from every quote,
    40 KB took seconds.) Exact for valid JSON; on invalid JSON the count matches the
    parser's up to the first error, where the parser stops, so it is never below the
    depth the parser reaches. UTF-8 continuation bytes are never ASCII, so the bytes
    can be scanned as they are.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    scan = _DepthScan()
    for start in range(0, len(raw), chunk_bytes):
        scan.feed(np.frombuffer(raw, np.uint8, min(chunk_bytes, len(raw) - start), start))
    return scan.deepest


class _DepthScan:
    """The bracket count carried from one chunk to the next: the depth, whether the
    chunk starts inside a string, and whether its first byte is escaped."""

    def __init__(self) -> None:
        self.depth = self.deepest = 0
        self.in_string = self.escaped = False

    def feed(self, codes: np.ndarray) -> None:
        backslash = codes == _BACKSLASH
        positions = np.arange(len(codes), dtype=np.int32)
        # Where the run of backslashes ending at each byte starts (0: at the chunk's start,
        # continuing the previous chunk's run, whose parity is `self.escaped`).
        run_start = np.maximum.accumulate(np.where(backslash, -1, positions)) + 1
        run_length = positions + 1 - run_start
        odd_run = (run_length % 2 == 1) ^ ((run_start == 0) & self.escaped & backslash)
        escaped = np.empty(len(codes), dtype=bool)
        escaped[0] = self.escaped
        escaped[1:] = odd_run[:-1] & backslash[:-1]
        quotes = (codes == _QUOTE) & ~escaped
        inside = (np.cumsum(quotes, dtype=np.int32) % 2 == 1) ^ self.in_string
        steps = (np.isin(codes, _OPENERS) & ~inside).astype(np.int32)
        steps -= np.isin(codes, _CLOSERS) & ~inside
        running = np.cumsum(steps, dtype=np.int64) + self.depth
        self.deepest = max(self.deepest, int(running.max()))
        self.depth = int(running[-1])
        self.in_string ^= bool(quotes.sum() % 2)
        self.escaped = bool(odd_run[-1] & backslash[-1])


def refuse_duplicate_keys(pairs: list[tuple[str, JsonValue]]) -> dict[str, JsonValue]:
    """`object_pairs_hook` for untrusted JSON: two values for one key would be read
    differently by different readers (a proxy may take the first, Python takes the last),
    so neither is guessed."""
    result: dict[str, JsonValue] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def refuse_json_constant(name: str) -> NoReturn:
    """`parse_constant` for untrusted JSON: NaN and Infinity are not JSON."""
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json_guarded(data: bytes | str, where: str, error: type[FragmentError],
                       max_depth: int = 64) -> JsonValue:
    """Parse untrusted JSON: strict UTF-8, bounded nesting, no duplicate keys, no NaN.

    Every failure becomes `error("<rule>, in <where>")`, never a RecursionError or
    UnicodeDecodeError.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise error(f"invalid UTF-8 at byte {exc.start}, in {where}") from None
    if json_depth(text) > max_depth:
        raise error(f"JSON nested deeper than {max_depth} levels, in {where}")
    try:
        return json.loads(text, object_pairs_hook=refuse_duplicate_keys,
                          parse_constant=refuse_json_constant)
    except RecursionError:
        raise error(f"JSON nested too deeply, in {where}") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise error(f"invalid JSON ({exc}), in {where}") from None


# --------------------------------------------------------------------------- writing


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name_for(target: Path, marker: str = TEMP_MARKER) -> Path:
    """A unique hidden sibling of `target`, recognisable as ours by its marker."""
    return target.with_name(f".{target.name}{marker}{os.getpid()}-{uuid.uuid4().hex[:8]}")


_REASONS = {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EDQUOT: "disk quota exceeded",
            errno.ELOOP: "a symlink is in the way (not followed)"}


def os_error_reason(exc: OSError) -> str:
    """A short, lower-case reason for a failed file operation: `"read-only file system"`."""
    return _REASONS.get(exc.errno or 0) or (exc.strerror or str(exc)).lower()


@contextlib.contextmanager
def translate_os_errors(target: Path) -> Iterator[None]:
    """Turn disk-full, read-only and permission failures into one-line `OutputError`s."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename is None:
            raise
        raise OutputError(f"cannot write {target}: {os_error_reason(exc)}") from None


def output_exists(target: Path) -> OutputError:
    return OutputError(f"output already exists: {target}", hint=HINT_OVERWRITE)


def make_dirs(folder: Path, hint: str | None = None) -> None:
    """`mkdir -p folder`, where a failure the user can act on (a file in the way, a
    read-only file system, no permission) is one `OutputError` line naming the path."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # The first part of `folder` that exists and is not a folder, if any.
        blocker = next((part for part in reversed([folder, *folder.parents])
                        if os.path.lexists(part) and not part.is_dir()), None)
        if blocker == folder:
            raise OutputError(f"{folder} is a file, not a folder", hint=hint) from None
        reason = (f"{blocker} is a file, not a folder" if blocker is not None
                  else os_error_reason(exc))
        raise OutputError(f"cannot create folder {folder}: {reason}", hint=hint) from None


_RENAME_NOREPLACE = 1  # <linux/fs.h>
_AT_FDCWD = -100
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` unless `dst` exists (FileExistsError), in one atomic step.

    Linux `renameat2(RENAME_NOREPLACE)` where the file system supports it; elsewhere a
    hard link for a file (`link` fails on an existing name) and, for a folder, creating
    `dst` empty (`mkdir` fails on an existing name) then renaming over it.
    """
    if _renameat2_noreplace(src, dst):
        return
    if src.is_dir() and not src.is_symlink():
        os.mkdir(dst)
        try:
            os.rename(src, dst)  # over the empty folder just created: allowed by POSIX
        except OSError:
            os.rmdir(dst)
            raise
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # vfat, exFAT, some FUSE and SMB mounts: no hard links (and no renameat2). A check
        # just before the rename is the best these file systems allow.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _renameat2_noreplace(src: Path, dst: Path) -> bool:
    """True once renamed; False where renameat2 or its flag is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl before 1.2.4
        return False
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                 _RENAME_NOREPLACE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(dst))


def refuse_oversized(data: bytes, max_bytes: int, what: Path,
                     error: type[FragmentError], hint: str | None = None) -> None:
    """A writer's half of a reader's cap: refuse to write what the reader would refuse.

    `max_bytes` is the reader's constant, imported, never a copy of its value.
    """
    if len(data) > max_bytes:
        raise error(f"refusing to write {what}: it would be {len(data):,} bytes, and "
                    f"readers refuse more than {max_bytes:,}", hint=hint)


def atomic_write_bytes(target: Path, data: bytes, *, replace: bool = True) -> None:
    """Write `data` to `target` so that readers see the old file or the new one, never a mix.

    With `replace=False` an existing `target` is refused at the rename itself
    (`output already exists`), not only by a check before: nothing written meanwhile by
    another run is replaced. Temporaries that killed runs left beside `target` are
    removed first: nothing else would ever clean up after a writer killed between its
    write and its rename.
    """
    tmp = temp_name_for(target)
    with translate_os_errors(target):
        remove_stale_temps(target)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            _rename_into_place(tmp, target, replace)
            fsync_dir(target.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _rename_into_place(tmp: Path, target: Path, replace: bool) -> None:
    if replace:
        os.replace(tmp, target)
        return
    try:
        rename_noreplace(tmp, target)
    except FileExistsError:
        raise output_exists(target) from None


def atomic_write_text(target: Path, text: str, *, replace: bool = True) -> None:
    atomic_write_bytes(target, text.encode("utf-8"), replace=replace)


def dump_json(obj: JsonValue) -> str:
    """The one JSON style for artifacts: sorted keys, ASCII-safe, stable across runs."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n"


def fsync_tree(root: Path) -> None:
    """fsync every regular file below `root`, then every folder (children before parents)."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _restore_interrupted_swap(target: Path) -> None:
    """A run killed between the two renames of `_swap_into_place` left no `target`, only
    the previous result under an OLD_MARKER name: put it back rather than lose it."""
    if target.exists() or target.is_symlink():
        return
    literal = re.sub(r"([*?\[])", r"[\1]", target.name)  # glob metacharacters as themselves
    olds = sorted(target.parent.glob(f".{literal}{OLD_MARKER}*"))
    if olds:
        os.replace(olds[-1], target)


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete temporaries left beside `target` by killed runs (their pid is gone).

    A temporary's name carries the pid of the run that made it, so a live run's staging
    folder is never touched, and a dead run's goes with all it holds: the spool files its
    helper processes wrote, whenever they wrote them (helpers end with their run).
    """
    removed: list[Path] = []
    if not target.parent.is_dir():
        return removed
    _restore_interrupted_swap(target)
    prefixes = (f".{target.name}{TEMP_MARKER}", f".{target.name}{OLD_MARKER}")
    for entry in target.parent.iterdir():
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Build a folder in a temporary sibling and rename it over `target` only on success.

    If the body raises (or the process dies), `target` is untouched: the previous
    result survives and the temporary is removed (now, or by `remove_stale_temps`).
    Without `overwrite`, `target` must not exist when the work starts (checked first,
    to fail fast) nor when it is renamed into place (checked by the rename itself).
    """
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise output_exists(target)
    make_dirs(target.parent)
    tmp = temp_name_for(target)
    with translate_os_errors(target):
        remove_stale_temps(target)
        tmp.mkdir()
    try:
        yield tmp
        with translate_os_errors(target):
            fsync_tree(tmp)
            if overwrite:
                _swap_into_place(tmp, target)
            else:
                _rename_into_place(tmp, target, replace=False)
                fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = None
    try:
        with uninterrupted():  # a Ctrl-C or SIGTERM between the renames would leave no target
            if target.exists() or target.is_symlink():
                old = temp_name_for(target, OLD_MARKER)
                os.replace(target, old)
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:  # the new result is in place (or the swap failed before moving the old one)
        if old is not None and not os.path.lexists(tmp):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
