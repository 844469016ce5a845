"""Finding the input files of `fragment preprocess`, and the caps decided from their sizes.

`discover(inputs, config)` walks the inputs in sorted order without leaving an input
root, keeping only regular files with a supported extension (`.txt`, `.md`, `.jsonl`,
`.parquet`; `kinds` names others for another boundary, e.g. fine-tuning's conversations)
as `FileTask`s and recording why every other path was rejected or skipped
(an `InputFile` with a `Reason`). `apply_caps` then rejects files over
`max_file_bytes`, and every file once `max_total_bytes` is reached, from the sizes
discovery saw, so the outcome never depends on timing.

It reads no file's content (`readers.py`) and writes nothing (`preprocess.py`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fragment_llm.config import PreprocessConfig
from fragment_llm.data.processed import SKIP_REASONS, InputFile, Reason, Status
from fragment_llm.data.readers import KINDS, FileTask, file_type
from fragment_llm.errors import InputDataError

Discovered = FileTask | InputFile  # a file to read, or one already rejected/skipped


@dataclass(frozen=True, slots=True)
class _Descend:
    real: Path  # a folder to walk next


def discover(inputs: Sequence[Path], config: PreprocessConfig,
             kinds: Mapping[str, str] = KINDS) -> list[Discovered]:
    """Every path below `inputs`, in a fixed order, as a task or as a rejection.

    Stops after `max_files` entries, recording one `too-many-files` rejection.
    """
    found: list[Discovered] = []
    seen_files: set[tuple[int, int]] = set()
    for given in inputs:
        for entry in _entries_of(given, seen_files, kinds):
            if len(found) >= config.max_files:
                found.append(_record(entry.root, entry_path(entry), 0, Reason.TOO_MANY_FILES,
                                     f"discovery stopped after max_files={config.max_files}"))
                return found
            found.append(entry)
    return found


def apply_caps(entries: list[Discovered], config: PreprocessConfig) -> list[Discovered]:
    """Reject files over `max_file_bytes`, and every file once `max_total_bytes` is reached.

    Decided here, from the sizes discovery saw, so the outcome does not depend on timing.
    """
    capped: list[Discovered] = []
    total, stopped = 0, False
    for entry in entries:
        if isinstance(entry, FileTask):
            if entry.size > config.max_file_bytes:
                entry = _record(entry.root, entry.source, entry.size, Reason.TOO_LARGE,
                                f"{entry.size} bytes; max_file_bytes is {config.max_file_bytes}")
            elif stopped or total + entry.size > config.max_total_bytes:
                stopped = True
                entry = _record(entry.root, entry.source, entry.size, Reason.TOTAL_CAP,
                                f"max_total_bytes={config.max_total_bytes} reached; not read")
            else:
                total += entry.size
        capped.append(entry)
    return capped


def _entries_of(given: Path, seen_files: set[tuple[int, int]],
                kinds: Mapping[str, str]) -> Iterator[Discovered]:
    """An explicit input is followed even if it is a symlink: the user named it."""
    real = resolve(given)
    if real.is_dir():
        yield from _walk(real, path_label(str(given)), seen_files, kinds)
        return
    root = path_label(str(given.parent))
    try:
        info = os.stat(real)
    except OSError:
        yield _record(root, path_label(given.name), 0, Reason.VANISHED, "disappeared")
        return
    item = _classify(real, info, path_label(given.name), root, set(), seen_files, kinds)
    assert not isinstance(item, _Descend)  # real is not a folder
    yield item


def _walk(root: Path, label: str, seen_files: set[tuple[int, int]],
          kinds: Mapping[str, str]) -> Iterator[Discovered]:
    """Depth-first, names sorted, with an explicit stack (no recursion limit to hit)."""
    visited = {_key(os.stat(root))}
    stack: list[tuple[Path, str, list[str]]] = []
    unlistable = _push_folder(stack, root, "", label)
    if unlistable:
        yield unlistable
    while stack:
        folder, prefix, names = stack[-1]
        if not names:
            stack.pop()
            continue
        name = names.pop()
        item = _examine(folder, name, prefix + name, root, label, visited, seen_files, kinds)
        if not isinstance(item, _Descend):
            yield item
        elif unlistable := _push_folder(stack, item.real, prefix + name, label):
            yield unlistable


def _push_folder(stack: list[tuple[Path, str, list[str]]], folder: Path, rel: str,
                 label: str) -> InputFile | None:
    """Put a folder's names on the walk's stack, reversed so `pop()` gives sorted order."""
    try:
        names = sorted(os.listdir(folder), reverse=True)
    except OSError:
        return _record(label, path_label(rel or "."), 0, Reason.UNREADABLE,
                       "folder cannot be listed")
    stack.append((folder, rel + "/" if rel else "", names))
    return None


def _examine(folder: Path, name: str, rel: str, root: Path, label: str,
             visited: set[tuple[int, int]], seen_files: set[tuple[int, int]],
             kinds: Mapping[str, str]) -> Discovered | _Descend:
    """One name in a folder being walked: a symlink is followed only inside the root."""
    path = folder / name
    try:
        info = os.lstat(path)
    except OSError:
        return _record(label, path_label(rel), 0, Reason.VANISHED, "disappeared during discovery")
    if not stat.S_ISLNK(info.st_mode):
        return _classify(path, info, path_label(rel), label, visited, seen_files, kinds)
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(root):
        return _record(label, path_label(rel), 0, Reason.SYMLINK_ESCAPES_ROOT,
                       "symlink points outside the input folder; not followed")
    try:
        info = os.stat(target)
    except OSError as exc:
        reason = Reason.SYMLINK_LOOP if exc.errno == errno.ELOOP else Reason.BROKEN_SYMLINK
        return _record(label, path_label(rel), 0, reason, "symlink cannot be resolved")
    if stat.S_ISDIR(info.st_mode) and folder.is_relative_to(target):
        return _record(label, path_label(rel), 0, Reason.SYMLINK_LOOP,
                       "symlink points to a folder that contains it; not followed")
    return _classify(target, info, path_label(rel), label, visited, seen_files, kinds)


def _classify(real: Path, info: os.stat_result, rel: str, label: str,
              visited: set[tuple[int, int]], seen_files: set[tuple[int, int]],
              kinds: Mapping[str, str]) -> Discovered | _Descend:
    if stat.S_ISDIR(info.st_mode):
        if _key(info) in visited:
            return _record(label, rel, 0, Reason.ALREADY_VISITED, "folder already walked")
        visited.add(_key(info))
        return _Descend(real)
    if not stat.S_ISREG(info.st_mode):
        return _record(label, rel, 0, Reason.NOT_REGULAR_FILE,
                       f"{file_type(info.st_mode)}: only regular files are read")
    kind = kinds.get(real.suffix.lower())
    if kind is None:
        return _record(label, rel, info.st_size, Reason.UNSUPPORTED_EXTENSION,
                       f"not one of {', '.join(kinds)}")
    if _key(info) in seen_files:
        return _record(label, rel, info.st_size, Reason.ALREADY_VISITED,
                       "same file as an earlier input")
    seen_files.add(_key(info))
    return FileTask(str(real), label, rel, kind, info.st_size)


def resolve(path: Path) -> Path:
    """`path` with every symlink resolved, or one line saying why it cannot be."""
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise InputDataError(f"cannot resolve {path}: {exc}") from None


def path_label(text: str) -> str:
    """A path as valid UTF-8 text: undecodable bytes in names become `\\xNN`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def entry_path(entry: Discovered) -> str:
    """The path of an entry relative to its input root."""
    return entry.source if isinstance(entry, FileTask) else entry.path


def _record(root: str, path: str, size: int, reason: Reason, detail: str) -> InputFile:
    status: Status = "skipped" if reason in SKIP_REASONS else "rejected"
    return InputFile(path=path, root=root, size=size, status=status, reason=reason,
                     detail=detail)


def _key(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)
