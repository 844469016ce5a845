"""Text around the engine: prompts in, safe text out, and `complete` for `fragment generate`.

This module owns:
- prompts: read (`--prompt TEXT`, `-` for stdin, `--prompt-file`) as strict UTF-8 with
  a byte cap, sanitised (`sanitize_prompt`), length-capped in characters and tokens,
  and encoded with `Tokenizer.encode`, so text spelling `<|endoftext|>` stays text;
- output: ids -> `StreamDecoder` (never half a UTF-8 character) -> `OutputSanitizer`
  (no control character or escape sequence) -> stop strings, in `TextStream`;
- `complete`: one prompt continued as a document, streamed as safe text.

It does not own sampling (engine.py), conversations (tokenizer/chat_template.py, chat.py)
or the terminal (cli/).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT
from fragment_llm.errors import PromptError
from fragment_llm.inference.engine import Engine, GenerationStats
from fragment_llm.safety.files import read_capped
from fragment_llm.safety.text import OutputSanitizer, sanitize_prompt
from fragment_llm.tokenizer.chat_template import Conversation, Turn, render_prompt, template_for

if TYPE_CHECKING:
    from fragment_llm.config import GenerateConfig
    from fragment_llm.model.gpt import GPT
    from fragment_llm.tokenizer.tokenizer import Tokenizer

# ---------------------------------------------------------------------------- prompts


def read_prompt(text: str | None, path: Path | None, settings: GenerateConfig) -> str:
    """`--prompt TEXT`, `--prompt -` (stdin) or `--prompt-file FILE`, as strict UTF-8.

    Input is read with a byte cap (4 bytes per allowed character) so a huge file or
    stream is refused without being held in memory.
    """
    cap = 4 * settings.max_prompt_chars
    if path is not None:
        data, where = read_capped(path, cap, PromptError), str(path)
    elif text == "-":
        data, where = sys.stdin.buffer.read(cap + 1), "standard input"
        if len(data) > cap:
            raise PromptError(f"the prompt on standard input is over {cap:,} bytes",
                              hint="shorten it, or raise max_prompt_chars in the config")
    else:
        return text or ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"the prompt is not valid UTF-8 (byte {exc.start}), in {where}"
                          ) from None


def check_prompt(text: str, settings: GenerateConfig, tokenizer: Tokenizer) -> str:
    """The prompt as the model will see it, or PromptError naming the cap it breaks.

    Sanitised first (`'hi\\x1b[2J\\r\\n' -> 'hi\\n'`), so the caps measure what is kept.
    May return "" (the caller decides whether an empty prompt is an error).
    """
    clean = sanitize_prompt(text)
    if len(clean) > settings.max_prompt_chars:
        raise PromptError(f"the prompt is {len(clean):,} characters; the limit is "
                          f"{settings.max_prompt_chars:,}",
                          hint="shorten it, or raise max_prompt_chars in the config")
    tokens = len(tokenizer.encode(clean))
    if tokens > settings.max_prompt_tokens:
        raise PromptError(f"the prompt is {tokens:,} tokens; the limit is "
                          f"{settings.max_prompt_tokens:,}",
                          hint="shorten it, or raise max_prompt_tokens in the config")
    return clean


# ------------------------------------------------------------------------ text stream


class TextStream:
    """Token ids in, printable text out: UTF-8 whole, sanitised, cut at a stop string.

    Text that might be the start of a stop string is held back until it is known not
    to be one, so a stop string is never printed, even split across tokens.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._clean = OutputSanitizer()
        self._stops = tuple(s for s in stop_strings if s)
        self._held = ""
        self.stopped = False

    def feed(self, token: int) -> str:
        return self._cut(self._clean.feed(self._decoder.feed(token)))

    def finish(self) -> str:
        """The rest: pending bytes (U+FFFD if incomplete), held-back text."""
        if self.stopped:
            return ""
        tail = self._cut(self._clean.feed(self._decoder.flush()) + self._clean.flush())
        held, self._held = self._held, ""
        return tail + ("" if self.stopped else held)

    def _cut(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = _stop_prefix_length(text, self._stops)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins a stop string.

    `('hello\\nUs', ['\\nUser:']) -> 3`.
    """
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def stream_text(tokens: Iterable[int], stream: TextStream,
                on_text: Callable[[str], None] | None = None) -> Iterator[str]:
    """Non-empty safe pieces of text for `tokens`, until they end or a stop string;
    `on_text` hears each one as it is yielded."""
    for token in tokens:
        piece = stream.feed(token)
        if piece:
            if on_text:
                on_text(piece)
            yield piece
        if stream.stopped:
            break
    tail = stream.finish()
    if tail:
        if on_text:
            on_text(tail)
        yield tail


def special_ids(tok: Tokenizer) -> set[int]:
    """Every special token ends a text: `<|end|>` or `<|endoftext|>` by design, and the
    others (`<|user|>`, ...) would only start a turn nobody asked for."""
    return set(tok.special_tokens.values())


# ------------------------------------------------------------------------ completion


@dataclass(frozen=True)
class Completion:
    text: str
    stats: GenerationStats

    def as_json(self) -> dict[str, str | int | float | None]:
        """`fragment generate --json`: exactly these five keys."""
        stats = self.stats
        return {"text": self.text, "new_tokens": stats.new_tokens,
                "prompt_tokens": stats.prompt_tokens, "tokens_per_s": stats.tokens_per_s,
                "time_to_first_token_s": stats.time_to_first_token_s}


def complete(model: GPT, tokenizer: Tokenizer, prompt: str, settings: GenerateConfig,
             on_text: Callable[[str], None] | None = None,
             chat_format: str | None = None) -> Completion:
    """Continue `prompt` as a document would (after `<|endoftext|>`), up to a special
    token, a stop string or a limit; `on_text` hears each safe piece as it is generated.
    For a model tuned to chat (`chat_format` "special_tokens"), the prompt is a user's
    message and the completion the answer, ended by `<|end|>`, rendered as chat
    renders a first turn. PromptError for an empty or over-long prompt."""
    clean = check_prompt(prompt, settings, tokenizer)
    if not clean.strip():
        raise PromptError("the prompt is empty (after removing control characters)",
                          hint="pass some text with --prompt, --prompt-file or --prompt -")
    engine = Engine(model)
    if chat_format == SPECIAL_TOKENS_CHAT_FORMAT:
        # Chat's budget: the window less room for the answer. A longer turn is refused,
        # as chat refuses it; the engine would slide it, cutting off its <|user|>.
        room = min(settings.max_new_tokens, engine.window // 2)
        question = Conversation(turns=[Turn("user", clean)])
        try:
            ids = render_prompt(question, template_for(chat_format), tokenizer,
                                budget=engine.window - room)
        except PromptError as exc:
            raise PromptError(exc.message, hint="shorten the prompt, lower --max-new-tokens, "
                                                "or pass --raw to continue it as text") from None
    else:
        ids = [tokenizer.eot_id, *tokenizer.encode(clean)]
    run = engine.generate(ids, settings, stop_ids=special_ids(tokenizer))
    pieces = list(stream_text(run, TextStream(tokenizer, settings.stop), on_text))
    return Completion("".join(pieces), run.stats)
