"""Generation: token ids in, token ids out, one at a time.

This module owns the decoding loop (prefill the prompt into a pre-allocated KV cache,
then one position per new token), sampling (temperature, top-k, top-p, repetition
penalty, a seeded `torch.Generator`), the hard limits (new tokens, wall-clock time) and
the sliding window past `block_size`. It knows nothing of text: stop *ids*
(`<|endoftext|>`, `<|end|>`) are passed in, and stop *strings* are the caller's job
(decode as the ids arrive and break out of the loop). text.py and chat.py do the text.

    engine = Engine(model)                                  # one cache, reused
    run = engine.generate(prompt_ids, GenerateConfig(temperature=0), stop_ids={eot_id})
    for token in run:                                       # break to stop early
        ...
    run.stats.tokens_per_s

One engine serves any number of generations, one after another (a chat's answers, a
server's requests): each starts from a fresh cache and its own sampler, so it gives the
ids a new engine would.

Speed at batch 1 on a CPU comes from doing nothing per token but the model's forward
over one position and sampling its logits: no recompute of the prefix, no
re-allocation of the cache, and no autograd bookkeeping (`torch.inference_mode`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fragment_llm.config import GenerateConfig
from fragment_llm.errors import CheckpointError, PromptError
from fragment_llm.model.gpt import GPT, KVCache

StopReason = Literal["stop_id", "max_new_tokens", "max_time", "caller"]


@dataclass
class GenerationStats:
    """What one generation did; filled in while it runs.

    `stop_reason`: "stop_id" (an id of `stop_ids` was sampled), "max_new_tokens",
    "max_time", or "caller" (the consumer stopped iterating, e.g. on a stop string).
    """

    prompt_tokens: int
    new_tokens: int = 0
    time_to_first_token_s: float | None = None  # prefill + the first sample
    decode_s: float = 0.0  # time inside the engine for every later token
    decode_steps: int = 0
    window_slides: int = 0  # times the oldest tokens were dropped to stay in block_size
    stop_reason: StopReason = "caller"

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate after the first token (None until there is a second one)."""
        return self.decode_steps / self.decode_s if self.decode_steps and self.decode_s else None


class Sampler:
    """Picks the next id from one position's logits (V,), following `settings`.

    Temperature 0 is greedy (argmax). Otherwise: repetition penalty, temperature, top-k,
    top-p, then one draw from `generator`, seeded from `settings.seed` when given (same
    seed and logits -> same ids), else from the OS.
    """

    def __init__(self, settings: GenerateConfig, vocab_size: int,
                 context: Sequence[int] = ()) -> None:
        self.settings = settings
        self.generator = torch.Generator()
        if settings.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(settings.seed)
        self.seen: Tensor | None = None  # ids to penalise; kept only when penalising
        if settings.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[list(context)] = True

    def __call__(self, logits: Tensor) -> int:
        # On the CPU whatever the model's device (sampling needs a host int anyway), and
        # in float64: the penalty and the temperature may scale logits far past float32.
        logits = logits.detach().cpu().double()  # (V,); cast on the CPU: MPS has no float64
        if not bool(torch.isfinite(logits).all()):
            raise CheckpointError("the model's output is not finite (NaN or infinity)",
                                  hint="its weights are damaged or diverged: run `fragment "
                                       "verify` on the checkpoint, or use an earlier one")
        logits = self._penalise(logits)
        if self.settings.temperature == 0.0:
            token = int(logits.argmax())
        else:
            token = self._draw(logits)
        if self.seen is not None:
            self.seen[token] = True
        return token

    def _penalise(self, logits: Tensor) -> Tensor:
        """CTRL (Keskar et al. 2019): seen tokens' logits shrink towards "less likely"
        (positive ones divided, negative ones multiplied by the penalty)."""
        if self.seen is None:
            return logits
        penalty = self.settings.repetition_penalty
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(self.seen, penalised, logits)

    def _draw(self, logits: Tensor) -> int:
        # Candidates are chosen on the logits as they are: after the shift below, two
        # that differ by less than the largest's rounding step (0 and 1e-38 beside 1.0)
        # become equal, and top-k could keep the smaller one.
        ids = None  # candidates' ids when narrowed (top-k) or reordered (top-p)
        top_k, top_p = self.settings.top_k, self.settings.top_p
        if top_k is not None and top_k < logits.numel():
            logits, ids = torch.topk(logits, top_k)  # (k,), sorted, most likely first
        elif top_p < 1.0:
            logits, ids = torch.sort(logits, descending=True)
        # Shifted so the largest is 0 before the division, every temperature in range
        # works: a tiny one (1e-50) sends the others to -inf (greedy, its limit) instead
        # of the largest to +inf and softmax to NaN; a huge one flattens towards
        # uniform. Softmax is unchanged by the shift.
        probs = torch.softmax((logits - logits.max()) / self.settings.temperature, dim=-1)
        if top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p: a token stays when the
            # mass before it is below top_p, so the most likely token always stays.
            # (In float64 the first token's "mass before" is exactly 0 < top_p, however
            # small top_p is; in float32 a top_p of 1e-50 rounded to 0 and kept nothing.)
            probs = probs * ((probs.cumsum(0) - probs) < top_p)
        choice = torch.multinomial(probs, 1, generator=self.generator)
        return int(choice) if ids is None else int(ids[int(choice)])


