"""Fine-tuning: full vs LoRA vs DoRA from one base, same data, seed and wall budget.

    flock /tmp/fragment-bench.lock .venv/bin/python scripts/bench_finetune.py \\
        --corpus /work/shared/corpora/shakespeare --base-steps 540 --speed-rounds 3

One run, in a work folder (--work; the base and the tokenized corpus are reused):
- the base: `--base CHECKPOINT`, or a `small` model pretrained by the pipeline itself
  (`fragment preprocess`, `train-tokenizer`, `train`) on --corpus for --base-time, or
  for --base-steps (the same base however busy the machine is; a quiet 10-minute run of
  `small` makes ~540 steps), made once per corpus, vocabulary, preset and budget;
- the conversations (--data) rendered once into a shared token cache (a `--dry-run`);
- the base model's own loss on the held-out conversations' assistant tokens, computed
  in a worker process exactly as the trainer's final evaluation does (the same blocks,
  the same masked cross-entropy), so the rows below compare like with like;
- with --speed-rounds R, step time alone first: full, LoRA and DoRA take turns, R
  rounds of --speed-steps steps each, so a neighbour's burst lands on all three alike;
- then each of --runs (default full, lora, dora) in its own `fragment finetune`
  process, one after another, with the same --seed and budget: --time of training
  (evaluations and checkpoint writes do not count against it, as with `fragment
  finetune --max-time`; --max-steps is lifted so that time alone ends the run) or,
  with --steps, a number of steps.
Per run: trainable parameters (for lora/dora the adapter's: the run's parameters minus
the base's), tokens/s over the training time, the median of the logged steps' times
(every 10th, the first excluded), peak RSS (VmHWM of the finetune process, read at its
exit: a parent's peak would leak into a child's ru_maxrss), and the run's final
held-out assistant-token loss. The load average is printed beside each run: on a shared
2-core machine a neighbour's burst slows one run and not another, so read it with them.

`--runs` takes METHOD or METHOD@LR, e.g. `lora@1e-3,lora@2e-3,lora@5e-3 --steps 200`
for a learning-rate sweep (without @, `fragment finetune`'s default for the method).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full", "lora", "dora")
STEP_LIMIT = 100_000_000  # the most --max-steps takes: with --time, time alone ends a run

# Runs `fragment` in this process and writes its peak RSS to stderr at exit.
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


# --------------------------------------------------------------------------- children


@dataclass(frozen=True)
class Finished:
    """What a `fragment` child printed, and its peak resident memory."""

    stdout: str
    peak_rss_mib: float
    wall_s: float

    def json(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])


def fragment(*argv: str) -> Finished:
    """`fragment --quiet ARGV...` from this checkout, in a child process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _REPORT_PEAK, "--quiet", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    peak = re.findall(r"^VmHWM:\s+(\d+) kB", done.stderr, re.MULTILINE)
    if done.returncode != 0 or not peak:
        raise SystemExit(f"fragment {' '.join(argv)} failed ({done.returncode}):\n"
                         f"{done.stderr.strip()}")
    return Finished(done.stdout, int(peak[-1]) / 1024, wall)


