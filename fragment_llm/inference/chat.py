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
- the REPL: `ChatSession` turns one input line into a `Reply` and knows no terminal
  (it asks questions through a `confirm` callback); `run_repl` drives it through a
  `ChatIO` (the CLI's terminal, or a test's script), and nothing one message or
  command causes ends the session.

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
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import ValidationError

from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, ChatConfig, GenerateConfig
from fragment_llm.errors import FragmentError, OutputError, PromptError
from fragment_llm.inference.engine import Engine, GenerationStats
from fragment_llm.safety.files import (
    HINT_OVERWRITE,
    atomic_write_text,
    os_error_reason,
    read_capped,
)
from fragment_llm.safety.text import OutputSanitizer, escape_for_display, sanitize_prompt
from fragment_llm.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from fragment_llm.checkpoint.records import CheckpointConfig

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


def template_for(checkpoint_config: CheckpointConfig | None) -> ChatTemplate:
    """Special tokens only for checkpoints that say they were trained with them."""
    if checkpoint_config is not None and checkpoint_config.chat_format == SPECIAL_TOKENS_FORMAT:
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

PROMPT = "you> "
HELP = """commands:
  /help                 this list
  /reset                forget the conversation (the system prompt stays)
  /set KEY=VALUE ...    change a sampling setting, e.g. /set temperature=0.7 top_k=none
  /settings             show the settings and the system prompt
  /system TEXT          set the system prompt (/system alone removes it)
  /save FILE            write the transcript to a new FILE (replacing a file, or writing
                        a hidden one, needs a yes typed on the terminal)
  /exit                 leave (Ctrl-D too); Ctrl-C stops an answer
A paste of several lines is one message."""

SETTABLE = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens",
            "seed", "max_time_s")
_NONE_WORDS = frozenset({"none", "null", "off"})
# How /settings and /set show a value that means something in words.
_NONE_MEANS = {"top_k": "none (all tokens)", "seed": "none (different text each time)"}
_OFF_AT = {"top_p": 1.0, "repetition_penalty": 1.0}

Confirm = Callable[[str], "bool | None"]


