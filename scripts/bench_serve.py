"""Benchmark: `fragment serve` under load, its time to first token, and slots' speed-up.

Not a test. It takes /tmp/fragment-bench.lock itself (other benchmarks use the same
lock through `flock`), so it never overlaps another benchmark on the same cores:
    .venv/bin/python scripts/bench_serve.py

A random-init `small` model (vocab 8192, a synthetic tokenizer) is saved to a temporary
folder and served by a real `python -m fragment_llm serve` child process on loopback
(a separate process, so the clients here never share its interpreter lock), then:
- load: --clients concurrent clients send --requests completions between them (stdlib
  http.client, keep-alive); each is answered (200) or refused (429, after which that
  client waits the Retry-After it was given). Anything else, an error or a request over
  --client-timeout, counts as lost: the goal is none lost. p50/p99 latency of answers.
- RSS: the server's resident memory (its child processes included) after a warm-up,
  before the load and after it: flat means no leak.
- TTFT: a streamed completion of a 64-token prompt to an idle server; the time from
  sending the request to the first text chunk; the median of --ttft-runs.
- tokens/s: --throughput-clients clients at once, each asking for --throughput-tokens
  tokens (temperature 1, so a random model rarely stops early) --throughput-requests
  times; generated tokens (from `usage`) over wall time, for a server with 1 slot and
  with 2 slots, started afresh in interleaved rounds (1, 2, 1, 2, ...); medians quoted,
  because the machine is shared and a neighbour's load comes and goes. Each of those
  servers then times 5 more TTFTs. --compare-threads adds 1 and 2 slots on threads (the
  server as it was before its slots became worker processes) to each round. Each round
  also says how many cores the server (with its workers) used: 2 slots can only be 2x
  one slot when the machine gives them 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fragment_llm.config import MODEL_PRESETS, ModelConfig
from fragment_llm.model.gpt import GPT
from fragment_llm.tokenizer.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import VOCAB, synthetic_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOCK = Path("/tmp/fragment-bench.lock")
HOST = "127.0.0.1"
WORDS = ("river", "stone", "lantern", "harbour", "meadow", "copper", "window", "orchard")


# ------------------------------------------------------------------------ the model


def save_small(folder: Path) -> Path:
    """A random-init `small` checkpoint with a synthetic 8192-token tokenizer."""
    from fragment_llm.checkpoint.save import save_checkpoint

    tok = folder / "tokenizer.json"
    synthetic_tokenizer(tok)
    config = ModelConfig(**{**MODEL_PRESETS["small"], "vocab_size": VOCAB})
    torch.manual_seed(0)
    return save_checkpoint(folder / "run", 1, model=GPT(config), optimizer=None,
                           trainer_state={"step": 1},
                           config={"model": config.model_dump(mode="json")},
                           tokenizer_file=tok)


def prompt_of(tokenizer: Tokenizer, tokens: int) -> str:
    """A plain-words prompt that a completion request turns into exactly `tokens` ids
    (its text's ids after `<|endoftext|>`)."""
    words = [WORDS[i % len(WORDS)] for i in range(tokens * 2)]
    while len(words) > 1 and len(tokenizer.encode(" ".join(words))) > tokens - 1:
        words.pop()
    text = " ".join(words)
    while len(tokenizer.encode(text)) < tokens - 1:
        text += "."
    return text


# ----------------------------------------------------------------------- the server


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    startup_s: float = 0.0

    def rss_mib(self) -> float:
        """Resident memory of the server and every process under it."""
        return sum(_rss_kib(pid) for pid in _tree(self.process.pid)) / 1024

    def cpu_s(self) -> float:
        """CPU seconds (user + system) the server and its workers have used so far."""
        return sum(_cpu_s(pid) for pid in _tree(self.process.pid))


def _tree(pid: int) -> list[int]:
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*"):
            with contextlib.suppress(OSError):
                pids += [int(c) for c in (task / "children").read_text().split()]
        index += 1
    return pids


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# The server as `fragment serve` ran it before its slots became processes: the same app
# with slots on threads of the server's process, for comparison (--compare-threads).
_THREAD_SERVER = """
import sys
from pathlib import Path
import torch
from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.config import ServeConfig
from fragment_llm.serve import run
torch.set_num_threads(1)
path, port, slots, queue, max_tokens = sys.argv[1:]
trained = load_trained(Path(path))
settings = ServeConfig.model_validate({"port": int(port), "slots": int(slots),
    "queue": int(queue), "max_new_tokens": int(max_tokens), "max_time_s": 600,
    "model_name": "bench", "access_log": False})
run.serve(run.ServeRequest(trained.model, trained.tokenizer, None, trained.checkpoint.path,
                           0, settings, None, worker_processes=False), lambda url: None)
"""


@contextlib.contextmanager
def serving(checkpoint: Path, slots: int, queue: int, max_tokens: int,
            kind: str = "process") -> Iterator[Server]:
    """`fragment serve` in a child process, ready (GET /health is 200) when yielded;
    `kind` "thread": the same server with its slots on threads (_THREAD_SERVER)."""
    port = free_port()
    argv = [sys.executable, "-m", "fragment_llm", "--quiet", "serve", "--checkpoint",
            str(checkpoint), "--port", str(port), "--slots", str(slots), "--queue", str(queue),
            "--max-tokens", str(max_tokens), "--timeout", "600", "--threads", "1",
            "--model-name", "bench"]
    if kind == "thread":
        argv = [sys.executable, "-c", _THREAD_SERVER, str(checkpoint), str(port), str(slots),
                str(queue), str(max_tokens)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = checkpoint.parent.parent / f"serve-{port}.log"  # its access log: one line a request
    with log.open("wb") as stderr:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    server = Server(process, port)
    try:
        started = time.monotonic()
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > started + 120:
                tail = log.read_text(errors="replace")[-2000:]
                raise SystemExit(f"the server did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.05)
        server.startup_s = time.monotonic() - started
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(port: int) -> bool:
    try:
        status, _ = post(http.client.HTTPConnection(HOST, port, timeout=2), "GET", "/health")
    except OSError:
        return False
    return status == 200


def post(conn: http.client.HTTPConnection, method: str, path: str,
         body: dict[str, object] | None = None) -> tuple[int, http.client.HTTPResponse]:
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response


def completion(prompt: str, max_tokens: int, temperature: float = 0.0,
               stream: bool = False) -> dict[str, object]:
    return {"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
            "temperature": temperature, "stream": stream}


# ------------------------------------------------------------------------------ load


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)  # answered requests, seconds
    refused: int = 0
    lost: list[str] = field(default_factory=list)
    tokens: int = 0
    wall: float = 0.0


def run_load(port: int, clients: int, requests: int, body: dict[str, object],
             timeout: float) -> Load:
    """`clients` threads sending `body` until `requests` have been sent between them."""
    load, lock = Load(), threading.Lock()
    tickets = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
        while True:
            with lock:
                if next(tickets, None) is None:
                    break
            started = time.perf_counter()
            try:
                status, response = post(conn, "POST", "/v1/completions", body)
                payload = response.read()
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    load.lost.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
                continue
            elapsed = time.perf_counter() - started
            with lock:
                if status == 200:
                    load.latencies.append(elapsed)
                    load.tokens += json.loads(payload)["usage"]["completion_tokens"]
                elif status == 429:
                    load.refused += 1
                else:
                    load.lost.append(f"HTTP {status}: {payload[:200]!r}")
            if status == 429:
                time.sleep(float(response.getheader("Retry-After") or 1))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load.wall = time.perf_counter() - started
    return load


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def time_to_first_token(port: int, prompt: str) -> float:
    """Seconds from sending a streamed completion to its first chunk with text."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        started = time.perf_counter()
        status, response = post(conn, "POST", "/v1/completions",
                                completion(prompt, 8, stream=True))
        if status != 200:
            raise SystemExit(f"streamed completion refused: HTTP {status}")
        first = None
        for line in response:
            if first is None and line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                if choice.get("text"):
                    first = time.perf_counter() - started
        if first is None:
            raise SystemExit("the streamed completion had no text")
        return first
    finally:
        conn.close()


# ---------------------------------------------------------------------------- report


def cpu_model() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def bench(args: argparse.Namespace, checkpoint: Path) -> None:
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.json")
    prompt = prompt_of(tokenizer, args.prompt_tokens)
    short = prompt_of(tokenizer, 16)
    print(f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"python {platform.python_version()}; small preset, vocab {VOCAB}, random init; "
          f"server threads 1 per slot; load average {_load_average()}", flush=True)
    if args.requests:
        bench_load(args, checkpoint, prompt, short)
    bench_throughput(args, checkpoint, prompt, short)
    print(f"load average at the end {_load_average()}")


def _load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def bench_load(args: argparse.Namespace, checkpoint: Path, prompt: str, short: str) -> None:
    """The load test, RSS and TTFT on one server with --slots slots."""
    with serving(checkpoint, args.slots, args.queue, args.max_tokens) as server:
        ttft = [time_to_first_token(server.port, prompt) for _ in range(args.ttft_runs)]
        run_load(server.port, 2, 4, completion(short, args.load_tokens), args.client_timeout)
        rss_before = server.rss_mib()
        load = run_load(server.port, args.clients, args.requests,
                        completion(short, args.load_tokens), args.client_timeout)
        rss_after = server.rss_mib()
        startup = server.startup_s
    answered = len(load.latencies)
    print(f"\nload: {args.clients} clients, {args.requests} requests of {args.load_tokens} "
          f"tokens, {args.slots} slots, queue {args.queue} (server ready {startup:.1f} s "
          f"after it was started)")
    print(f"  answered {answered}, refused (429) {load.refused}, lost {len(load.lost)}, "
          f"{load.wall:.1f} s wall")
    for reason in load.lost[:5]:
        print(f"  lost: {reason}")
    if answered:
        print(f"  latency p50 {percentile(load.latencies, 0.5) * 1e3:.0f} ms, "
              f"p99 {percentile(load.latencies, 0.99) * 1e3:.0f} ms")
    print(f"  server RSS (with children) before {rss_before:.0f} MiB, after "
          f"{rss_after:.0f} MiB ({rss_after - rss_before:+.1f})")
    print(f"TTFT, {args.prompt_tokens}-token prompt, idle slot: median "
          f"{statistics.median(ttft) * 1e3:.1f} ms (min {min(ttft) * 1e3:.1f}, max "
          f"{max(ttft) * 1e3:.1f}, {len(ttft)} runs)", flush=True)
    print(f"\n{'metric':<48}{'value':>14}  goal")
    print("-" * 74)
    rows = [
        ("requests answered / refused / lost", f"{answered}/{load.refused}/{len(load.lost)}",
         "lost 0"),
        ("latency p50 / p99 (ms)", f"{percentile(load.latencies, 0.5) * 1e3:.0f} / "
                                   f"{percentile(load.latencies, 0.99) * 1e3:.0f}", ""),
        (f"TTFT, {args.prompt_tokens}-token prompt, idle (ms, median)",
         f"{statistics.median(ttft) * 1e3:.1f}", "<= 100"),
        ("server RSS before / after load (MiB)", f"{rss_before:.0f} / {rss_after:.0f}",
         "flat"),
    ]
    for name, value, goal in rows:
        print(f"{name:<48}{value:>14}  {goal}")


def bench_throughput(args: argparse.Namespace, checkpoint: Path, prompt: str,
                     short: str) -> None:
    """Tokens/s of 1 and 2 slots (and TTFT on each server), in interleaved rounds."""
    kinds = [("process", 1), ("process", 2)]
    if args.compare_threads:
        kinds += [("thread", 1), ("thread", 2)]
    rates: dict[tuple[str, int], list[float]] = {kind: [] for kind in kinds}
    firsts: dict[tuple[str, int], list[float]] = {kind: [] for kind in kinds}
    body = completion(short, args.throughput_tokens, temperature=1.0)
    print(f"\ntokens/s: {args.throughput_clients} clients x {args.throughput_requests} "
          f"requests of {args.throughput_tokens} tokens; then TTFT x 5 on the idle server")
    for round_ in range(args.rounds):
        for kind, slots in kinds:
            with serving(checkpoint, slots, args.throughput_clients, args.max_tokens,
                         kind) as server:
                run_load(server.port, slots, slots, completion(short, 8), args.client_timeout)
                cpu_before = server.cpu_s()
                result = run_load(server.port, args.throughput_clients,
                                  args.throughput_clients * args.throughput_requests, body,
                                  args.client_timeout)
                cores = (server.cpu_s() - cpu_before) / result.wall
                firsts[kind, slots] += [time_to_first_token(server.port, prompt)
                                        for _ in range(5)]
            if result.lost or result.refused:
                raise SystemExit(f"throughput run lost {result.lost[:3]} or refused some")
            rates[kind, slots].append(result.tokens / result.wall)
            print(f"  round {round_ + 1}, {slots} {kind} slot(s): {rates[kind, slots][-1]:.0f} "
                  f"tokens/s ({result.tokens} tokens, {result.wall:.1f} s), ready after "
                  f"{server.startup_s:.1f} s; the server used {cores:.2f} cores; load "
                  f"average {_load_average()}", flush=True)
    median = {kind: statistics.median(values) for kind, values in rates.items()}
    one, two = median["process", 1], median["process", 2]
    for kind, slots in kinds:
        print(f"  {slots} {kind} slot(s): median {median[kind, slots]:.0f} tokens/s "
              f"(all: {', '.join(f'{r:.0f}' for r in rates[kind, slots])}); TTFT median "
              f"{statistics.median(firsts[kind, slots]) * 1e3:.1f} ms")
    if args.compare_threads:
        print(f"  threads: 2 slots / 1 slot = {median['thread', 2] / median['thread', 1]:.2f}x")
    pairs = zip(rates["process", 1], rates["process", 2], strict=True)
    paired = statistics.median(b / a for a, b in pairs)
    print(f"  2 slot processes / 1 slot process = {two / one:.2f}x (goal >= 1.5x); median "
          f"of the rounds' own ratios {paired:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200,
                        help="requests of the load test [200]; 0 skips it (and RSS, TTFT)")
    parser.add_argument("--slots", type=int, default=2, help="slots for the load test [2]")
    parser.add_argument("--queue", type=int, default=4,
                        help="queue for the load test [4: fewer than the clients, so some "
                             "are refused]")
    parser.add_argument("--load-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--client-timeout", type=float, default=120.0)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--ttft-runs", type=int, default=15)
    parser.add_argument("--throughput-clients", type=int, default=4)
    parser.add_argument("--throughput-requests", type=int, default=3,
                        help="requests per client in each tokens/s round [3]")
    parser.add_argument("--throughput-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-threads", action="store_true",
                        help="also time 1 and 2 slots on threads of the server's process")
    args = parser.parse_args()
    with LOCK.open("a") as lock, tempfile.TemporaryDirectory() as tmp:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bench(args, save_small(Path(tmp)))


if __name__ == "__main__":
    main()
