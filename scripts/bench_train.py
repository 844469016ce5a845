"""Training speed: tokens/s, MFU and peak RSS per preset, ours vs HF GPT2LMHeadModel.

Each measurement runs in its own subprocess, so peak RSS is that configuration's own,
and with glibc tuned as `fragment train` tunes it (train.keep_freed_memory) for
every contender alike.
Each worker times single steps after three warm-up steps and keeps the median.
With `--rounds N` the contenders run in turn N times: `vs HF` compares their fastest
rounds, and `median` is the median over rounds of ours / HF within one round.
With `--paired N` (speed only) all contenders share one process and take one step each
in turn, N times: a neighbour's burst then lands on steps seconds apart rather than
minutes, so `median` (of the per-turn ratios) is the steadiest ratio on a shared VM.
MFU is measured tokens/s x FLOPs per token (6N + attention, fragment_llm.model.size
.flops_per_token) over the matmul peak of the same precision measured in this same run.

    .venv/bin/python scripts/bench_train.py                  # tiny, small, base
    .venv/bin/python scripts/bench_train.py --presets small --steps 6
    .venv/bin/python scripts/bench_train.py --presets small --rounds 3   # shared machine
    .venv/bin/python scripts/bench_train.py --presets small --paired 25  # steadiest ratio
    python scripts/bench_train.py --device cuda --presets base --batch 32 \
        --precision bf16,fp16,fp32 --compile                  # on a GPU machine

On CUDA the memory column is the GPU's peak allocation (torch.cuda.max_memory_allocated),
fp16 steps go through a GradScaler as the trainer's do, and `--compile` adds a row per
precision with our model under torch.compile.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

VOCAB = 8192


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 8,
                device: str = "cpu") -> float:
    """Best-of-3 GFLOP/s of a square matmul in `dtype` on this machine's threads or GPU."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best / 1e9


def build(kind: str, preset: str):
    from fragment_llm.config import MODEL_PRESETS, ModelConfig
    from fragment_llm.model.gpt import GPT
    from fragment_llm.model.loss import lm_loss
    from fragment_llm.model.size import flops_per_token

    dims = {**MODEL_PRESETS[preset], "vocab_size": VOCAB}
    if kind == "ours-gpt2":  # our code, GPT-2's components: the closest like-for-like
        dims.update(positions="learned", norm="layernorm", mlp="gelu")
    config = ModelConfig(**dims)
    flops = flops_per_token(config)
    if kind.startswith("ours"):
        model = GPT(config)
        return model, (lambda x, y: lm_loss(model(x), y)), config, flops
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=True))
    return hf, (lambda x, y: hf(input_ids=x, labels=x).loss), config, flops


# Warm-up steps: compilation and cuBLAS autotuning on CUDA; on CPU the heap growing to
# its working size (its page faults are a start-up cost, not a step's).
WARMUP_STEPS = 3


class Contender:
    """One model's training step at a fixed batch, ready to time: `step()` runs forward,
    loss, backward and a fused AdamW step, as the trainer does."""

    def __init__(self, kind: str, preset: str, batch: int, precision: str,
                 device: str = "cpu", compile_model: bool = False) -> None:
        torch.manual_seed(0)
        model, self.loss_fn, config, self.flops_per_token = build(kind, preset)
        model.to(device)
        if compile_model:
            model.forward = torch.compile(model.forward)
        self.device = device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.scaler = torch.amp.GradScaler(device, enabled=precision == "fp16")
        self.x = torch.randint(0, VOCAB, (batch, config.block_size), device=device)
        self.y = torch.roll(self.x, -1, dims=1)
        self.autocast = torch.autocast(device, dtype=DTYPES[precision],
                                       enabled=precision != "fp32")
        self.tokens_per_step = batch * config.block_size
        self.parameters = sum(p.numel() for p in model.parameters())

    def warm_up(self) -> None:
        for _ in range(WARMUP_STEPS):
            self.step()

    def step(self) -> None:
        with self.autocast:
            loss = self.loss_fn(self.x, self.y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        sync(self.device)
        start = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - start

    def row(self, seconds: float) -> dict:
        return {"tokens_per_s": self.tokens_per_step / seconds, "seconds_per_step": seconds,
                "flops_per_token": self.flops_per_token, "parameters": self.parameters,
                "peak_rss_mb": peak_memory_mb(self.device)}


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, preset: str, batch: int, steps: int, precision: str,
            device: str = "cpu", compile_model: bool = False) -> dict:
    """Runs inside a worker process: seconds per optimizer step after warm-up steps."""
    from fragment_llm.train.runtime import keep_freed_memory

    keep_freed_memory()  # the allocator `fragment train` runs with, for every contender
    contender = Contender(kind, preset, batch, precision, device, compile_model)
    contender.warm_up()
    times = [contender.timed_step() for _ in range(steps)]
    # the median: one neighbour's burst moves a mean, not this
    return contender.row(statistics.median(times))