def no_terminal(question: str) -> bool | None:
    """The `Confirm` of a session with nobody to ask: no answer at all."""
    return None


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
    """The chat's state and commands; no terminal. `handle(line) -> Reply`.

    `confirm(question)` asks the person at the terminal (True or False), or says there
    is nobody to ask (None); it must never read the stream the messages come from, or a
    piped line could answer for the user.
    """

    def __init__(self, model: Any, tokenizer: Tokenizer, settings: ChatConfig,
                 checkpoint_config: CheckpointConfig | None = None,
                 confirm: Confirm = no_terminal) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.template = template_for(checkpoint_config)
        self.engine = Engine(model)
        self.conversation = Conversation()
        self.confirm = confirm
        self.last_stats: GenerationStats | None = None
        if settings.system:
            self.conversation.system = self._checked(settings.system)

    def handle(self, line: str) -> Reply:
        """One message (a paste of several lines is always a message) or a /command.

        A FragmentError it causes (a refused prompt, a tokenizer that gives up, a file
        that may not be written) becomes the reply's one-line message: the chat goes on.
        """
        try:
            if line.startswith("/") and "\n" not in line.strip():
                return self._command(line)
            text = self._checked(line).strip()
            return Reply(answer=self._answer(text)) if text else Reply()
        except FragmentError as exc:
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
            run = self.engine.generate(ids, self.settings, special_ids(self.tokenizer))
        except BaseException:
            turns.pop()  # not sent: the conversation stays as it was
            raise
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
            return Reply(f"unknown command {escape_for_display(name)}; "
                         "/help lists the commands")
        return handler(self, arg.strip())

    def _help(self, arg: str) -> Reply:
        return Reply(HELP)

    def _exit(self, arg: str) -> Reply:
        return Reply(exit=True)

    def _reset(self, arg: str) -> Reply:
        self.conversation.turns.clear()
        return Reply("conversation cleared")

    def _system(self, arg: str) -> Reply:
        text = self._checked(arg).strip()
        self.conversation.system = text or None
        return Reply("system prompt set" if text else "system prompt removed")

    def _settings(self, arg: str) -> Reply:
        lines = [f"{key} = {_shown(key, getattr(self.settings, key))}" for key in SETTABLE]
        system = self.conversation.system
        lines += [f"system prompt = {escape_for_display(system, 200) if system else 'none'}",
                  f"format = {format_name(self.template)}",
                  f"context window = {self.engine.window:,} tokens"]
        return Reply("\n".join(lines))

    def _set(self, arg: str) -> Reply:
        changes = dict(_parse_assignment(word) for word in arg.split())
        if not changes:
            raise PromptError("usage: /set KEY=VALUE ...", hint=f"keys: {', '.join(SETTABLE)}")
        self.settings = _validated(self.settings, changes)
        return Reply(", ".join(f"{k} = {_shown(k, getattr(self.settings, k))}"
                               for k in changes))

    def _save(self, arg: str) -> Reply:
        """Write the transcript to a new file. Replacing a file, or writing a hidden one
        (`.bashrc`, `~/.config/...`: where shells and desktops keep what they run), needs
        a yes from `confirm`: with no terminal to ask, it is refused."""
        if not arg:
            return Reply("usage: /save FILE")
        path = save_target(arg)
        shown = _name(path)
        exists = check_save_target(path)
        if exists or _hidden(arg):
            question = "exists; replace it?" if exists else "is a hidden file; write it?"
            answer = self.confirm(f"{shown} {question} [y/N] ")
            if answer is None:
                raise OutputError(f"not saved: {shown} {question.partition(';')[0]}, and "
                                  "there is no terminal to confirm on",
                                  hint="/save to a new file whose name does not start "
                                       "with a dot")
            if not answer:
                return Reply("not saved")
            check_save_target(path)  # again: it may have changed while we asked
        try:  # a file that appears after the check is never replaced: the rename refuses
            atomic_write_text(path, self.conversation.transcript(), replace=exists)
        except OutputError as exc:
            if exc.hint != HINT_OVERWRITE:  # disk full, read-only: its own hint stands
                raise
            raise OutputError(exc.message, hint="/save to another name") from None
        return Reply(f"saved {len(self.conversation.turns)} turns to {shown}")


_COMMANDS: dict[str, Callable[[ChatSession, str], Reply]] = {
    "/help": ChatSession._help, "/exit": ChatSession._exit, "/quit": ChatSession._exit,
    "/reset": ChatSession._reset, "/system": ChatSession._system,
    "/settings": ChatSession._settings, "/set": ChatSession._set, "/save": ChatSession._save,
}


def _explain(exc: FragmentError) -> str:
    """One line: the message, and the hint in brackets."""
    return escape_for_display(exc.message + (f" ({exc.hint})" if exc.hint else ""))


def _shown(key: str, value: object) -> str:
    """A setting in words: `('top_k', None) -> 'none (all tokens)'`."""
    if value is None:
        return _NONE_MEANS.get(key, "none")
    text = str(value)
    if key == "temperature" and value == 0:
        return f"{text} (greedy: always the likeliest token)"
    if _OFF_AT.get(key) == value:
        return f"{text} (off)"
    return f"{text} s" if key == "max_time_s" else text


def format_name(template: ChatTemplate) -> str:
    if isinstance(template, SpecialTokenTemplate):
        return "chat special tokens"
    return "plain transcript (base model)"


