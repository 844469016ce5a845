"""Benchmark: batch-1 generation, fragment_llm.inference.engine vs HF transformers, and chat RSS.

Not a test. Serialise with other benchmarks on the same cores:
    flock /tmp/fragment-bench.lock .venv/bin/python scripts/bench_generate.py

For the `tiny` and `small` presets (vocab 8192, random init, fp32, greedy):
- time to first token: one call that generates 1 token, prompt of --prompt-tokens;
- decode tokens/s: (N - 1) / (time for N tokens - time for 1 token), same for both;
- ours is `Engine.generate` (KV cache, prefill then one position per token); HF is
  `GPT2LMHeadModel.generate(use_cache=True, do_sample=False)` with the same n_layer,
  n_head, n_embd, n_positions = block_size and vocab, and the same torch threads
  (--threads, default 1 like `fragment chat`).
Contenders run in interleaved rounds (ours, HF, ours, HF, ...) and the best round is
kept, so a neighbour's load slows both alike instead of skewing one.
Then the peak RSS (VmHWM) of a `fragment chat` process on a saved random-init
`small` checkpoint, answering --chat-prompts prompts read through a pipe.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fragment_llm.config import MODEL_PRESETS, GenerateConfig, ModelConfig
from fragment_llm.inference.engine import Engine
from fragment_llm.model.gpt import GPT
from fragment_llm.model.size import count_parameters

VOCAB = 8192
ROOT = Path(__file__).resolve().parents[1]


def ours(config: ModelConfig) -> Callable[[torch.Tensor, int], None]:
    engine = Engine(GPT(config).eval())

    def run(prompt: torch.Tensor, new: int) -> None:
        settings = GenerateConfig(temperature=0.0, max_new_tokens=new)
        ids = list(engine.generate(prompt[0].tolist(), settings))
        assert len(ids) == new
    return run


def hf(config: ModelConfig) -> Callable[[torch.Tensor, int], None]:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(vocab_size=VOCAB, n_positions=config.block_size,
                           n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                           bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = GPT2LMHeadModel(hf_config).eval()
    mask_cache: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def run(prompt: torch.Tensor, new: int) -> None:
        mask = mask_cache.setdefault(prompt.size(1), torch.ones_like(prompt))
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, use_cache=True)
        assert out.size(1) == prompt.size(1) + new
    return run


def timed(run: Callable[[torch.Tensor, int], None], prompt: torch.Tensor, new: int) -> float:
    started = time.perf_counter()
    run(prompt, new)
    return time.perf_counter() - started


def bench_preset(name: str, args: argparse.Namespace) -> dict[str, object]:
    config = ModelConfig(**{**MODEL_PRESETS[name], "vocab_size": VOCAB})
    new = min(args.new_tokens, config.block_size - args.prompt_tokens)  # no sliding
    prompt = torch.randint(0, VOCAB, (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    contenders = {"ours": ours(config), "hf": hf(config)}
    best = {key: {"ttft": float("inf"), "decode": 0.0} for key in contenders}
    for run in contenders.values():  # warm-up: first calls allocate and dispatch
        run(prompt, 4)
    for _ in range(args.rounds):
        for key, run in contenders.items():
            first = timed(run, prompt, 1)
            full = timed(run, prompt, new)
            best[key]["ttft"] = min(best[key]["ttft"], first)
            best[key]["decode"] = max(best[key]["decode"], (new - 1) / max(full - first, 1e-9))
    return {"preset": name, "params": count_parameters(config), "new": new, **{
        f"{key}_{metric}": value for key, r in best.items() for metric, value in r.items()}}


# ------------------------------------------------------------------------- chat RSS


def synthetic_tokenizer(path: Path) -> None:
    """A valid 8192-token vocabulary without training: merges of byte pairs."""
    from fragment_llm.tokenizer.tokenizer import SPECIAL_TOKENS, Tokenizer

    n_merges = VOCAB - 256 - len(SPECIAL_TOKENS)
    pairs = [(a, b) for a in range(32, 127) for b in range(32, 127)]
    pairs += [(a, b) for a in range(256) for b in range(256) if (a, b) not in set(pairs)]
    Tokenizer.from_merges(pairs[:n_merges]).save(path)


def chat_peak_rss(args: argparse.Namespace) -> tuple[float, float]:
    """Peak RSS (MiB) and wall time (s) of `fragment chat` with a random `small`."""
    from fragment_llm.checkpoint.save import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        synthetic_tokenizer(tok)
        config = ModelConfig(**{**MODEL_PRESETS["small"], "vocab_size": VOCAB})
        torch.manual_seed(0)
        step = save_checkpoint(Path(tmp) / "run", 1, model=GPT(config), optimizer=None,
                               trainer_state={"step": 1},
                               config={"model": config.model_dump(mode="json")},
                               tokenizer_file=tok)
        prompts = "".join(f"Tell me about the number {i}.\n" for i in range(args.chat_prompts))
        argv = ["--quiet", "chat", "--checkpoint", str(step), "--max-new-tokens",
                str(args.new_tokens), "--threads", str(args.threads)]
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _REPORT_PEAK, *argv], cwd=ROOT,
                                input=prompts.encode(), capture_output=True, check=False)
        wall = time.perf_counter() - started
    peak = re.search(rb"^VmHWM:\s+(\d+) kB", result.stderr, re.MULTILINE)
    if result.returncode != 0 or peak is None:
        raise SystemExit(f"fragment chat failed: {result.stderr.decode(errors='replace')}")
    return int(peak.group(1)) / 1024, wall


# `fragment chat` run in-process by a child that prints its own peak RSS at exit.
# VmHWM, not the parent's ru_maxrss: Linux folds the parent's peak into a vforked
# child's ru_maxrss at exec, so a child of this (large) benchmark would report ours.
_REPORT_PEAK = """
import atexit, sys
def report():
    with open("/proc/self/status") as fh:
        sys.stderr.write("".join(line for line in fh if line.startswith("VmHWM")))
