"""Training speed: tokens/s, MFU and peak RSS per preset, ours vs HF GPT2LMHeadModel.

Each measurement runs in its own subprocess, so peak RSS is that configuration's own.
MFU is measured tokens/s x FLOPs per token (6N + attention, fragment_llm.model
.flops_per_token) over the fp32 matmul peak measured in this same run.

    .venv/bin/python scripts/bench_train.py                  # tiny, small, base
    .venv/bin/python scripts/bench_train.py --presets small --steps 6
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

VOCAB = 8192


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 8) -> float:
    """Best-of-3 GFLOP/s of a square matmul in `dtype` on this machine's threads."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best / 1e9


def build(kind: str, preset: str):
    from fragment_llm.config import MODEL_PRESETS, ModelConfig
    from fragment_llm.model import GPT, flops_per_token, lm_loss

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


def measure(kind: str, preset: str, batch: int, steps: int, precision: str) -> dict:
    """Runs inside a worker process: seconds per optimizer step after a warm-up."""
    torch.manual_seed(0)
    model, loss_fn, config, flops = build(kind, preset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randint(0, VOCAB, (batch, config.block_size))
    y = torch.roll(x, -1, dims=1)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast("cpu", enabled=False))

    def step() -> None:
        with autocast:
            loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    params = sum(p.numel() for p in model.parameters())
    return {"tokens_per_s": batch * config.block_size / seconds, "seconds_per_step": seconds,
            "flops_per_token": flops, "parameters": params,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(kind: str, preset: str, batch: int, steps: int, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--presets", preset, "--batch",
           str(batch), "--steps", str(steps), "--precision", precision]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


BATCH = {"tiny": 32, "small": 16, "base": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small,base")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="default: per preset")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    if args.worker:
        print(json.dumps(measure(args.worker, args.presets, args.batch, args.steps,
                                 args.precision)))
        return
    # No native bf16 matmul on a CPU without AVX512-BF16/AMX: a small size keeps it short.
    fp32_peak, bf16_peak = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, 512, 1)
    print(f"threads {torch.get_num_threads()}; matmul peak fp32 {fp32_peak:.0f} GFLOP/s, "
          f"bf16 {bf16_peak:.0f} GFLOP/s")
    header = (f"{'preset':6} {'model':10} {'prec':5} {'params':>8} {'tok/s':>8} {'vs HF':>6} "
              f"{'MFU':>5} {'RSS MB':>7}")
    print(header)
    print("-" * len(header))
    for preset in args.presets.split(","):
        batch = args.batch or BATCH[preset]
        rows = {kind: run_worker(kind, preset, batch, args.steps, "fp32")
                for kind in ("hf", "ours", "ours-gpt2")}
        if preset == "tiny":  # bf16 autocast on CPU: measured once, it is far slower here
            rows["ours bf16"] = run_worker("ours", preset, batch, 1, "bf16")
        for kind, row in rows.items():
            mfu = row["tokens_per_s"] * row["flops_per_token"] / (fp32_peak * 1e9)
            ratio = row["tokens_per_s"] / rows["hf"]["tokens_per_s"]
            print(f"{preset:6} {kind.split()[0]:10} {'bf16' if 'bf16' in kind else 'fp32':5} "
                  f"{row['parameters'] / 1e6:7.1f}M {row['tokens_per_s']:8.0f} {ratio:5.2f}x "
                  f"{mfu:5.0%} {row['peak_rss_mb']:7.0f}")


if __name__ == "__main__":
    main()
