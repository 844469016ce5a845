"""Step cost of each candidate option of issue 19 against the defaults, at the default preset.

Every variant (the defaults, then one option each) is built in this one process with the
trainer's own pieces (GPT, lm_loss, gradient clipping, `build_optimizer`) and takes one
full training step (forward, backward, clip, optimizer step) in turn, `--turns` times,
after `--warmup` untimed turns. A neighbour's burst on a shared machine then lands on
steps seconds apart rather than on one variant's whole measurement, and the table's
ratio is the median over turns of variant / defaults within the same turn (and, as a
second reading, the ratio of each variant's fastest step to the defaults'). The order
rotates each turn, so no variant always follows the same neighbour. `zero_init_proj`
changes only the initial values, so its ratio is the noise floor of the run.

This measures what a step costs, not what it buys: whether an option reaches a lower
loss in the same minutes is `fragment experiment`'s question. `schedule = "wsd"` is not
here: a schedule sets one number per step and costs nothing.

    flock /tmp/fragment-bench.lock .venv/bin/python scripts/bench_options.py
    .venv/bin/python scripts/bench_options.py --turns 5 --only default,muon   # quick look

Run it under `flock /tmp/fragment-bench.lock`, as every benchmark here, so that two never
overlap (the script does not take the lock itself: under flock it would wait on itself).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from fragment_llm.config import (
    DEFAULT_PRESET,
    MODEL_PRESETS,
    TRAIN_PRESETS,
    ModelConfig,
    TokenizerConfig,
    TrainConfig,
)
from fragment_llm.model.gpt import GPT
from fragment_llm.model.loss import lm_loss
from fragment_llm.train.trainer import build_optimizer

# name -> ([model] changes, [train] changes)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "mlp = relu2": ({"mlp": "relu2"}, {}),
    "qk_norm": ({"qk_norm": True}, {}),
    "logit_softcap = 15": ({"logit_softcap": 15.0}, {}),
    "zero_init_proj": ({"zero_init_proj": True}, {}),
    "x0_mix": ({"x0_mix": True}, {}),
    "muon (ns 5)": ({}, {"optimizer": "muon", "muon_ns_steps": 5}),
    "muon (ns 3)": ({}, {"optimizer": "muon", "muon_ns_steps": 3}),
    "muon (ns 2)": ({}, {"optimizer": "muon", "muon_ns_steps": 2}),
}


@dataclass
class Contender:
    name: str
    model: GPT
    optimizer: torch.optim.Optimizer
    clip: float
    times: list[float]


def build(name: str, vocab: int) -> Contender:
    model_changes, train_changes = VARIANTS[name]
    config = ModelConfig(**{**MODEL_PRESETS[DEFAULT_PRESET], "vocab_size": vocab,
                            **model_changes})
    train = TrainConfig(**{**TRAIN_PRESETS[DEFAULT_PRESET], **train_changes})
    torch.manual_seed(0)
    model = GPT(config).train()
    optimizer = build_optimizer(model, train, torch.device("cpu"))
    for group in optimizer.param_groups:  # the trainer sets lr every step; keep it fixed
        group["lr"] = train.muon_lr if group.get("kind") == "muon" else train.lr
    return Contender(name, model, optimizer, train.grad_clip, [])


def step(c: Contender, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    lm_loss(c.model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(c.model.parameters(), c.clip)
    c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=TokenizerConfig().vocab_size)
    parser.add_argument("--only", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    names = list(VARIANTS) if not args.only else ["default", *(
        n for n in args.only.split(",") if n != "default")]
    torch.set_num_threads(args.threads)
    train = TrainConfig(**TRAIN_PRESETS[DEFAULT_PRESET])
    block = MODEL_PRESETS[DEFAULT_PRESET]["block_size"]
    data = torch.randint(0, args.vocab, (train.batch_size, block + 1),
                         generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1], data[:, 1:]
    contenders = [build(name, args.vocab) for name in names]
    for turn in range(args.warmup + args.turns):
        first = turn % len(contenders)  # each variant leads a turn in its turn: no seat bias
        for c in contenders[first:] + contenders[:first]:
            seconds = step(c, x, y)
            if turn >= args.warmup:
                c.times.append(seconds)
    base = contenders[0].times
    print(f"{cpu_model()}, {args.threads} threads, torch {torch.__version__}; preset "
          f"{DEFAULT_PRESET}, vocab {args.vocab}, batch {train.batch_size} x {block} tokens; "
          f"{args.turns} turns after {args.warmup} warm-up")
    print("| option | median step (ms) | min (ms) | ratio to default (median of turns) "
          "| ratio of minima |")
    print("|---|---|---|---|---|")
    for c in contenders:
        ratio = statistics.median(t / b for t, b in zip(c.times, base, strict=True))
        print(f"| {c.name} | {1e3 * statistics.median(c.times):.0f} | "
              f"{1e3 * min(c.times):.0f} | {ratio:.3f} | {min(c.times) / min(base):.3f} |")


if __name__ == "__main__":
    main()