class Engine:
    """Generates from one model at batch 1, reusing one KV cache for every generation.

    Generations may be made in any order and run one after another, each from a fresh
    cache. The cache belongs to the one that started running last: starting another
    abandons the previous one, which is refused if it is resumed.
    """

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.cache = KVCache.for_model(model, batch_size=1)
        device = model.wte.weight.device
        self._token = torch.zeros((1, 1), dtype=torch.long, device=device)  # (B=1, T=1)
        self._running: Generation | None = None

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def window(self) -> int:
        """Tokens the model sees at once (its block size)."""
        return self.cache.max_len

    def generate(self, prompt_ids: Sequence[int], settings: GenerateConfig,
                 stop_ids: Collection[int] = ()) -> Generation:
        """A lazy generation: iterate it for new ids (stop ids are not yielded). The
        prompt is checked now; nothing runs until the first id is asked for."""
        ids = list(prompt_ids)
        if not ids:
            raise PromptError("the prompt is empty: generation needs at least one token")
        bad = next((t for t in ids if type(t) is not int or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise PromptError(f"prompt token id {bad!r} is outside the model's vocabulary "
                              f"[0, {self.vocab_size})")
        return Generation(self, ids, settings, frozenset(stop_ids))

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int]) -> Tensor:
        """Forget the cache, run `ids` through the model; the last position's logits (V,)."""
        self.cache.reset()
        idx = torch.tensor([list(ids)], dtype=torch.long, device=self._token.device)  # (1, T)
        return self.model(idx, self.cache, last_only=True)[0, -1]

    @torch.inference_mode()
    def decode(self, token: int) -> Tensor:
        """Append one token at the cache's next position; its logits (V,)."""
        self._token.fill_(token)
        return self.model(self._token, self.cache)[0, -1]


class Generation:
    """An iterator of new token ids with its `stats`; made by `Engine.generate`."""

    def __init__(self, engine: Engine, prompt_ids: list[int], settings: GenerateConfig,
                 stop_ids: frozenset[int]) -> None:
        self.engine, self.settings, self.stop_ids = engine, settings, stop_ids
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        size = engine.window
        # Sliding drops a quarter of the window at once, so the re-prefill it costs
        # happens every size/4 tokens rather than on every token once the window is full.
        self._keep = max(1, size - max(1, size // 4))
        self._window = prompt_ids if len(prompt_ids) <= size else prompt_ids[-self._keep:]
        self.stats.window_slides = int(len(prompt_ids) > size)
        self._sampler = Sampler(settings, engine.vocab_size, prompt_ids)
        self._started = False

    def __iter__(self) -> Iterator[int]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[int]:
        self.engine._running = self  # the cache is ours from here; prefill resets it
        stats, limit = self.stats, self.settings.max_new_tokens
        started = time.perf_counter()
        deadline = started + self.settings.max_time_s
        token = self._sampler(self.engine.prefill(self._window))
        stats.time_to_first_token_s = time.perf_counter() - started
        while token not in self.stop_ids:
            stats.new_tokens += 1
            yield token
            if stats.new_tokens >= limit or time.perf_counter() >= deadline:
                stats.stop_reason = "max_new_tokens" if stats.new_tokens >= limit else "max_time"
                return
            token = self._step(token)
        stats.stop_reason = "stop_id"

    def _step(self, token: int) -> int:
        """Feed `token`, sample the next one; timed as decode."""
        if self.engine._running is not self:  # the cache holds another one's context
            raise RuntimeError("another generation started on this engine since this one")
        started = time.perf_counter()
        next_token = self._sampler(self._advance(token))
        self.stats.decode_s += time.perf_counter() - started
        self.stats.decode_steps += 1
        return next_token

    def _advance(self, token: int) -> Tensor:
        """Logits after `token`, sliding the window first if the cache is full."""
        self._window.append(token)
        if self.engine.cache.pos < self.engine.cache.max_len:
            return self.engine.decode(token)
        self._window = self._window[-self._keep:]
        self.stats.window_slides += 1
        return self.engine.prefill(self._window)


def generate_ids(model: GPT, prompt_ids: Sequence[int], settings: GenerateConfig,
                 stop_ids: Collection[int] = ()) -> list[int]:
    """All new ids at once (a fresh engine): `generate_ids(m, [1, 2], cfg) -> [7, 7, 3]`."""
    return list(Engine(model).generate(prompt_ids, settings, stop_ids))
