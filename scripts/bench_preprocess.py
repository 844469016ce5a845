"""Benchmark `fragment preprocess`: MB/s and peak RSS on >= 200 MB of real text.

Builds a corpus in a temporary folder from the shared Shakespeare plays, repeated with
variations so that deduplication keeps every copy (rotated and swapped lines, a numbered
header, upper-casing; some copies with curly quotes and accents so the Unicode paths run,
some with CRLF line endings and trailing spaces), as a mix of .txt, .jsonl and .parquet.
Then runs, each in a fresh process (warm page cache) whose process tree is sampled for
RSS and CPU time:

- `naive`:      a plain single-process read-clean-hash-write loop (the baseline);
- `workers=1`:  `run_preprocess` in one process;
- `workers=2`:  `run_preprocess` as by default (this process plus one helper);

and `workers=2` again on a smaller corpus, to show that peak RSS does not grow with the
input. Run it alone on the machine (another benchmark would share the cores):

    flock /tmp/fragment-bench.lock .venv/bin/python scripts/bench_preprocess.py --mb 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "shakespeare"
CHUNK_CHARS = 4000  # JSONL / Parquet documents: a few paragraphs each
MODES = ("naive", "workers=1", "workers=2")


# ---------------------------------------------------------------- the test corpus


def variant(text: str, copy: int, rng: random.Random) -> str:
    """One recognisably different copy of a play: dedup must keep it."""
    lines = text.split("\n")
    start = rng.randrange(len(lines))
    lines = lines[start:] + lines[:start]  # rotated, so every document differs
    for _ in range(len(lines) // 50):  # and a few swapped lines
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    body = "\n".join(lines)
    if copy % 4 == 1:
        body = body.replace("'", "\u2019").replace("e ", "\u00e9 ")  # non-ASCII paths
    if copy % 4 == 2:
        body = body.upper()
    if copy % 5 == 3:
        body = body.replace("\n", "  \r\n")  # CRLF and trailing whitespace to clean
    return f"Copy {copy}\n\n{body}"


def chunks(text: str) -> list[str]:
    """Paragraph-aligned pieces of about CHUNK_CHARS characters."""
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= CHUNK_CHARS:
            pieces.append("\n\n".join(current))
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def write_copy(folder: Path, copy: int, plays: list[tuple[str, str]], kinds: list[str]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(copy)
    texts = [(name, variant(text, copy, rng)) for name, text in plays]
    kind = kinds[copy % len(kinds)]
    target = folder / f"copy{copy:03d}"
    target.mkdir()
    for name, text in texts:
        if kind == "txt":
            (target / f"{name}.txt").write_text(text, encoding="utf-8", newline="")
        elif kind == "jsonl":
            lines = [json.dumps({"text": piece, "n": i}) for i, piece in enumerate(chunks(text))]
            (target / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            table = pa.table({"text": chunks(text)})
            pq.write_table(table, target / f"{name}.parquet", compression="zstd",
                           row_group_size=256)
    return sum(p.stat().st_size for p in target.iterdir())


def build_corpus(folder: Path, corpus: Path, megabytes: float, kinds: list[str]) -> int:
    plays = [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(corpus.glob("*.txt"))]
    total, copy = 0, 0
    while total < megabytes * 1e6:
        total += write_copy(folder, copy, plays, kinds)
        copy += 1
    return total


# ------------------------------------------------------------- the naive baseline

_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f"
                     "\u061c\u200b-\u200d\u2060\ufeff]")


def naive_clean(text: str) -> str:
    """The same rules, written the obvious way: every step on every document."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    text = _UNSAFE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def naive_documents(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        return [t for t in pq.read_table(path).column("text").to_pylist() if t]
    text = path.read_bytes().decode("utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]
    return [text]


def run_naive(data: Path, out: Path) -> int:
    """Read, clean, hash, dedup and write, one file after another in one process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir()
    schema = pa.schema([("text", pa.string()), ("source", pa.string()), ("sha256", pa.string())])
    seen: set[str] = set()
    read = 0
    with pq.ParquetWriter(out / "shard-00000.parquet", schema, compression="zstd") as writer:
        for path in sorted(p for p in data.rglob("*") if p.is_file()):
            read += path.stat().st_size
            rows: dict[str, list[str]] = {"text": [], "source": [], "sha256": []}
            for doc in naive_documents(path):
                text = naive_clean(doc)
                digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
                if len(text) >= 16 and digest not in seen:
                    seen.add(digest)
                    for key, value in zip(rows, (text, str(path.relative_to(data)), digest),
                                          strict=True):
                        rows[key].append(value)
            writer.write_table(pa.table(rows, schema=schema))
    return read


# ------------------------------------------------------------------- measurement


def child(mode: str, data: Path, out: Path) -> None:
    """Runs in a fresh process: one timed run, result as one JSON line on stdout."""
    started = time.perf_counter()
    if mode == "naive":
        read = run_naive(data, out)
    else:
        from fragment_llm.config import PreprocessConfig
        from fragment_llm.data.preprocess import run_preprocess

        config = PreprocessConfig(workers=int(mode.split("=")[1]))
        read = run_preprocess([data], out, config).manifest.counts.bytes_read
    seconds = time.perf_counter() - started
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "bytes": read, "main_rss": main_rss}))


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from the parent ids in /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = read_stat(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


class TreeSampler:
    """Samples a process tree: peak summed RSS, and CPU seconds per process (the last
    value seen before each exits, so a process living < 0.1 s may be missed)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss = 0
        self.cpu: dict[int, float] = {}
        self.ticks = os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        rss = 0
        for pid in process_tree(self.pid):
            fields = read_stat(pid)
            if fields:
                self.cpu[pid] = (int(fields[11]) + int(fields[12])) / self.ticks
                rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        self.peak_rss = max(self.peak_rss, rss)


def measure(mode: str, data: Path, scratch: Path) -> dict[str, float]:
    out = Path(tempfile.mkdtemp(dir=scratch)) / "out"
    command = [sys.executable, __file__, "--child", mode, "--data", str(data), "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    sampler = TreeSampler(process.pid)
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.05):
            sampler.sample()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    stdout, _ = process.communicate()
    stop.set()
    thread.join()
    if process.returncode != 0:
        raise SystemExit(f"{mode} failed with exit code {process.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_rss"] = sampler.peak_rss
    result["cpu"] = sum(sampler.cpu.values())
    return result


def background_busy(seconds: float = 1.0) -> float:
    """Percent of all cores busy while we run nothing: other users of the machine."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = ticks()
    time.sleep(seconds)
    idle1, total1 = ticks()
    return 100 * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def warm_cache(folder: Path) -> None:
    """Read the corpus once so every run starts from the page cache: this machine's
    kernel evicts idle pages within seconds, and a cold read measures the disk instead."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.read_bytes()


def best_of(repeat: int, mode: str, data: Path, scratch: Path) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        warm_cache(data)
        busy = background_busy(0.5)
        result = measure(mode, data, scratch)
        result["busy"] = busy
        runs.append(result)
    return min(runs, key=lambda r: r["seconds"])


def row(label: str, result: dict[str, float], baseline: float | None) -> str:
    mb = result["bytes"] / 1e6
    speed = mb / result["seconds"]
    ratio = f"{speed / baseline:5.2f}x" if baseline else "    -"
    return (f"{label:<22} {mb:8.1f} {result['seconds']:8.2f} {speed:8.1f} "
            f"{result['main_rss'] / 2**20:10.0f} {result['tree_rss'] / 2**20:10.0f} "
            f"{result['cpu']:8.1f} {ratio} {result['busy']:7.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200, help="corpus size for the main runs")
    parser.add_argument("--small-mb", type=float, default=50,
                        help="a smaller corpus, to show that RSS does not grow with input")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset")
    parser.add_argument("--corpus", type=Path, default=CORPUS,
                        help="folder of .txt files to repeat (default: the shared Shakespeare)")
    parser.add_argument("--formats", default="txt,jsonl,parquet",
                        help="input formats, in turn per copy (e.g. 'txt' for text files only)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode; the fastest is shown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.out)
        return
    if not sorted(args.corpus.glob("*.txt")):
        raise SystemExit(f"no .txt files in {args.corpus}; pass --corpus")
    with tempfile.TemporaryDirectory(prefix="fragment-bench-") as scratch:
        report(Path(scratch), args.corpus, args.mb, args.small_mb, args.modes.split(","),
               args.repeat, args.formats.split(","))
    print("Warm page cache (the corpus is read just before each run). "
          "RSS in MiB: 'main' is the preprocess process's exact peak; 'tree' the sampled peak "
          "of main + helpers summed (shared pages counted twice). 'CPU s' sums the tree. "
          "'bg busy': other processes' load on all cores just before the run.")


def report(scratch: Path, corpus: Path, megabytes: float, small: float,
           modes: list[str], repeat: int, kinds: list[str]) -> None:
    print(f"{'run':<22} {'MB':>8} {'seconds':>8} {'MB/s':>8} {'RSS main':>10} "
          f"{'RSS tree':>10} {'CPU s':>8} {'vs naive':>6} {'bg busy':>8}")
    baseline = None
    for size in (megabytes, small):
        data = scratch / f"corpus-{size:g}"
        data.mkdir()
        build_corpus(data, corpus, size, kinds)
        for mode in modes if size == megabytes else ["workers=2"]:
            result = best_of(repeat, mode, data, scratch)
            speed = result["bytes"] / 1e6 / result["seconds"]
            baseline = speed if mode == "naive" else baseline
            print(row(f"{mode} @ {size:g} MB", result, baseline if mode != "naive" else None),
                  flush=True)


if __name__ == "__main__":
    main()