def _parse_assignment(word: str) -> tuple[str, str | None]:
    """`'top_k=none' -> ('top_k', None)`; only the sampling settings may change."""
    key, sep, value = word.partition("=")
    key = key.strip().lower().replace("-", "_")
    if not sep or key not in SETTABLE:
        raise PromptError(f"cannot set {escape_for_display(word)!r}",
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


def save_target(arg: str) -> Path:
    """Where `/save ARG` writes: `~` expanded and the folder resolved, so the reply can
    say where the file went (`x/../talk.txt` -> `/home/me/talk.txt`); the name itself
    is not resolved (a symlink there is refused, never followed). OutputError for a
    name no file can have."""
    if "\x00" in arg:
        raise OutputError(f"cannot save to {_name(arg)}: a file name cannot contain a NUL "
                          "byte")
    try:
        path = Path(arg).expanduser()
        return path.parent.resolve() / path.name
    except (RuntimeError, OSError) as exc:  # ~nosuchuser; a symlink loop
        raise OutputError(f"cannot save to {_name(arg)}: {exc}") from None


def _name(path: Path | str) -> str:
    """A file name for a one-line message: escaped, and short enough to leave room for
    the reason after it."""
    return escape_for_display(str(path), 200)


def _hidden(arg: str) -> bool:
    """Whether a part of the name as typed is hidden: `~/.bashrc`, `.config/x`."""
    return any(part.startswith(".") and part not in (".", "..") for part in Path(arg).parts)


def check_save_target(path: Path) -> bool:
    """Whether `path` exists (a regular file: ask first); OutputError if it may not be
    written: a symlink (never written through), anything but a regular file (a FIFO, a
    device, a folder), or a parent folder that does not exist."""
    shown = _name(path)
    try:
        if not path.parent.is_dir():
            raise OutputError(f"folder does not exist: {_name(path.parent)}",
                              hint="/save into a folder that exists")
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:  # a name too long, a folder we may not search
        raise OutputError(f"cannot write {shown}: {os_error_reason(exc)}") from None
    if stat.S_ISLNK(mode):
        raise OutputError(f"refusing to write through a symlink: {shown}")
    if not stat.S_ISREG(mode):
        raise OutputError(f"not a regular file: {shown}")
    return True


# --------------------------------------------------------------------------- the loop


class ChatIO(Protocol):
    """The terminal (or a test script) as the REPL sees it."""

    def read(self, prompt: str) -> str:
        """One message (a paste of several lines is one); EOFError at the end of input,
        KeyboardInterrupt on Ctrl-C."""
        ...

    def begin_answer(self) -> None:
        """The model's turn starts (a label, a colour)."""
        ...

    def write(self, text: str) -> None:
        """A piece of an answer (already safe)."""
        ...

    def end_answer(self, interrupted: bool) -> None: ...
    def message(self, text: str) -> None: ...

    def failure(self, exc: Exception) -> None:
        """An error no rule expected (a bug): reported in one line; the chat goes on."""
        ...


def run_repl(session: ChatSession, io: ChatIO) -> int:
    """Read, answer, repeat, until /exit or end of input (exit code 0).

    Nothing one message or command causes ends the chat: a FragmentError is the reply's
    message, and anything else is reported by `io.failure` in one line, with the
    conversation kept.
    """
    while True:
        try:
            line = io.read(PROMPT)
        except EOFError:
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt, like Python's
            io.message("")
            continue
        try:
            reply = session.handle(line)
            if reply.answer is not None:
                _show_answer(reply.answer, io)
        except KeyboardInterrupt:
            io.message("[stopped]")
            continue
        except BrokenPipeError:  # whoever read the answers is gone: nobody to answer
            raise
        except Exception as exc:
            io.failure(exc)
            continue
        if reply.message:
            io.message(reply.message)
        if reply.exit:
            return 0


def _show_answer(answer: Iterator[str], io: ChatIO) -> None:
    """Stream one answer; Ctrl-C stops it. An error is shown after the answer's line is
    ended (a FragmentError here, anything else raised to `run_repl`)."""
    interrupted, problem = False, None
    io.begin_answer()
    try:
        for piece in answer:
            io.write(piece)
    except KeyboardInterrupt:  # Ctrl-C stops this answer only
        interrupted = True
    except FragmentError as exc:
        problem = exc
    finally:
        with contextlib.suppress(Exception):
            answer.close()  # type: ignore[attr-defined]  # records the partial answer
        io.end_answer(interrupted)
    if problem is not None:
        io.message(_explain(problem))



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
    from fragment_llm.model.gpt import count_parameters

    model = trained.model
    bpb = trained.val_bpb
    return [("checkpoint", trained.checkpoint.path),
            ("parameters", f"{count_parameters(model):,}"),
            ("training steps", f"{trained.step:,}"),
            ("val bits/byte", "-" if bpb is None else f"{bpb:.4f}"),
            ("device", str(trained.device)),
            ("context window", f"{model.config.block_size} tokens"),
            ("format", format_name(template_for(trained.checkpoint.config)))]