atexit.register(report)
sys.argv[0] = "fragment"
from fragment_llm.cli.app import main
main()
"""


# --------------------------------------------------------------------------- report


def report(rows: list[dict[str, object]], rss: float, wall: float,
           args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, "
          f"greedy, prompt {args.prompt_tokens} tokens, best of {args.rounds} rounds")
    head = (f"{'preset':<7}{'params':>12}{'new':>5}  {'TTFT ours':>10}{'TTFT HF':>10}"
            f"{'ratio':>7}  {'tok/s ours':>11}{'tok/s HF':>10}{'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['preset']:<7}{r['params']:>12,}{r['new']:>5}  "
              f"{r['ours_ttft'] * 1e3:>8.1f}ms{r['hf_ttft'] * 1e3:>8.1f}ms"
              f"{r['hf_ttft'] / r['ours_ttft']:>6.2f}x  "
              f"{r['ours_decode']:>11.0f}{r['hf_decode']:>10.0f}"
              f"{r['ours_decode'] / r['hf_decode']:>6.2f}x")
    verdict = "meets" if rss < 500 else "MISSES"
    print(f"\nfragment chat, small, {args.chat_prompts} prompts x {args.new_tokens} tokens "
          f"through a pipe: peak RSS {rss:.0f} MiB ({verdict} the 500 MB target), "
          f"{wall:.1f} s wall")
    for r in rows:
        ratio = r["ours_decode"] / r["hf_decode"]
        print(f"{r['preset']}: decode {ratio:.2f}x HF "
              f"({'meets' if ratio >= 2 else 'misses'} the >= 2x target)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"],
                        choices=sorted(MODEL_PRESETS))
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both contenders and the chat [1, the "
                             "chat's default]")
    parser.add_argument("--chat-prompts", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench_preset(name, args) for name in args.presets]
    rss, wall = chat_peak_rss(args)
    report(rows, rss, wall, args)


if __name__ == "__main__":
    main()
