"""Time to quality: ours with every default against HF GPT-2 trained nanoGPT's way, same
wall-clock budget, same data, tokenizer, batches and validation blocks (needs the `bench`
extra).

    .venv/bin/python scripts/bench_quality.py --data processed --tokenizer tokenizer.json \
        --budget 10m --out /tmp/quality

What each side gets, one after the other, each in its own fresh process on the same cores:
- ours: `fragment train --max-time BUDGET` exactly as a user types it (every default;
  the preset's shape at the tokenizer's vocabulary), its own final evaluation;
- reference: `transformers.GPT2LMHeadModel` at our preset's depth, width, heads, context
  and vocabulary (learned positions, LayerNorm, GELU, tied embeddings: about the same
  parameter count), trained with nanoGPT's recipe: AdamW (betas 0.9/0.99, weight decay
  0.1 on matrices only, fused), peak lr 1e-3, linear warmup then cosine to lr/10, clip
  1.0, no dropout (a 10-minute run sees less than one epoch). It draws the same training
  blocks in the same order as ours (our TokenStream over our token shards, batch 8 x 256),
  its schedule runs on the wall clock as `--max-time` does, and training time excludes
  the final evaluation, which reads the same 512 held-out blocks with the same bits-per-
  byte formula as our trainer's.
Prints a table: steps, tokens/s and final validation bits per byte, with the ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FINAL_EVAL_BLOCKS = 512  # our trainer's final_eval_blocks default
HF_LR, HF_MIN_LR_RATIO, HF_WARMUP_FRACTION = 1e-3, 0.1, 0.02


def parse_duration(text: str) -> float:
    from fragment_llm.config import parse_duration as parse
    seconds = parse(text)
    if seconds is None:
        sys.exit(f"--budget: not a duration: {text!r} (90s, 10m, 2h)")
    return seconds


# ------------------------------------------------------------------------------- ours


def run_ours(args: argparse.Namespace, run_dir: Path) -> dict:
    command = [sys.executable, "-m", "fragment_llm", "-q", "train", "--data", str(args.data),
               "--tokenizer", str(args.tokenizer), "--out", str(run_dir),
               "--max-time", args.budget, "--seed", str(args.seed), "--json"]
    done = subprocess.run(command, check=True, capture_output=True, text=True)  # noqa: S603
    summary = json.loads(done.stdout)
    from fragment_llm.experiment.metrics import final_record
    record = final_record(run_dir)  # training time without the evaluations and saving
    return {"trainer": "ours (fragment train, defaults)", "params": summary.get("parameters"),
            "steps": summary["steps"], "tokens": summary["tokens"],
            "train_s": record.elapsed_s if record else None, "val_bpb": summary["val_bpb"]}


# -------------------------------------------------------------------------- reference


def run_reference(args: argparse.Namespace, run_dir: Path) -> dict:
    """This script again, as a fresh process, so neither side inherits the other's heap."""
    command = [sys.executable, __file__, "--worker", str(run_dir), "--data", str(args.data),
               "--tokenizer", str(args.tokenizer), "--budget", args.budget,
               "--seed", str(args.seed)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)  # noqa: S603
    return json.loads(done.stdout.strip().splitlines()[-1])


def reference_worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F  # noqa: N812
    from transformers import GPT2Config, GPT2LMHeadModel

    from fragment_llm.checkpoint.layout import list_checkpoints
    from fragment_llm.data.batches import TokenStream, eval_batches
    from fragment_llm.evaluate import held_out_shards
    from fragment_llm.finetune.artifact import load_tuned
    from fragment_llm.model.loss import bits_per_byte
    from fragment_llm.train.runtime import keep_freed_memory

    keep_freed_memory()  # the trainer's allocator setting: the same footing
    ours = load_tuned(list_checkpoints(args.worker)[-1], None, evaluating=True)
    config = ours.model.config
    recorded = ours.checkpoint.config
    batch = recorded.train_count("batch_size", 8)
    shards = held_out_shards(ours, args.data.parent / "tokens")
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=True))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": other, "weight_decay": 0.0}],
                                  lr=HF_LR, betas=(0.9, 0.99), fused=True)
    stream = TokenStream(shards.train, config.block_size, args.seed)
    budget = parse_duration(args.budget)
    model.train()
    steps, trained_s = 0, 0.0
    while trained_s < budget:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = HF_LR * _schedule(trained_s / budget)
        x, y = stream.next_batch(batch)
        loss = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
        trained_s += time.perf_counter() - started
    model.eval()
    blocks = min(shards.val.num_blocks(config.block_size), FINAL_EVAL_BLOCKS)
    nll, count = 0.0, 0
    with torch.no_grad():
        for x, y in eval_batches(shards.val, config.block_size, batch, blocks):
            logits = model(input_ids=x).logits
            nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    val = shards.manifest.val
    return {"trainer": "HF GPT2LMHeadModel, nanoGPT recipe",
            "params": sum(p.numel() for p in model.parameters()), "steps": steps,
            "tokens": steps * batch * config.block_size, "train_s": trained_s,
            "val_bpb": bits_per_byte(nll / count, val.counted_tokens, val.text_bytes)}


def _schedule(fraction: float) -> float:
    """nanoGPT's: linear warmup, then cosine from the peak to HF_MIN_LR_RATIO of it."""
    if fraction < HF_WARMUP_FRACTION:
        return (fraction + 1e-3) / HF_WARMUP_FRACTION
    progress = (fraction - HF_WARMUP_FRACTION) / (1 - HF_WARMUP_FRACTION)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return HF_MIN_LR_RATIO + (1 - HF_MIN_LR_RATIO) * cosine


# ----------------------------------------------------------------------------- output


def print_table(rows: list[dict]) -> None:
    ours_bpb = rows[0]["val_bpb"]
    print(f"{'trainer':38} {'params':>7} {'steps':>6} {'tok/s':>7} {'val bpb':>8} {'vs ours':>8}")
    print("-" * 80)
    for row in rows:
        seconds = row.get("train_s") or float("nan")
        params = f"{row['params'] / 1e6:.2f}M" if row.get("params") else "?"
        print(f"{row['trainer']:38} {params:>7} {row['steps']:>6} "
              f"{row['tokens'] / seconds:>7.0f} {row['val_bpb']:>8.4f} "
              f"{row['val_bpb'] / ours_bpb:>7.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer.json"))
    parser.add_argument("--budget", default="10m", help="training wall time for each side")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fragment-bench-quality"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(reference_worker(args)))
        return
    run_dir = args.out / f"ours-seed-{args.seed}"
    if run_dir.exists():
        sys.exit(f"{run_dir} exists: choose another --out or --seed")
    print(f"budget {args.budget} each, seed {args.seed}, data {args.data}", flush=True)
    rows = [run_ours(args, run_dir)]
    rows.append(run_reference(args, run_dir))
    print_table(rows)
    (args.out / f"quality-seed-{args.seed}.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
