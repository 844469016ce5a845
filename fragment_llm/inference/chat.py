"""The chat: a session that turns input lines into replies, and the REPL that drives it.

This module owns:
- `ChatSession`: the conversation, its /commands and its answers; `handle(line) ->
  Reply`, with no terminal (it asks questions through a `confirm` callback). Turns are
  rendered by the checkpoint's chat template (tokenizer/chat_template.py), the oldest
  dropped when the context window is full (the system prompt stays);
- `run_repl`: read, answer, repeat, through a `ChatIO` (the CLI's terminal, or a test's
  script); nothing one message or command causes ends the session;
- readline history, and the rows of the chat's banner.

It does not own the terminal (cli/ renders with rich), sampling (engine.py), prompt
checks and safe output text (text.py), or how turns become ids (chat_template.py).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import ValidationError

from fragment_llm.errors import FragmentError, OutputError, PromptError
from fragment_llm.inference.engine import Engine, Generation, GenerationStats
from fragment_llm.inference.text import TextStream, check_prompt, special_ids, stream_text
from fragment_llm.model.size import count_parameters
from fragment_llm.safety.files import HINT_OVERWRITE, atomic_write_text, os_error_reason
from fragment_llm.safety.text import escape_for_display
from fragment_llm.tokenizer.chat_template import Conversation, Turn, render_prompt, template_for

if TYPE_CHECKING:
    from fragment_llm.checkpoint.trained import Trained
    from fragment_llm.config import ChatConfig
    from fragment_llm.model.gpt import GPT
    from fragment_llm.tokenizer.tokenizer import Tokenizer

HISTORY_FILE = Path("~/.cache/fragment-llm/chat_history")
HISTORY_LENGTH = 1000

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
    answer: Generator[str, None, None] | None = None
    exit: bool = False


class ChatSession:
    """The chat's state and commands; no terminal. `handle(line) -> Reply`.

    `chat_format` is the checkpoint config's "chat_format" (which template renders the
    turns). `confirm(question)` asks the person at the terminal (True or False), or
    says there is nobody to ask (None); it must never read the stream the messages come
    from, or a piped line could answer for the user.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, settings: ChatConfig,
                 chat_format: str | None = None, confirm: Confirm = no_terminal) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.template = template_for(chat_format)
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

    def _answer(self, text: str) -> Generator[str, None, None]:
        """Validate eagerly (render), then stream; the turn pair is recorded at the end."""
        budget = self.engine.window - min(self.settings.max_new_tokens, self.engine.window // 2)
        turns = self.conversation.turns
        turns.append(Turn("user", text))
        try:
            ids = render_prompt(self.conversation, self.template, self.tokenizer, budget)
            run = self.engine.generate(ids, self.settings, special_ids(self.tokenizer))
        except BaseException:
            turns.pop()  # not sent: the conversation stays as it was
            raise
        self.last_stats = run.stats
        return self._stream(run, turns)

    def _stream(self, run: Generation, turns: list[Turn]) -> Generator[str, None, None]:
        shown: list[str] = []
        stream = TextStream(self.tokenizer, self.template.stop_strings)
        try:
            for piece in stream_text(run, stream):
                piece = piece if shown else piece.lstrip()  # "Assistant: hi" -> "hi"
                if piece:
                    yield piece
                    shown.append(piece)  # only once the consumer came back: it was shown
        finally:
            turns.append(Turn("assistant", "".join(shown).strip()))

    # ----------------------------------------------------------------- commands

    def _command(self, line: str) -> Reply:
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        match name.lower():
            case "/help":
                return Reply(HELP)
            case "/exit" | "/quit":
                return Reply(exit=True)
            case "/reset":
                self.conversation.turns.clear()
                return Reply("conversation cleared")
            case "/system":
                text = self._checked(arg).strip()
                self.conversation.system = text or None
                return Reply("system prompt set" if text else "system prompt removed")
            case "/settings":
                return self._settings()
            case "/set":
                return self._set(arg)
            case "/save":
                return self._save(arg)
        return Reply(f"unknown command {escape_for_display(name)}; /help lists the commands")

    def _settings(self) -> Reply:
        lines = [f"{key} = {_shown(key, getattr(self.settings, key))}" for key in SETTABLE]
        system = self.conversation.system
        lines += [f"system prompt = {escape_for_display(system, 200) if system else 'none'}",
                  f"format = {self.template.title}",
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
        # hidden: a part of the name as typed starts with a dot (`~/.bashrc`, `.config/x`)
        if exists or any(part.startswith(".") and part not in (".", "..")
                         for part in Path(arg).parts):
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


def _show_answer(answer: Generator[str, None, None], io: ChatIO) -> None:
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
            answer.close()  # records the partial answer
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


def banner_rows(trained: Trained, chat_format: str | None,
                adapter: Path | None = None) -> list[tuple[str, object]]:
    """The chat banner: what model this is and how good it was at training's end."""
    model = trained.model
    bpb = trained.val_bpb
    rows: list[tuple[str, object]] = [("checkpoint", trained.checkpoint.path)]
    if adapter is not None:
        rows.append(("adapter", adapter))
    return rows + [("parameters", f"{count_parameters(model):,}"),
                   ("training steps", f"{trained.step:,}"),
                   ("val bits/byte", "-" if bpb is None else f"{bpb:.4f}"),
                   ("device", str(trained.device)),
                   ("context window", f"{model.config.block_size} tokens"),
                   ("format", template_for(chat_format).title)]
