"""Text around the engine: prompts in, safe text out, and the chat REPL's logic.

This module owns everything about text that generate.py does not know:
- prompts: sanitised (`sanitize_prompt`), length-capped in characters and tokens, and
  encoded with `Tokenizer.encode`, so text spelling `<|endoftext|>` stays text;
- conversations: turns rendered with the chat special tokens when the checkpoint was
  trained on chat data (its config.json says `"chat_format": "special_tokens"`), else
  as a plain `User: ... / Assistant: ...` transcript a base model can continue; the
  oldest turns are dropped when the context window is full (the system prompt stays);
- output: ids -> `StreamDecoder` (never half a UTF-8 character) -> `OutputSanitizer`
  (no control character or escape sequence) -> stop strings, in `TextStream`;
- the REPL: `ChatSession` turns one input line into a `Reply` and knows no terminal;
  `run_repl` drives it through a `ChatIO` (the CLI's terminal, or a test's script).

It does not own the terminal (cli.py renders with rich) or sampling (generate.py).
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, ChatConfig, GenerateConfig
from fragment_llm.errors import FragmentError, OutputError, PromptError
from fragment_llm.generate import Engine, GenerationStats
from fragment_llm.safeio import atomic_write_text, read_capped
from fragment_llm.sanitize import OutputSanitizer, sanitize_output, sanitize_prompt
from fragment_llm.tokenizer import Tokenizer

SPECIAL_TOKENS_FORMAT = SPECIAL_TOKENS_CHAT_FORMAT  # the checkpoint config's "chat_format"
HISTORY_FILE = Path("~/.cache/fragment-llm/chat_history")
HISTORY_LENGTH = 1000

# ---------------------------------------------------------------------------- prompts


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


# ------------------------------------------------------------------------ completion


@dataclass(frozen=True)
class Completion:
    text: str
    stats: GenerationStats

    def as_json(self) -> dict[str, Any]:
        """`fragment generate --json`: exactly these five keys."""
        stats = self.stats
        return {"text": self.text, "new_tokens": stats.new_tokens,
                "prompt_tokens": stats.prompt_tokens, "tokens_per_s": stats.tokens_per_s,
                "time_to_first_token_s": stats.time_to_first_token_s}


def complete(model: Any, tokenizer: Tokenizer, prompt: str, settings: GenerateConfig,
             on_text: Callable[[str], None] | None = None) -> Completion:
    """Continue `prompt` as a document would (after `<|endoftext|>`), up to a special
    token, a stop string or a limit; `on_text` hears each safe piece as it is generated.
    PromptError for an empty or over-long prompt."""
    clean = check_prompt(prompt, settings, tokenizer)
    if not clean.strip():
        raise PromptError("the prompt is empty (after removing control characters)",
                          hint="pass some text with --prompt, --prompt-file or --prompt -")
    ids = [tokenizer.eot_id, *tokenizer.encode(clean)]
    run = Engine(model).generate(ids, settings, stop_ids=special_ids(tokenizer))
    pieces = list(_stream_text(run, TextStream(tokenizer, settings.stop), on_text))
    return Completion("".join(pieces), run.stats)


def special_ids(tok: Tokenizer) -> set[int]:
    """Every special token ends a text: `<|end|>` or `<|endoftext|>` by design, and the
    others (`<|user|>`, ...) would only start a turn nobody asked for."""
    return set(tok.special_tokens.values())


def _stream_text(tokens: Iterable[int], stream: TextStream,
                 on_text: Callable[[str], None] | None = None) -> Iterator[str]:
    """Non-empty safe pieces of text for `tokens`, until they end or a stop string."""
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


# ---------------------------------------------------------------------- conversation


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str


@dataclass
class Conversation:
    system: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def transcript(self) -> str:
        """Plain text for /save: one block per turn."""
        blocks = [f"system: {self.system}"] if self.system else []
        blocks += [f"{turn.role}: {turn.text}" for turn in self.turns]
        return "# fragment chat transcript\n\n" + "\n\n".join(blocks) + "\n"


class ChatTemplate(Protocol):
    """How a conversation becomes ids, and which text ends an answer (besides any
    special token, which always does)."""

    stop_strings: tuple[str, ...]

    def system(self, tok: Tokenizer, text: str) -> list[int]: ...
    def turn(self, tok: Tokenizer, turn: Turn) -> list[int]: ...
    def answer_start(self, tok: Tokenizer) -> list[int]: ...


class SpecialTokenTemplate:
    """`<|system|>S<|end|><|user|>U<|end|><|assistant|>A<|end|>...<|assistant|>`.

    Only `special_id` makes the markers: text typed by the user that spells one is
    encoded as ordinary text and cannot close a turn or open another.
    """

    stop_strings: tuple[str, ...] = ()

    def system(self, tok: Tokenizer, text: str) -> list[int]:
        return _wrap(tok, "<|system|>", text)

    def turn(self, tok: Tokenizer, turn: Turn) -> list[int]:
        return _wrap(tok, f"<|{turn.role}|>", turn.text)

    def answer_start(self, tok: Tokenizer) -> list[int]:
        return [tok.special_id("<|assistant|>")]


def _wrap(tok: Tokenizer, marker: str, text: str) -> list[int]:
    return [tok.special_id(marker), *tok.encode(text), tok.special_id("<|end|>")]


class TranscriptTemplate:
    """`S\\n\\nUser: U\\nAssistant: A\\n...User: U\\nAssistant:`: text a base model,
    trained on documents only, can continue. The answer ends where the model starts
    the next `User:` line."""

    stop_strings: tuple[str, ...] = ("\nUser:",)

    def system(self, tok: Tokenizer, text: str) -> list[int]:
        return tok.encode(f"{text}\n\n")

    def turn(self, tok: Tokenizer, turn: Turn) -> list[int]:
        return tok.encode(f"{turn.role.capitalize()}: {turn.text}\n")

    def answer_start(self, tok: Tokenizer) -> list[int]:
        return tok.encode("Assistant:")


def template_for(checkpoint_config: Mapping[str, Any]) -> ChatTemplate:
    """Special tokens only for checkpoints that say they were trained with them."""
    if checkpoint_config.get("chat_format") == SPECIAL_TOKENS_FORMAT:
        return SpecialTokenTemplate()
    return TranscriptTemplate()


def render(conversation: Conversation, template: ChatTemplate, tok: Tokenizer,
           budget: int) -> list[int]:
    """Ids for the whole conversation plus the answer's start, in at most `budget`.

    Whole turns are dropped oldest first (a user turn with its answer), the system
    prompt always stays; if the system prompt and the last user turn alone do not
    fit, PromptError.
    """
    head = [tok.eot_id] + (template.system(tok, conversation.system)
                           if conversation.system else [])
    tail = template.answer_start(tok)
    rendered = [template.turn(tok, turn) for turn in conversation.turns]
    first = 0
    while sum(map(len, rendered[first:])) + len(head) + len(tail) > budget:
        if first >= len(rendered) - 1:
            size = len(head) + len(tail) + len(rendered[-1]) if rendered else len(head)
            raise PromptError(f"the system prompt and this message need {size:,} tokens; "
                              f"the model's context holds {budget:,} before its answer",
                              hint="send a shorter message, or shorten /system")
        first += 2 if conversation.turns[first].role == "user" else 1
        first = min(first, len(rendered) - 1)
    return [*head, *(i for ids in rendered[first:] for i in ids), *tail]


# ------------------------------------------------------------------------------ REPL

HELP = """commands:
  /help                 this list
  /reset                forget the conversation (the system prompt stays)
  /set KEY=VALUE ...    change a sampling setting, e.g. /set temperature=0.7 top_k=none
  /settings             show the settings and the system prompt
  /system TEXT          set the system prompt (/system alone removes it)
  /save FILE            write the transcript to FILE (asks before replacing a file)
  /exit                 leave (Ctrl-D too); Ctrl-C stops an answer"""

SETTABLE = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens",
            "seed", "max_time_s")
_NONE_WORDS = frozenset({"none", "null", "off"})


@dataclass
class Reply:
    """What the session wants shown for one input line.

    `answer` (for a prompt) yields the model's safe text as it is generated; closing it
    early (Ctrl-C) keeps what was shown as the assistant's turn.
    """

    message: str = ""
    answer: Iterator[str] | None = None
    exit: bool = False


class ChatSession:
    """The chat's state and commands; no terminal. `handle(line) -> Reply`."""

    def __init__(self, model: Any, tokenizer: Tokenizer, settings: ChatConfig,
                 checkpoint_config: Mapping[str, Any] | None = None) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.template = template_for(checkpoint_config or {})
        self.engine = Engine(model)
        self.conversation = Conversation()
        self._confirm: Callable[[], Reply] | None = None
        self.last_stats: GenerationStats | None = None
        if settings.system:
            self.conversation.system = self._checked(settings.system)

    @property
    def prompt(self) -> str:
        return "replace it? [y/N] " if self._confirm else "you> "

    def handle(self, line: str) -> Reply:
        """One line typed by the user: a confirmation, a /command, or a prompt."""
        if self._confirm is not None:
            confirm, self._confirm = self._confirm, None
            return confirm() if line.strip().lower() in ("y", "yes") else Reply("not saved")
        if line.startswith("/"):
            return self._command(line)
        try:
            text = self._checked(line).strip()
            return Reply(answer=self._answer(text)) if text else Reply()
        except PromptError as exc:  # too long: say so, and the REPL carries on
            return Reply(_explain(exc))

    # ---------------------------------------------------------------- answering

    def _checked(self, text: str) -> str:
        return check_prompt(text, self.settings, self.tokenizer)

    def _answer(self, text: str) -> Iterator[str]:
        """Validate eagerly (render), then stream; the turn pair is recorded at the end."""
        budget = self.engine.window - min(self.settings.max_new_tokens, self.engine.window // 2)
        turns = self.conversation.turns
        turns.append(Turn("user", text))
        try:
            ids = render(self.conversation, self.template, self.tokenizer, budget)
        except PromptError:
            turns.pop()
            raise
        run = self.engine.generate(ids, self.settings, special_ids(self.tokenizer))
        self.last_stats = run.stats
        return self._stream(run, turns)

    def _stream(self, run: Any, turns: list[Turn]) -> Iterator[str]:
        shown: list[str] = []
        stream = TextStream(self.tokenizer, self.template.stop_strings)
        try:
            for piece in _stream_text(run, stream):
                piece = piece if shown else piece.lstrip()  # "Assistant: hi" -> "hi"
                if piece:
                    yield piece
                    shown.append(piece)  # only once the consumer came back: it was shown
        finally:
            turns.append(Turn("assistant", "".join(shown).strip()))

    # ----------------------------------------------------------------- commands

    def _command(self, line: str) -> Reply:
        name, _, arg = line.strip().partition(" ")
        handler = _COMMANDS.get(name.lower())
        if handler is None:
            return Reply(f"unknown command {sanitize_output(name)}; /help lists the commands")
        return handler(self, arg.strip())

    def _help(self, arg: str) -> Reply:
        return Reply(HELP)

    def _exit(self, arg: str) -> Reply:
        return Reply(exit=True)

    def _reset(self, arg: str) -> Reply:
        self.conversation.turns.clear()
        return Reply("conversation cleared")

    def _system(self, arg: str) -> Reply:
        try:
            text = self._checked(arg).strip()
        except PromptError as exc:
            return Reply(_explain(exc))
        self.conversation.system = text or None
        return Reply("system prompt set" if text else "system prompt removed")

    def _settings(self, arg: str) -> Reply:
        lines = [f"{key} = {getattr(self.settings, key)}" for key in SETTABLE]
        lines.append(f"system = {self.conversation.system or '(none)'}")
        lines.append(f"format = {type(self.template).__name__}, context window = "
                     f"{self.engine.window} tokens")
        return Reply(sanitize_output("\n".join(lines)))

    def _set(self, arg: str) -> Reply:
        try:
            changes = dict(_parse_assignment(word) for word in arg.split())
            if not changes:
                raise PromptError("usage: /set KEY=VALUE ...", hint=f"keys: {', '.join(SETTABLE)}")
            self.settings = _validated(self.settings, changes)
        except PromptError as exc:
            return Reply(_explain(exc))
        return Reply(", ".join(f"{k} = {getattr(self.settings, k)}" for k in changes))

    def _save(self, arg: str) -> Reply:
        if not arg:
            return Reply("usage: /save FILE")
        path = Path(arg).expanduser()
        text = self.conversation.transcript()
        try:
            if check_save_target(path):
                self._confirm = lambda: self._write(path, text)
                return Reply(f"{sanitize_output(str(path))} exists")
        except OutputError as exc:
            return Reply(_explain(exc))
        return self._write(path, text)

    def _write(self, path: Path, text: str) -> Reply:
        try:
            check_save_target(path)
            atomic_write_text(path, text)
        except OutputError as exc:
            return Reply(_explain(exc))
        return Reply(f"saved {len(self.conversation.turns)} turns to {sanitize_output(str(path))}")


_COMMANDS: dict[str, Callable[[ChatSession, str], Reply]] = {
    "/help": ChatSession._help, "/exit": ChatSession._exit, "/quit": ChatSession._exit,
    "/reset": ChatSession._reset, "/system": ChatSession._system,
    "/settings": ChatSession._settings, "/set": ChatSession._set, "/save": ChatSession._save,
}


def _explain(exc: FragmentError) -> str:
    text = f"{exc.message}" + (f" ({exc.hint})" if exc.hint else "")
    return sanitize_output(text)


def _parse_assignment(word: str) -> tuple[str, str | None]:
    """`'top_k=none' -> ('top_k', None)`; only the sampling settings may change."""
    key, sep, value = word.partition("=")
    key = key.strip().lower().replace("-", "_")
    if not sep or key not in SETTABLE:
        raise PromptError(f"cannot set {sanitize_output(word)!r}",
                          hint=f"use KEY=VALUE with KEY one of {', '.join(SETTABLE)}")
    return key, None if value.strip().lower() in _NONE_WORDS else value.strip()


def _validated(settings: ChatConfig, changes: Mapping[str, str | None]) -> ChatConfig:
    """The settings with `changes`, checked by the same model as the config file."""
    try:
        # Lax on purpose: /set values are typed text ("0.7", "none"), to be converted.
        return type(settings).model_validate({**settings.model_dump(), **changes},
                                             strict=False)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "settings"
        raise PromptError(f"invalid {key} = {changes.get(key)!r}: {first['msg']}",
                          hint="nothing was changed") from None


def check_save_target(path: Path) -> bool:
    """Whether `path` exists (a regular file: ask first); OutputError if it may not be
    written: a symlink (never written through), anything but a regular file, or a
    parent folder that does not exist."""
    shown = sanitize_output(str(path))
    if not path.parent.is_dir():
        raise OutputError(f"folder does not exist: {sanitize_output(str(path.parent))}")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        raise OutputError(f"refusing to write through a symlink: {shown}")
    if not stat.S_ISREG(mode):
        raise OutputError(f"not a regular file: {shown}")
    return True


# --------------------------------------------------------------------------- the loop


class ChatIO(Protocol):
    """The terminal (or a test script) as the REPL sees it."""

    def read(self, prompt: str) -> str:
        """One line; EOFError at the end of input, KeyboardInterrupt on Ctrl-C."""
        ...

    def write(self, text: str) -> None:
        """A piece of an answer (already safe)."""
        ...

    def end_answer(self, interrupted: bool) -> None: ...
    def message(self, text: str) -> None: ...


def run_repl(session: ChatSession, io: ChatIO) -> int:
    """Read, answer, repeat, until /exit or end of input (exit code 0)."""
    while True:
        try:
            line = io.read(session.prompt)
        except EOFError:
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, like Python's
            io.message("")
            continue
        reply = session.handle(line)
        if reply.answer is not None:
            _show_answer(reply.answer, io)
        if reply.message:
            io.message(reply.message)
        if reply.exit:
            return 0


def _show_answer(answer: Iterator[str], io: ChatIO) -> None:
    interrupted = False
    try:
        for piece in answer:
            io.write(piece)
    except KeyboardInterrupt:  # Ctrl-C stops this answer only
        interrupted = True
    except FragmentError as exc:
        io.message(_explain(exc))
    finally:
        with contextlib.suppress(Exception):
            answer.close()  # type: ignore[attr-defined]  # records the partial answer
    io.end_answer(interrupted)


# ------------------------------------------------------------------ line editing


def enable_line_editing(history: bool, path: Path = HISTORY_FILE) -> Callable[[], None]:
    """readline editing for `input()` (call it only when stdin is a terminal); with
    `history`, load it from `path` (its folder made 0700, never read or written
    through a symlink). Returns the function that saves it at the end."""
    try:
        import readline
    except ImportError:  # not on every platform: plain input() still works
        return lambda: None
    path = path.expanduser()
    if not history or not _safe_history_path(path):
        return lambda: None
    readline.set_history_length(HISTORY_LENGTH)
    if path.exists():
        with contextlib.suppress(OSError):
            readline.read_history_file(path)

    def save() -> None:
        if _safe_history_path(path):
            with contextlib.suppress(OSError):
                readline.write_history_file(path)
                os.chmod(path, 0o600)  # prompts are private

    return save


def _safe_history_path(path: Path) -> bool:
    """The folder exists (made 0700) and neither it nor the file is a symlink."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.parent.is_symlink() or path.is_symlink():
            return False
        return not path.exists() or stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def banner_rows(trained: Any) -> list[tuple[str, object]]:
    """The chat banner: what model this is and how good it was at training's end."""
    from fragment_llm.model import count_parameters

    model = trained.model
    bpb = trained.val_bpb
    return [("checkpoint", trained.checkpoint.path),
            ("parameters", f"{count_parameters(model):,}"),
            ("training steps", f"{trained.step:,}"),
            ("val bits/byte", "-" if bpb is None else f"{bpb:.4f}"),
            ("device", str(trained.device)),
            ("context window", f"{model.config.block_size} tokens"),
            ("format", "chat special tokens"
             if isinstance(template_for(trained.checkpoint.config), SpecialTokenTemplate)
             else "plain transcript (base model)")]