def worker(*argv: str) -> dict:
    """This script in a child process (heavy imports stay out of the parent)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {' '.join(argv)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ base


def pretrained_base(args: argparse.Namespace) -> tuple[Path, str]:
    """The base checkpoint and a line describing it: --base, or one pretrained here,
    once per corpus, vocabulary, preset and budget (WORK/<corpus>-v<vocab>/<preset>-<budget>,
    whose base.json records the finished run; delete the folder to pretrain again)."""
    if args.base is not None:
        return args.base, f"given: {args.base}"
    budget = f"{args.base_steps}steps" if args.base_steps else args.base_time
    data = args.work / f"{args.corpus.resolve().name}-v{args.vocab_size}"
    run = data / f"{args.preset}-{budget}"
    if not (run / "base.json").is_file():
        pretrain(args, data, run)
    summary = json.loads((run / "base.json").read_text(encoding="utf-8"))
    return Path(summary["checkpoint"]), (
        f"`{args.preset}` pretrained for {budget} on {args.corpus} (vocab {args.vocab_size}, "
        f"seed {summary['seed']}): {summary['steps']} steps in {summary['seconds']:.0f} s, "
        f"{summary['parameters']:,} parameters, val {summary['val_bpb']:.3f} bits/byte "
        f"[{run}]")


def pretrain(args: argparse.Namespace, data: Path, run: Path) -> None:
    """`fragment preprocess`, `train-tokenizer` (both once per corpus and vocabulary) and
    `train` into `run`, recorded in run/base.json when it finished."""
    processed, tokenizer = data / "processed", data / "tokenizer.json"
    if not tokenizer.is_file():
        fragment("preprocess", str(args.corpus), "--out", str(processed), "--overwrite")
        fragment("train-tokenizer", "--data", str(processed), "--out", str(tokenizer),
                 "--overwrite", "--vocab-size", str(args.vocab_size))
    shutil.rmtree(run, ignore_errors=True)  # a fresh run, not a resume
    budget = (["--max-steps", str(args.base_steps)] if args.base_steps
              else ["--max-time", args.base_time])
    before = os.getloadavg()[0]
    trained = fragment("train", "--preset", args.preset, "--data", str(processed),
                       "--tokenizer", str(tokenizer), "--out", str(run / "checkpoints"),
                       "--seed", str(args.seed), "--json", *budget)
    record = {**trained.json(), "seed": args.seed, "peak_rss_mib": trained.peak_rss_mib,
              "load": [before, os.getloadavg()[0]]}
    (run / "base.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def base_loss(base: Path, tokens: Path) -> dict:
    """Worker: the base's loss on the held-out split's assistant tokens, the way
    Trainer.evaluate computes a fine-tuning run's final figure (same blocks, batch and
    masked cross-entropy)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from fragment_llm.checkpoint.trained import load_trained
    from fragment_llm.config import FINETUNE_TRAIN
    from fragment_llm.data.batches import IGNORED, eval_batches
    from fragment_llm.data.shards import TokenShards

    trained = load_trained(base, evaluating=True)
    shards = TokenShards.open(tokens, trained.tokenizer.vocab_size)
    nll, counted, blocks = 0.0, 0, 0
    with torch.no_grad():
        for x, y in eval_batches(shards.val, trained.model.config.block_size,
                                 FINETUNE_TRAIN["batch_size"],
                                 FINETUNE_TRAIN["final_eval_blocks"]):
            logits = trained.model(x).float()
            nll += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum",
                                         ignore_index=IGNORED))
            counted += int((y != IGNORED).sum())
            blocks += x.size(0)
    return {"val_loss": nll / max(counted, 1), "tokens": counted, "blocks": blocks,
            "parameters": sum(p.numel() for p in trained.model.parameters()),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------ runs


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float | None = None  # None: `fragment finetune`'s default for the method

    @property
    def label(self) -> str:
        return self.method if self.lr is None else f"{self.method}@{self.lr:g}"

    @classmethod
    def parse(cls, text: str) -> RunSpec:
        method, _, lr = text.strip().partition("@")
        if method not in METHODS:
            raise argparse.ArgumentTypeError(f"{text!r}: METHOD[@LR], METHOD one of "
                                             f"{', '.join(METHODS)}")
        try:
            return cls(method, float(lr) if lr else None)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: LR is not a number") from None


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    steps: int
    trainable: int
    tokens_per_s: float
    step_ms: float
    peak_rss_mib: float
    val_loss: float
    wall_s: float
    load: tuple[float, float]  # 1-minute load average before and after


def budget_flags(args: argparse.Namespace) -> list[str]:
    if args.steps:
        return ["--max-steps", str(args.steps)]
    return ["--max-time", args.time, "--max-steps", str(STEP_LIMIT)]


def finetune(spec: RunSpec, base: Path, tokens_dir: Path, args: argparse.Namespace,
             base_parameters: int) -> RunResult:
    out = args.runs_dir / spec.label
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--lr", repr(spec.lr)] if spec.lr is not None else []
    before = os.getloadavg()[0]
    done = fragment("finetune", "--base", str(base), "--data", str(args.data), "--out",
                    str(out), "--tokens-dir", str(tokens_dir), "--method", spec.method,
                    "--seed", str(args.seed), "--json", *budget_flags(args), *flags)
    summary = done.json()
    steps = logged_steps(out)
    per_step = summary["plan"]["tokens_per_step"]
    last = steps[-1]
    timed = [per_step / s["tokens_per_s"] for s in steps if s["step"] > 1] or [
        per_step / last["tokens_per_s"]]
    trainable = (summary["parameters"] if spec.method == "full"
                 else summary["parameters"] - base_parameters)
    return RunResult(spec, summary["steps"], trainable,
                     last["step"] * per_step / last["elapsed_s"],
                     statistics.median(timed) * 1e3, done.peak_rss_mib, summary["val_loss"],
                     done.wall_s, (before, os.getloadavg()[0]))


def prepare_tokens(base: Path, args: argparse.Namespace) -> Path:
    """Render the conversations once (a dry run builds the cache); returns its folder."""
    tokens_dir = args.runs_dir / "tokens"
    fragment("finetune", "--base", str(base), "--data", str(args.data), "--out",
             str(args.runs_dir / "dry-run"), "--tokens-dir", str(tokens_dir),
             "--dry-run", "--json")
    folders = [path.parent for path in tokens_dir.glob("*/manifest.json")]
    if len(folders) != 1:
        raise SystemExit(f"expected one conversation cache in {tokens_dir}, found {folders}")
    return folders[0]


def speed_rounds(base: Path, tokens_dir: Path, args: argparse.Namespace
                 ) -> dict[str, list[float]]:
    """Step time only, interleaved: each method for --speed-steps steps in turn (the
    order rotating), --speed-rounds times; every step logged. Returns, per method, the
    median step (ms) of each round, the first two steps of a run excluded."""
    config = args.runs_dir / "log-every-step.toml"
    config.write_text("[train]\nlog_every = 1\n", encoding="ascii")
    times: dict[str, list[float]] = {method: [] for method in METHODS}
    for turn in range(args.speed_rounds):
        for method in METHODS[turn % 3:] + METHODS[:turn % 3]:
            out = args.runs_dir / f"speed-{method}"
            shutil.rmtree(out, ignore_errors=True)
            done = fragment("finetune", "--base", str(base), "--data", str(args.data),
                            "--out", str(out), "--tokens-dir", str(tokens_dir), "--method",
                            method, "--seed", str(args.seed), "--config", str(config),
                            "--max-steps", str(args.speed_steps), "--checkpoint-every", "0",
                            "--eval-every", "0", "--json")
            per_step = done.json()["plan"]["tokens_per_step"]
            steps = logged_steps(out)
            times[method].append(statistics.median(
                per_step / s["tokens_per_s"] * 1e3 for s in steps if s["step"] > 2))
    return times


def logged_steps(out: Path) -> list[dict]:
    """The step lines of a run's metrics.jsonl (evaluation lines have no tokens/s)."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
            if '"tokens_per_s"' in line]


# ---------------------------------------------------------------------------- report


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "?")
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def print_table(results: list[RunResult], base: dict) -> None:
    head = (f"{'run':<14}{'trainable':>12}{'tokens/s':>10}{'step ms':>9}{'RSS MiB':>9}"
            f"{'val loss':>10}{'vs base':>9}{'steps':>7}{'wall s':>8}  load before/after")
    print(head)
    print("-" * len(head))
    print(f"{'base':<14}{'-':>12}{'-':>10}{'-':>9}{'-':>9}{base['val_loss']:>10.4f}"
          f"{'-':>9}{'-':>7}{'-':>8}")
    for r in results:
        lower = (base["val_loss"] - r.val_loss) / base["val_loss"]
        print(f"{r.spec.label:<14}{r.trainable:>12,}{r.tokens_per_s:>10,.0f}"
              f"{r.step_ms:>9.0f}{r.peak_rss_mib:>9.0f}{r.val_loss:>10.4f}{lower:>8.1%} "
              f"{r.steps:>7}{r.wall_s:>8.0f}  {r.load[0]:.2f} / {r.load[1]:.2f}")


def print_goals(results: list[RunResult], base: dict, budget: str) -> None:
    """The issue's three goals, from the first run of each method."""
    first = {}
    for r in results:
        first.setdefault(r.spec.method, r)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    if {"full", "lora"} <= first.keys():
        ratio = first["lora"].peak_rss_mib / first["full"].peak_rss_mib
        print(f"LoRA peak RSS / full:  {ratio:.2f}  (goal <= 0.60: {verdict(ratio <= 0.6)})")
    if "lora" in first:
        lower = (base["val_loss"] - first["lora"].val_loss) / base["val_loss"]
        print(f"LoRA loss vs base:     {lower:.1%} lower after {budget}  (goal >= 20% after "
              f"10 min: {verdict(lower >= 0.2)})")
    if {"lora", "dora"} <= first.keys():
        ratio = first["dora"].step_ms / first["lora"].step_ms
        print(f"DoRA / LoRA step time: {ratio:.2f}  (goal <= 1.10: {verdict(ratio <= 1.1)})")


def print_speed(times: dict[str, list[float]], load: tuple[float, float]) -> None:
    rounds = len(times["lora"])
    print(f"step time, interleaved: {rounds} rounds, load {load[0]:.2f} -> {load[1]:.2f}")
    for method, per_round in times.items():
        print(f"  {method:<5} median {statistics.median(per_round):6.0f} ms   rounds: "
              + ", ".join(f"{ms:.0f}" for ms in per_round))
    for method in ("full", "dora"):
        ratios = [a / b for a, b in zip(times[method], times["lora"], strict=True)]
        print(f"  {method} / lora, median of same-round ratios: {statistics.median(ratios):.2f}"
              f"  ({', '.join(f'{r:.2f}' for r in ratios)})")


# ------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, help="base checkpoint (run or step folder); "
                        "default: pretrain one in --work")
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "raw",
                        help="text to pretrain the base on [data/raw]")
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "base"],
                        help="the pretrained base's preset [small]")
    parser.add_argument("--base-time", default="5m", help="pretraining time of the base [5m]")
    parser.add_argument("--base-steps", type=int,
                        help="pretraining steps of the base instead of --base-time (the same "
                             "base however busy the machine is)")
    parser.add_argument("--vocab-size", type=int, default=16384,
                        help="the base's tokenizer vocabulary [16384, as train-tokenizer]")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "conversations",
                        help="conversations to tune on [data/conversations]")
    parser.add_argument("--runs", default="full,lora,dora", metavar="RUNS",
                        type=lambda text: [RunSpec.parse(t) for t in text.split(",")],
                        help="comma-separated METHOD or METHOD@LR [full,lora,dora]")
    parser.add_argument("--time", default="10m", help="training time of each run [10m]")
    parser.add_argument("--steps", type=int, help="a step budget per run instead of --time")
    parser.add_argument("--seed", type=int, default=1337, help="the same for every run [1337]")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fragment-bench-finetune"),
                        help="work folder: base (reused), runs [/tmp/fragment-bench-finetune]")
    parser.add_argument("--speed-rounds", type=int, default=0, metavar="R",
                        help="first, step time alone: full, lora, dora in turn, R rounds [0]")
    parser.add_argument("--speed-steps", type=int, default=30,
                        help="steps per run of --speed-rounds [30]")
    parser.add_argument("--worker-base-loss", nargs=2, type=Path, metavar=("BASE", "TOKENS"),
                        help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker_base_loss:
        print(json.dumps(base_loss(*args.worker_base_loss)))
        return
    # This invocation's own runs: another one may be using the work folder at the same time
    args.runs_dir = args.work / "runs" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    args.runs_dir.mkdir(parents=True)
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}; load average "
          f"{' / '.join(f'{x:.2f}' for x in os.getloadavg())} (1 / 5 / 15 min)")
    base, described = pretrained_base(args)
    print(f"base: {described}", flush=True)
    tokens = prepare_tokens(base, args)
    scored = worker("--worker-base-loss", str(base), str(tokens))
    print(f"held out: {scored['blocks']} blocks, {scored['tokens']:,} assistant tokens; "
          f"torch {scored['torch']}, {scored['threads']} threads", flush=True)
    if args.speed_rounds:
        before = os.getloadavg()[0]
        times = speed_rounds(base, tokens.parent, args)
        print_speed(times, (before, os.getloadavg()[0]))
    budget = f"{args.steps} steps" if args.steps else args.time
    results = []
    for spec in args.runs:
        results.append(finetune(spec, base, tokens.parent, args, scored["parameters"]))
        r = results[-1]
        print(f"  {spec.label}: {r.steps} steps, val {r.val_loss:.4f}, "
              f"{r.peak_rss_mib:.0f} MiB, load {r.load[0]:.2f} -> {r.load[1]:.2f}", flush=True)
    print(f"\nseed {args.seed}, budget {budget} of training per run, conversations {args.data}, "
          f"runs in {args.runs_dir}")
    print_table(results, scored)
    print()
    print_goals(results, scored, budget)


if __name__ == "__main__":
    main()
