"""`fragment chat`: the terminal side of the REPL (line editing, piped input, Ctrl-C
stopping an answer, confirmations); the conversation itself is `inference.chat`."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from fragment_llm.cli.common import (
    FLAGS,
    FlagValue,
    FragmentCommand,
    checkpoint_option,
    config_option,
    model_paths,
    report_internal_error,
    sampling_options,
    show,
    use_threads,
    write_stdout,
)

MAX_PIPED_LINE_BYTES = 64 << 20  # 4 bytes a character for the largest max_prompt_chars


class ChatTerminal:
    """The chat's I/O on the real streams.

    On a terminal (stdin a tty): readline input after `you>`, a paste of several lines
    taken as one message (bracketed paste, switched on for the session), the model's
    turn labelled `model>` and, when stdout is a terminal too, coloured (never with
    NO_COLOR set or TERM=dumb); Ctrl-D leaves the cursor on a fresh line. From a pipe:
    one line per message, each answer plain on stdout ending in a newline, everything
    else on stderr. Questions (`confirm`) go to /dev/tty, never to stdin. Model text
    arrives already safe; messages are printed as rich Text, markup off.
    """

    PASTE_ON, PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"
    PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
    LABEL, MODEL_TEXT, RESET = "\x1b[1;36m", "\x1b[36m", "\x1b[0m"  # bold cyan, cyan

    def __init__(self, interactive: bool, colour: bool = False, paste: bool = False) -> None:
        from rich.console import Console

        self.interactive, self.colour, self.paste = interactive, colour, paste
        self.console = Console(highlight=False, markup=False, emoji=False, soft_wrap=True)

    @classmethod
    def for_this_process(cls) -> ChatTerminal:
        interactive = sys.stdin.isatty()
        fancy = sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"
        return cls(interactive, colour=fancy and not os.environ.get("NO_COLOR"),
                   paste=interactive and fancy)

    def __enter__(self) -> ChatTerminal:
        if self.paste:
            write_stdout(self.PASTE_ON)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.paste:
            write_stdout(self.PASTE_OFF)

    def read(self, prompt: str) -> str:
        if not self.interactive:
            # Bytes that are not UTF-8 become U+FFFD, like any prompt: not a crash. A line
            # is read up to a cap (the prompt's own caps refuse it later), and the rest of
            # an over-long line is skipped rather than taken as the next message.
            raw = sys.stdin.buffer.readline(MAX_PIPED_LINE_BYTES)
            if len(raw) == MAX_PIPED_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := sys.stdin.buffer.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
            line = raw.decode("utf-8", errors="replace")
            if not line:
                raise EOFError
            return line.rstrip("\n")
        try:
            line = input(prompt)
        except EOFError:
            write_stdout("\n")  # Ctrl-D: the shell's prompt starts on a fresh line
            raise
        if self.PASTE_START in line:  # without readline a paste arrives line by line
            lines = [line]
            with contextlib.suppress(EOFError):
                while self.PASTE_END not in lines[-1]:
                    lines.append(input())
            line = "\n".join(lines)
        return line.replace(self.PASTE_START, "").replace(self.PASTE_END, "")

    def begin_answer(self) -> None:
        if self.interactive:
            write_stdout(f"{self.LABEL}model>{self.RESET} " if self.colour else "model> ")
        if self.colour:
            write_stdout(self.MODEL_TEXT)

    def write(self, text: str) -> None:
        write_stdout(text)

    def end_answer(self, interrupted: bool) -> None:
        # Ends the answer's line; in a pipe that makes one answer per line.
        write_stdout(f"{self.RESET}\n" if self.colour else "\n")
        if interrupted:
            self.message("[stopped]")

    def message(self, text: str) -> None:
        from rich.text import Text

        from fragment_llm.cli.display import err_console

        # soft_wrap: a long line (a path) is never broken by an inserted newline
        (self.console if self.interactive else err_console).print(Text(text), soft_wrap=True)

    def failure(self, exc: Exception) -> None:
        report_internal_error(exc)

    def confirm(self, question: str) -> bool | None:
        """y or n typed on the controlling terminal (/dev/tty), whatever stdin is; None
        without one. Input typed or pasted before the question is discarded first, and
        a pasted answer arrives wrapped in paste markers, so it is never a yes."""
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None
        with os.fdopen(fd, "r+b", buffering=0) as tty:
            with contextlib.suppress(ImportError, OSError):
                import termios

                termios.tcflush(fd, termios.TCIFLUSH)
            tty.write(question.encode("utf-8", "replace"))
            try:
                answer = tty.readline(4096)  # a terminal's whole line (its line buffer)
            except KeyboardInterrupt:
                tty.write(b"\n")
                return False
        return answer.strip().lower() in (b"y", b"yes")


CHAT_HINT = "/help lists the commands; Ctrl-D leaves, Ctrl-C stops an answer"


@click.command(cls=FragmentCommand)
@checkpoint_option
@sampling_options
@click.option("--system", help="System prompt (what the assistant should be).")
@config_option
def chat(checkpoint_path: Path | None, adapter_path: Path | None, system: str | None,
         config_path: Path | None, **flags: FlagValue) -> int:
    """Talk to a trained model: an interactive REPL with streamed answers.

    \b
    Commands: /help /reset /set KEY=VALUE /settings /system TEXT /save FILE /exit.
    Ctrl-C stops an answer; Ctrl-D or /exit leaves; a paste of several lines is one
    message. Everything the model writes is sanitised: no control character or
    terminal escape sequence reaches the screen, and [markup] is shown as typed.
    /save replaces a file only after a yes typed on the terminal. With stdin not a
    terminal, each line is one prompt and each answer is printed plainly, one per
    line, so a chat can be scripted.

    \b
    Examples:
      fragment chat                                      # checkpoints/, latest step
      fragment chat --temperature 0.5 --system "You are terse."
      printf 'hello\\nhow are you?\\n' | fragment chat -q
      fragment chat --adapter checkpoints-chat           # a base + its chat adapter
      fragment chat --checkpoint checkpoints-merged      # a tuned or merged model
    """
    from fragment_llm.cli.display import summary_table
    from fragment_llm.config import ChatConfig, load_stage_config
    from fragment_llm.finetune.artifact import load_tuned
    from fragment_llm.inference.chat import ChatSession, banner_rows, enable_line_editing, run_repl

    settings = load_stage_config(ChatConfig, "chat", config_path, {**flags, "system": system})
    use_threads(settings.threads)
    trained = load_tuned(model_paths(checkpoint_path, adapter_path), adapter_path)
    terminal = ChatTerminal.for_this_process()
    session = ChatSession(trained.model, trained.tokenizer, settings, trained.chat_format,
                          confirm=terminal.confirm)
    adapter = trained.adapter.checkpoint.path if trained.adapter is not None else None
    show(summary_table("fragment chat", banner_rows(trained, trained.chat_format, adapter)))
    # readline only for a terminal: a pipe is read line by line, with no editing
    save_history = (enable_line_editing(settings.history) if terminal.interactive
                    else (lambda: None))
    try:
        with terminal:
            if terminal.interactive and not FLAGS.quiet:
                terminal.message(CHAT_HINT)
            return run_repl(session, terminal)
    finally:
        save_history()