def measure_paired(kinds: list[str], preset: str, batch: int, pairs: int) -> dict:
    """Runs inside a worker process: every contender in this one process, one step of
    each in turn (the order rotating), `pairs` times. A neighbour's burst then lands on
    steps seconds apart, and each turn gives one ratio per contender: seconds of the
    first contender / seconds of this one. Returns, per contender, the row at its fastest
    step plus the median of those ratios. No peak RSS: one process holds them all.
    """
    from fragment_llm.train.runtime import keep_freed_memory

    keep_freed_memory()
    contenders = {kind: Contender(kind, preset, batch, "fp32") for kind in kinds}
    for contender in contenders.values():
        contender.warm_up()
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for turn in range(pairs):
        order = kinds[turn % len(kinds):] + kinds[:turn % len(kinds)]
        for kind in order:
            times[kind].append(contenders[kind].timed_step())
    rows = {}
    for kind, contender in contenders.items():
        ratios = [first / own for first, own in zip(times[kinds[0]], times[kind], strict=True)]
        rows[kind] = {**contender.row(min(times[kind])), "peak_rss_mb": None,
                      "median_ratio": statistics.median(ratios)}
    return rows


def run_worker(kind: str, preset: str, batch: int, steps: int, precision: str,
               device: str = "cpu", compile_model: bool = False, pairs: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--presets", preset, "--batch",
           str(batch), "--steps", str(steps), "--precision", precision, "--device", device,
           "--paired", str(pairs)]
    if compile_model:
        cmd.append("--compile")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


BATCH = {"tiny": 32, "small": 16, "base": 8}
CPU_CONTENDERS = ("hf", "ours", "ours-gpt2")


def print_row(preset: str, kind: str, precision: str, row: dict, hf_row: dict,
              peak: float, median_ratio: float | None = None) -> None:
    mfu = row["tokens_per_s"] * row["flops_per_token"] / (peak * 1e9)
    ratio = row["tokens_per_s"] / hf_row["tokens_per_s"]
    paired = "" if median_ratio is None else f" {median_ratio:6.2f}x"
    memory = "-" if row["peak_rss_mb"] is None else f"{row['peak_rss_mb']:.0f}"
    print(f"{preset:6} {kind:14} {precision:5} {row['parameters'] / 1e6:7.1f}M "
          f"{row['tokens_per_s']:9.0f} {ratio:5.2f}x {mfu:5.0%} {memory:>7}"
          + paired)


def print_header(memory: str, paired: bool = False) -> None:
    header = (f"{'preset':6} {'model':14} {'prec':5} {'params':>8} {'tok/s':>9} {'vs HF':>6} "
              f"{'MFU':>5} {memory:>7}" + (f" {'median':>7}" if paired else ""))
    print(header)
    print("-" * len(header))


def best_of_rounds(rounds: int, kinds: tuple[str, ...], measure_one: Callable[[str], dict],
                   measure_peak: Callable[[], float]
                   ) -> tuple[dict[str, dict], float, dict[str, float]]:
    """Run the contenders in turn, round after round, and keep each one's fastest round:
    on a shared machine a neighbour's burst then costs every contender alike. The matmul
    peak is re-measured each round and its best kept too, so MFU compares best moments.

    Also returns, per contender, the median over rounds of its tokens/s over the first
    contender's in the same round: a paired ratio, steadier than a ratio of two bests.
    """
    best: dict[str, dict] = {}
    ratios: dict[str, list[float]] = {kind: [] for kind in kinds}
    peak = 0.0
    for _ in range(rounds):
        peak = max(peak, measure_peak())
        this_round = {kind: measure_one(kind) for kind in kinds}
        for kind, row in this_round.items():
            ratios[kind].append(row["tokens_per_s"] / this_round[kinds[0]]["tokens_per_s"])
            if kind not in best or row["tokens_per_s"] > best[kind]["tokens_per_s"]:
                best[kind] = row
    return best, peak, {kind: statistics.median(r) for kind, r in ratios.items()}


def bench_cpu(args: argparse.Namespace) -> None:
    # No native bf16 matmul on a CPU without AVX512-BF16/AMX: a small size keeps it short.
    bf16_peak = matmul_peak(torch.bfloat16, 512, 1)
    print(f"threads {torch.get_num_threads()}; bf16 matmul peak {bf16_peak:.0f} GFLOP/s")
    if args.paired:
        bench_cpu_paired(args)
        return
    for preset in args.presets.split(","):
        batch = args.batch or BATCH[preset]
        run = functools.partial(run_worker, preset=preset, batch=batch, steps=args.steps,
                                precision="fp32")
        rows, fp32_peak, paired = best_of_rounds(
            args.rounds, CPU_CONTENDERS, run, lambda: matmul_peak(torch.float32))
        if preset == "tiny":  # bf16 autocast on CPU: measured once, it is far slower here
            rows["ours bf16"] = run_worker("ours", preset, batch, 1, "bf16")
        print(f"\n{preset}: batch {batch}, fp32 matmul peak {fp32_peak:.0f} GFLOP/s "
              f"(best of {args.rounds} round(s))")
        print_header("RSS MB", paired=True)
        for kind, row in rows.items():
            precision = "bf16" if "bf16" in kind else "fp32"
            print_row(preset, kind.split()[0], precision, row, rows["hf"], fp32_peak,
                      paired.get(kind))


def bench_cpu_paired(args: argparse.Namespace) -> None:
    """Speed only, all contenders in one worker process taking steps in turn."""
    for preset in args.presets.split(","):
        batch = args.batch or BATCH[preset]
        peak = matmul_peak(torch.float32)
        rows = run_worker("paired", preset, batch, 0, "fp32", pairs=args.paired)
        print(f"\n{preset}: batch {batch}, fp32 matmul peak {peak:.0f} GFLOP/s, "
              f"{args.paired} turns in one process (tok/s and vs HF: fastest steps)")
        print_header("RSS MB", paired=True)
        for kind, row in rows.items():
            print_row(preset, kind, "fp32", row, rows["hf"], peak, row["median_ratio"])


def bench_cuda(args: argparse.Namespace) -> None:
    """Each precision against its own measured peak; HF and ours at the same batch."""
    precisions = args.precision.split(",")
    peaks = {name: matmul_peak(DTYPES[name], 8192, 10, "cuda") for name in precisions}
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; matmul peak "
          + ", ".join(f"{name} {peak / 1e3:.0f} TFLOP/s" for name, peak in peaks.items()))
    print_header("GPU MB")
    for preset in args.presets.split(","):
        batch = args.batch or BATCH[preset]
        for precision in precisions:
            run = functools.partial(run_worker, preset=preset, batch=batch, steps=args.steps,
                                    precision=precision, device="cuda")
            rows = {kind: run(kind) for kind in ("hf", "ours")}
            if args.compile:
                rows["ours compiled"] = run("ours", compile_model=True)
            for kind, row in rows.items():
                print_row(preset, kind, precision, row, rows["hf"], peaks[precision])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small,base")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="default: per preset")
    parser.add_argument("--rounds", type=int, default=1,
                        help="CPU: interleaved rounds; best of each contender kept, plus "
                             "the median of same-round ratios")
    parser.add_argument("--paired", type=int, default=0, metavar="N",
                        help="CPU: speed only, all contenders in one process stepping in "
                             "turn N times; median of per-turn ratios (no RSS)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32",
                        help="CUDA: comma-separated among fp32,bf16,fp16 (CPU: fp32, plus "
                             "one bf16 row for tiny)")
    parser.add_argument("--compile", action="store_true", help="CUDA: add torch.compile rows")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = set(args.precision.split(",")) - set(DTYPES)
    if unknown:
        parser.error(f"--precision: {', '.join(sorted(unknown))} is not one of fp32, bf16, fp16")
    if args.paired < 0 or (args.paired and args.device != "cpu"):
        parser.error("--paired: a number of turns >= 1, on --device cpu")
    if args.worker == "paired":
        print(json.dumps(measure_paired(list(CPU_CONTENDERS), args.presets, args.batch,
                                        args.paired)))
    elif args.worker:
        print(json.dumps(measure(args.worker, args.presets, args.batch, args.steps,
                                 args.precision, args.device, args.compile)))
    elif args.device == "cuda":
        bench_cuda(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
