"""chat: the REPL's commands, context sliding, `fragment chat` through a pipe and a
pseudo-terminal, hostile checkpoints. (Sanitising: tests/safety/test_text.py; streamed
text and `fragment generate`: tests/inference/test_text.py.)"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fragment_llm.cli.app import cli
from fragment_llm.cli.chat import ChatTerminal
from fragment_llm.config import ChatConfig, ModelConfig
from fragment_llm.errors import TokenizerError
from fragment_llm.inference.chat import ChatSession, run_repl
from fragment_llm.model.gpt import GPT
from fragment_llm.safety.text import (
    BIDI_CHARS,
    CONTROL_CHARS,
    ZERO_WIDTH_CHARS,
    sanitize_prompt,
)
from fragment_llm.tokenizer.chat_template import (
    Conversation,
    SpecialTokenTemplate,
    TranscriptTemplate,
    Turn,
    render,
    render_prompt,
    template_for,
)
from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.helpers import REPO

FORBIDDEN = set(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def session(trained, **settings) -> ChatSession:
    config = ChatConfig(**{"max_new_tokens": 8, "seed": 1, **settings})
    return ChatSession(trained.model, trained.tokenizer, config,
                       trained.checkpoint.config.chat_format)


def ask(chat: ChatSession, line: str) -> str:
    reply = chat.handle(line)
    return "".join(reply.answer) if reply.answer is not None else reply.message


# -------------------------------------------------------------------- the terminal


def test_markup_in_model_text_is_printed_literally(capsys):
    terminal = ChatTerminal(interactive=False)
    terminal.write("[link=http://x]a[/link] [/oops] [bold red]x")
    terminal.end_answer(interrupted=False)
    assert capsys.readouterr().out == "[link=http://x]a[/link] [/oops] [bold red]x\n"


# ------------------------------------------------------------------------ the REPL


def test_help_exit_and_unknown_commands(trained):
    chat = session(trained)
    assert "/save" in chat.handle("/help").message
    assert chat.handle("/exit").exit and chat.handle("/quit").exit
    assert "unknown command" in chat.handle("/frobnicate\x1b[2J").message
    assert "\x1b" not in chat.handle("/frobnicate\x1b[2J").message


def test_empty_prompt_is_ignored(trained):
    chat = session(trained)
    for line in ("", "   ", "\x1b[2J", "\u200b"):
        reply = chat.handle(line)
        assert reply.answer is None and reply.message == ""
    assert chat.conversation.turns == []


def test_answers_are_recorded_and_reset_forgets_them(trained):
    chat = session(trained, system="Be brief.")
    answer = ask(chat, "hello")
    assert [t.role for t in chat.conversation.turns] == ["user", "assistant"]
    assert chat.conversation.turns[1].text == answer.strip()
    assert "cleared" in chat.handle("/reset").message
    assert chat.conversation.turns == [] and chat.conversation.system == "Be brief."


def test_same_seed_same_answer(trained):
    assert ask(session(trained), "hello") == ask(session(trained), "hello")


@pytest.mark.parametrize("assignment", ["temperature=-1", "temperature=nan", "temperature=inf",
                                        "top_p=0", "top_p=1.5", "top_k=0", "max_new_tokens=0",
                                        "max_new_tokens=99999", "repetition_penalty=0",
                                        "temperature=abc", "colour=red", "temperature",
                                        "max_prompt_chars=1", "top_k=2 top_p=0"])
def test_set_refuses_invalid_values_and_changes_nothing(trained, assignment):
    chat = session(trained)
    before = chat.settings
    message = chat.handle(f"/set {assignment}").message
    assert message and chat.settings == before
    assert ask(chat, "still here?") is not None  # the REPL carries on


@pytest.mark.parametrize("assignment", [
    "temperature=1e-50", "temperature=5e-324", "temperature=100 top_k=none",
    "top_p=5e-324", "top_p=1e-50 top_k=none", "repetition_penalty=10 temperature=1e-300",
    "max_time_s=5e-324", "seed=9223372036854775807"])
def test_set_accepts_extremes_that_then_work(trained, assignment):
    """Every value /set accepts must work: `temperature=1e-50` used to be accepted and
    then end the chat at the next message (softmax of an overflowed logit)."""
    chat = session(trained)
    assert "invalid" not in chat.handle(f"/set {assignment}").message
    answer = chat.handle("hello")
    assert answer.answer is not None and isinstance("".join(answer.answer), str)
    assert [t.role for t in chat.conversation.turns] == ["user", "assistant"]


def test_set_and_settings(trained):
    chat = session(trained)
    assert chat.handle("/set temperature=0 top_k=none seed=3").message
    assert (chat.settings.temperature, chat.settings.top_k, chat.settings.seed) == (0.0, None, 3)
    shown = chat.handle("/settings").message
    assert "temperature = 0.0 (greedy" in shown and "top_k = none (all tokens)" in shown
    assert "usage" in chat.handle("/set").message


def test_settings_are_shown_in_words(trained):
    """Not `None` or a class name: what each value means."""
    chat = session(trained, seed=None, top_p=1.0)
    shown = chat.handle("/settings").message
    for words in ("seed = none (different text each time)", "top_p = 1.0 (off)",
                  "repetition_penalty = 1.0 (off)", "max_time_s = 120.0 s",
                  "system prompt = none", "format = plain transcript (base model)",
                  "context window = 64 tokens"):
        assert words in shown, shown
    assert "None" not in shown and "Template" not in shown
    assert chat.handle("/set seed=none").message == "seed = none (different text each time)"


def test_system_command(trained):
    chat = session(trained)
    assert "set" in chat.handle("/system You are a \x1b[31mpirate\u202e.").message
    assert chat.conversation.system == "You are a pirate."
    assert "removed" in chat.handle("/system").message and chat.conversation.system is None


def test_over_long_prompt_gets_a_message_and_the_repl_carries_on(trained):
    chat = session(trained, max_prompt_chars=20)
    assert "characters" in chat.handle("x" * 21).message
    chat = session(trained, max_prompt_tokens=5)
    assert "tokens" in chat.handle("many words in this prompt here").message
    assert chat.conversation.turns == [] and ask(chat, "hi") is not None


def test_message_too_long_for_the_context_window(trained):
    chat = session(trained, max_new_tokens=8)
    message = chat.handle("word " * 100).message  # 64-token window
    assert "context" in message and chat.conversation.turns == []


# ---------------------------------------------------------------------------- /save


def test_save_writes_the_transcript(trained, tmp_path):
    chat = session(trained, system="sys")
    ask(chat, "hello")
    target = tmp_path / "chat.txt"
    assert "saved" in chat.handle(f"/save {target}").message
    text = target.read_text()
    assert text.startswith("# fragment chat transcript") and "user: hello" in text
    assert "system: sys" in text and not list(tmp_path.glob(".*fragment-tmp*"))


def test_save_asks_the_terminal_before_replacing(trained, tmp_path):
    questions, answers = [], [False, True]

    def confirm(question: str) -> bool:
        questions.append(question)
        return answers.pop(0)

    chat = session(trained)
    chat.confirm = confirm
    target = tmp_path / "chat.txt"
    target.write_text("precious")
    assert chat.handle(f"/save {target}").message == "not saved"
    assert target.read_text() == "precious" and "exists; replace it?" in questions[0]
    assert chat.handle(f"/save {target}").message == f"saved 0 turns to {target}"
    assert "transcript" in target.read_text()


def test_save_never_replaces_a_file_without_a_terminal(trained, tmp_path):
    """No terminal to ask (the default `confirm`): an existing file, or a new hidden
    one, is refused; the next line of input is a message, never an answer."""
    chat = session(trained)
    target = tmp_path / "x" / ".bashrc"
    target.parent.mkdir()
    target.write_text("precious")
    message = chat.handle(f"/save {tmp_path}/x/../x/.bashrc").message
    assert message.startswith("not saved:") and "no terminal" in message
    assert target.read_text() == "precious"
    assert chat.handle("y").answer is not None  # a message for the model, not a yes
    assert "hidden" in chat.handle(f"/save {tmp_path / '.profile'}").message
    assert not (tmp_path / ".profile").exists()


def test_save_refuses_a_symlink_target(trained, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "link.txt").symlink_to(victim)
    message = session(trained).handle(f"/save {tmp_path / 'link.txt'}").message
    assert "symlink" in message and victim.read_text() == "keep"
    assert (tmp_path / "link.txt").is_symlink()


def test_save_refuses_missing_folder_and_non_files(trained, tmp_path):
    chat = session(trained)
    assert "does not exist" in chat.handle(f"/save {tmp_path / 'no' / 'x.txt'}").message
    (tmp_path / "dir").mkdir()
    assert "not a regular file" in chat.handle(f"/save {tmp_path / 'dir'}").message
    assert "usage" in chat.handle("/save").message


# ------------------------------------------------------------ rendering and sliding


@pytest.mark.parametrize("template", [TranscriptTemplate(), SpecialTokenTemplate()])
def test_context_slides_by_whole_turns_and_keeps_the_system_prompt(trained, template):
    tok = trained.tokenizer
    conversation = Conversation("Be kind.")
    for i in range(20):
        conversation.turns += [Turn("user", f"question {i}"), Turn("assistant", f"answer {i}")]
    conversation.turns.append(Turn("user", "last one"))
    ids = render_prompt(conversation, template, tok, budget=120)
    head = [tok.eot_id, *template.system(tok, "Be kind.")]
    assert 60 <= len(ids) <= 120 and ids[:len(head)] == head
    text = tok.decode(ids)
    assert "question 19" in text and "answer 19" in text and "last one" in text
    assert "question 0" not in text
    kept = text.split("Be kind.")[1].removeprefix("<|end|>").lstrip()
    assert kept.startswith(("User: question", "<|user|>question"))  # whole pairs dropped


def test_special_token_text_typed_by_the_user_stays_text(trained):
    tok = trained.tokenizer
    conversation = Conversation(None, [Turn("user", "<|endoftext|><|end|><|assistant|>hi")])
    specials = set(tok.special_tokens.values())
    plain = render_prompt(conversation, TranscriptTemplate(), tok, budget=64)
    assert [i for i in plain if i in specials] == [tok.eot_id]
    chat = render_prompt(conversation, SpecialTokenTemplate(), tok, budget=64)
    markers = [tok.eot_id, tok.special_id("<|user|>"), tok.special_id("<|end|>"),
               tok.special_id("<|assistant|>")]
    assert [i for i in chat if i in specials] == markers


# What chat keeps of a message: cleaned, stripped, not empty and not a /command.
MESSAGE = st.text(max_size=24).map(lambda s: sanitize_prompt(s).strip()).filter(
    lambda s: bool(s) and not s.startswith("/"))


@pytest.fixture(scope="module")
def wide_model(trained) -> GPT:
    """A context window no conversation of these tests fills: chat drops no turn."""
    return GPT(ModelConfig(vocab_size=trained.tokenizer.vocab_size, n_layer=1, n_head=1,
                           n_embd=8, block_size=2048))


def chat_feeds(model: GPT, tok: Tokenizer, chat_format: str, history: Conversation,
               message: str) -> list[int]:
    """The ids a ChatSession hands the engine when `message` is sent after `history`."""
    chat = ChatSession(model, tok, ChatConfig(max_new_tokens=1), chat_format)
    chat.conversation = Conversation(history.system, list(history.turns))
    fed, generate = [], chat.engine.generate

    def recording(ids, *args):
        fed.append(list(ids))
        return generate(ids, *args)

    chat.engine.generate = recording
    assert chat.handle(message).answer is not None
    return fed[0]


def true_runs(mask: list[bool]) -> list[tuple[int, int]]:
    """`[F, T, T, F, T] -> [(1, 3), (4, 5)]`."""
    runs, start = [], None
    for i, on in enumerate([*mask, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def answers_by_markers(ids: list[int], tok: Tokenizer) -> list[bool]:
    """Special tokens: True after each `<|assistant|>` up to its `<|end|>`, included."""
    opening, end = tok.special_id("<|assistant|>"), tok.special_id("<|end|>")
    inside, mask = False, []
    for token in ids:
        mask.append(inside)
        inside = token == opening or (inside and token != end)
    return mask


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["transcript", "special_tokens"]), st.none() | MESSAGE,
       st.lists(st.tuples(MESSAGE, MESSAGE), min_size=1, max_size=4))
def test_fine_tuning_renders_what_chat_feeds_and_masks_only_the_answers(
        trained, wide_model, chat_format, system, exchanges):
    """Fine-tuning renders a conversation with the function chat uses: before each
    answer the ids are exactly what chat would have fed the model, and the loss mask
    covers exactly each answer and what closes it (`<|end|>`, or the newline)."""
    tok = trained.tokenizer
    turns = [Turn(role, text) for pair in exchanges
             for role, text in zip(("user", "assistant"), pair)]
    rendered = render(Conversation(system, turns), template_for(chat_format), tok)
    answers = true_runs(rendered.mask)
    assert len(rendered.mask) == len(rendered.ids) and len(answers) == len(exchanges)
    special = chat_format == "special_tokens"
    for k, ((start, end), (question, answer)) in enumerate(zip(answers, exchanges)):
        history = Conversation(system, turns[:2 * k])
        assert chat_feeds(wide_model, tok, chat_format, history, question) == rendered.ids[:start]
        shown = f"{answer}<|end|>" if special else f" {answer}\n"
        assert tok.decode(rendered.ids[start:end]) == shown
    if special:
        assert rendered.mask == answers_by_markers(rendered.ids, tok)
    else:
        head = f"{system}\n\n" if system else ""
        lines = "".join(f"User: {q}\nAssistant: {a}\n" for q, a in exchanges)
        assert tok.decode(rendered.ids) == f"<|endoftext|>{head}{lines}"


def test_chat_format_comes_from_the_checkpoint(trained):
    chat = ChatSession(trained.model, trained.tokenizer, ChatConfig(), "special_tokens")
    assert isinstance(chat.template, SpecialTokenTemplate)
    assert isinstance(session(trained).template, TranscriptTemplate)


def test_history_file_is_private_and_never_a_symlink(tmp_path):
    from fragment_llm.inference.chat import _safe_history_path

    path = tmp_path / "cache" / "fragment-llm" / "chat_history"
    assert _safe_history_path(path) and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path.symlink_to(victim)
    assert not _safe_history_path(path)
    path.unlink()
    path.parent.rmdir()
    path.parent.symlink_to(tmp_path)
    assert not _safe_history_path(path)


# ----------------------------------------------------------------- the REPL loop


class ScriptedIO:
    """Lines in, everything shown recorded; Ctrl-C simulated on the n-th written piece."""

    def __init__(self, lines, interrupt_after: int | None = None) -> None:
        self.lines, self.shown, self.interrupt_after = list(lines), [], interrupt_after
        self.written = 0

    def read(self, prompt: str) -> str:
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    def write(self, text: str) -> None:
        self.written += 1
        if self.written == self.interrupt_after:
            raise KeyboardInterrupt
        self.shown.append(text)

    def begin_answer(self) -> None:
        self.shown.append("model> ")

    def end_answer(self, interrupted: bool) -> None:
        self.shown.append("[stopped]\n" if interrupted else "\n")

    def message(self, text: str) -> None:
        self.shown.append(f"<{text}>")

    def failure(self, exc: Exception) -> None:
        self.shown.append(f"<internal error: {type(exc).__name__}: {exc}>")


def test_repl_runs_until_end_of_input(trained):
    chat = session(trained)
    io = ScriptedIO(["hello", KeyboardInterrupt, "/reset", "again"])
    assert run_repl(chat, io) == 0
    assert "<conversation cleared>" in io.shown and len(chat.conversation.turns) == 2


def test_repl_exit_command(trained):
    io = ScriptedIO(["/exit", "never read"])
    assert run_repl(session(trained), io) == 0 and io.lines == ["never read"]


def test_ctrl_c_stops_the_answer_and_keeps_what_was_shown(trained):
    chat = session(trained, max_new_tokens=60, temperature=1.0)
    io = ScriptedIO(["hello", "/settings"], interrupt_after=2)
    assert run_repl(chat, io) == 0
    assert "[stopped]\n" in io.shown and any("temperature" in s for s in io.shown)
    assert [t.role for t in chat.conversation.turns] == ["user", "assistant"]
    assert chat.conversation.turns[1].text == io.shown[1].strip()


def test_one_bad_message_never_ends_the_chat(trained, monkeypatch):
    """A tokenizer that gives up on one message (the pre-split's time guard on a custom
    pattern), a model whose output turns non-finite mid-answer, and a bug in the engine:
    each is one line, the conversation so far is kept, and the next message works."""
    chat = session(trained)
    encode = chat.tokenizer.encode

    def fussy_encode(text: str) -> list[int]:
        if "catastrophic" in text:
            raise TokenizerError("the custom split pattern timed out on a 12-character text")
        return encode(text)

    monkeypatch.setattr(chat.tokenizer, "encode", fussy_encode)
    decode, generate = chat.engine.decode, chat.engine.generate

    def last_message() -> str:
        return chat.conversation.turns[-1].text

    def nan_decode(token: int) -> torch.Tensor:
        return decode(token) * (float("nan") if last_message() == "nan please" else 1.0)

    def buggy_generate(*args, **kwargs):
        if last_message() == "boom":
            raise RuntimeError("a bug")
        return generate(*args, **kwargs)

    monkeypatch.setattr(chat.engine, "decode", nan_decode)
    monkeypatch.setattr(chat.engine, "generate", buggy_generate)
    io = ScriptedIO(["hello", "catastrophic", "nan please", "boom", "still here?"])
    assert run_repl(chat, io) == 0
    shown = "".join(io.shown)
    assert "<the custom split pattern timed out on a 12-character text>" in shown
    assert "<the model's output is not finite (NaN or infinity)" in shown
    assert "<internal error: RuntimeError: a bug>" in shown
    roles = [t.role for t in chat.conversation.turns]
    assert roles == ["user", "assistant"] * 3  # hello, nan please (cut short), still here?
    assert chat.conversation.turns[-2].text == "still here?"


# ------------------------------------------------------- through a pipe and a pty


def fragment(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`fragment ARGS` in a subprocess; an `env` value of None removes that variable."""
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1",
           **kwargs.pop("env", {})}
    env = {key: value for key, value in env.items() if value is not None}
    return subprocess.run([sys.executable, "-m", "fragment_llm", *args], capture_output=True,
                          env=env, cwd=REPO, timeout=120, **kwargs)


def test_chat_through_a_pipe(hostile_checkpoint, tmp_path):
    """stdout a pipe, with a colour terminal type and no NO_COLOR: each answer plain (no
    label, no colour, no paste mode) and ending its line, so answers never run together."""
    lines = b"hello\n\n/set temperature=abc\nhow are you?\n"
    result = fragment("chat", "--checkpoint", str(hostile_checkpoint), "--temperature", "0",
                      "--max-new-tokens", "32", input=lines,
                      env={"HOME": str(tmp_path), "TERM": "xterm-256color", "NO_COLOR": None})
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"okok\nokok\n"  # HOSTILE twice per answer, made safe
    assert b"invalid temperature" in result.stderr and b"parameters" in result.stderr
    assert b"Traceback" not in result.stderr and b"pwned" not in result.stderr


def test_piped_save_never_replaces_a_file(hostile_checkpoint, tmp_path):
    """`/save <existing file>` then `y` from the same pipe: the file is kept (the `y`
    is only a message), as are a FIFO and a new hidden file; a new visible file is
    written, and the reply says where. No controlling terminal (a new session)."""
    victim = tmp_path / "x" / ".bashrc"
    victim.parent.mkdir()
    victim.write_text("precious")
    os.mkfifo(tmp_path / "fifo")
    lines = (f"hello\n/save {tmp_path}/x/../x/.bashrc\ny\n/save {tmp_path}/fifo\n"
             f"/save {tmp_path}/.profile\n/save {tmp_path}/x/../talk.txt\n").encode()
    result = fragment("chat", "--checkpoint", str(hostile_checkpoint), "--temperature", "0",
                      "--max-new-tokens", "32", input=lines, env={"HOME": str(tmp_path)},
                      start_new_session=True)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "precious" and result.stdout == b"okok\nokok\n"
    assert b"exists, and there is no terminal to confirm on" in result.stderr
    assert b"not a regular file" in result.stderr and not (tmp_path / ".profile").exists()
    assert f"saved 4 turns to {(tmp_path / 'talk.txt').resolve()}\n".encode() in result.stderr
    assert "user: y" in (tmp_path / "talk.txt").read_text()


def test_a_file_name_with_a_nul_byte_does_not_end_the_chat(hostile_checkpoint, tmp_path):
    lines = b"/save bad\x00name.txt\n/save ~nosuchuser/x\n/save " + b"n" * 5000 + b"\nhello\n"
    result = fragment("chat", "--checkpoint", str(hostile_checkpoint), "--temperature", "0",
                      "--max-new-tokens", "32", input=lines, env={"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert b"cannot contain a NUL byte" in result.stderr and result.stdout == b"okok\n"
    assert result.stderr.count(b"cannot save to") == 2
    assert b"file name too long" in result.stderr.lower()
    assert b"Traceback" not in result.stderr and b"internal error" not in result.stderr


def read_until(fd: int, needle: bytes, timeout: float = 60.0) -> bytes:
    screen, deadline = b"", time.monotonic() + timeout
    while needle not in screen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
    return screen


def chat_in_a_pty(checkpoint: Path, home: Path, *args: str, **env: str) -> tuple[int, int]:
    """`fragment chat` in a new pseudo-terminal, as its controlling tty (so Ctrl-C is a
    signal and /dev/tty is this terminal): (pid, the terminal's fd)."""
    import pty

    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "HOME": str(home),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200", **env}
    env = {key: value for key, value in env.items() if value is not None}
    argv = [sys.executable, "-m", "fragment_llm", "chat", "--checkpoint", str(checkpoint),
            "--temperature", "0", *args]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: become the chat
        try:
            os.chdir(REPO)
            # A user's terminal delivers SIGINT; a suite started in the background
            # (`cmd &` without job control) ignores it, and exec would pass that on.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
    return pid, terminal


def test_chat_in_a_pseudo_terminal_never_shows_the_models_escapes(hostile_checkpoint, tmp_path):
    """Keys typed into a real terminal; the screen must hold none of the model's escape
    sequences. Colours are off and TERM=dumb, so any ESC at all would be suspect."""
    pid, terminal = chat_in_a_pty(hostile_checkpoint, tmp_path, "--max-new-tokens", "4000")
    try:
        screen = read_until(terminal, b"you> ")
        for _ in range(5):  # a busy machine may finish the answer before Ctrl-C lands
            os.write(terminal, b"hello\r")
            screen += read_until(terminal, b"okokok")
            os.write(terminal, b"\x03")  # Ctrl-C: stops this answer, not the chat
            answer = read_until(terminal, b"you> ")
            screen += answer
            if b"[stopped]" in answer:
                break
        os.write(terminal, b"\x04")  # Ctrl-D at the prompt: leave, exit code 0
        screen += read_until(terminal, b"\xff", timeout=20)
        assert exit_code(pid, timeout=30) == 0
    finally:
        os.close(terminal)
    assert b"model> okokok" in screen and b"[stopped]" in screen
    for leaked in (b"[2J", b"pwned", b"\xc2\x9d", b"\x07", b"\x1b"):
        assert leaked not in screen, (leaked, screen[-300:])
    assert (tmp_path / ".cache" / "fragment-llm" / "chat_history").is_file()


# Every escape sequence the chat itself may send to a terminal: rich's bold banner, the
# model's label and colour, bracketed paste on and off. Anything else is a leak.
OURS = (b"\x1b[1m", b"\x1b[0m", b"\x1b[1;36m", b"\x1b[36m", b"\x1b[?2004h", b"\x1b[?2004l")
COLOUR = b"\x1b[36m"


@pytest.mark.parametrize("no_colour", [None, "1"], ids=["colour", "NO_COLOR"])
def test_chat_looks_like_a_chat_in_a_terminal(hostile_checkpoint, tmp_path, no_colour):
    """A real terminal (TERM=xterm-256color): turns labelled `you>` and `model>`, the
    model's text coloured unless NO_COLOR is set, a bracketed paste of several lines
    sent as one message, a replacement confirmed on the terminal itself, and Ctrl-D
    leaving the cursor on a fresh line with paste mode switched off again."""
    transcript = tmp_path / "chat.txt"
    transcript.write_text("old")
    pid, terminal = chat_in_a_pty(hostile_checkpoint, tmp_path, "--max-new-tokens", "24",
                                  TERM="xterm-256color", NO_COLOR=no_colour)
    try:
        screen = read_until(terminal, b"you> ")
        os.write(terminal, b"\x1b[200~one\ntwo\x1b[201~")
        os.write(terminal, b"\r")
        screen += read_until(terminal, b"you> ")
        os.write(terminal, f"/save {transcript}\r".encode())
        screen += read_until(terminal, b"[y/N] ")
        os.write(terminal, b"y\r")
        screen += read_until(terminal, b"you> ")
        os.write(terminal, b"\x04")
        screen += read_until(terminal, b"\xff", timeout=20)
        assert exit_code(pid, timeout=30) == 0
    finally:
        os.close(terminal)
    assert screen.count(b"model>") == 1, screen[-600:]  # the paste: one message, one answer
    assert (COLOUR + b"okok") in screen if no_colour is None else COLOUR not in screen
    assert b"replace it? [y/N] y" in screen and f"saved 2 turns to {transcript}".encode() in screen
    assert "user: one\ntwo\n" in transcript.read_text()
    assert screen.index(b"\x1b[?2004h") < screen.index(b"you> ")
    assert screen.endswith(b"you> \r\n\x1b[?2004l"), screen[-40:]  # Ctrl-D: a fresh line
    rest = screen
    for sequence in OURS:
        rest = rest.replace(sequence, b"")
    assert b"\x1b" not in rest and b"pwned" not in rest and b"[2J" not in rest


def exit_code(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


# -------------------------------------------------------------- hostile checkpoints


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


DAMAGE = ["flip a weight byte", "remove the tokenizer", "symlinked folder", "missing folder"]


def damaged(checkpoint: Path, tmp_path: Path, damage: str) -> Path:
    target = copy_of(checkpoint, tmp_path)
    if damage == "flip a weight byte":
        data = bytearray((target / "model.safetensors").read_bytes())
        data[-3] ^= 0x01
        (target / "model.safetensors").write_bytes(bytes(data))
    elif damage == "remove the tokenizer":
        (target / "tokenizer.json").unlink()
    elif damage == "symlinked folder":
        (tmp_path / "link").symlink_to(target)
        return tmp_path / "link"
    elif damage == "missing folder":
        return tmp_path / "nowhere"
    return target


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("verb", ["chat", "generate"])
def test_hostile_checkpoint_refused_with_one_line(runner, checkpoint, tmp_path, damage, verb):
    target = damaged(checkpoint, tmp_path, damage)
    prompt = ["--prompt", "hi"] if verb == "generate" else []
    result = runner.invoke(cli, [verb, "--checkpoint", str(target), *prompt], input="hello\n")
    assert result.exit_code == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error:") and len(lines) <= 2  # the error, maybe a hint
    assert "Traceback" not in result.stderr


def test_hostile_checkpoint_refused_end_to_end(checkpoint, tmp_path):
    result = fragment("chat", "--checkpoint", str(damaged(checkpoint, tmp_path, DAMAGE[0])),
                      input=b"hello\n")
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr.startswith(b"error: sha256 mismatch for model.safetensors")


def test_a_save_into_a_folder_whose_name_is_too_long_does_not_end_the_chat(hostile_checkpoint,
                                                                           tmp_path):
    """`path.parent.is_dir()` raised a bare OSError (errno 36) for a folder name past the
    file system's limit: an "internal error" with a saved traceback, not one line."""
    lines = f"/save {tmp_path}/{'a' * 300}/x.txt\nhello\n".encode()
    result = fragment("chat", "--checkpoint", str(hostile_checkpoint), "--temperature", "0",
                      "--max-new-tokens", "32", input=lines, env={"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert b"cannot write" in result.stderr and b"file name too long" in result.stderr
    assert b"internal error" not in result.stderr and result.stdout == b"okok\n"


def test_piped_prompts_that_are_not_utf8_are_answered(hostile_checkpoint, tmp_path):
    """A Latin-1 prompt file piped in: its bad bytes become U+FFFD, as in any prompt."""
    result = fragment("chat", "--checkpoint", str(hostile_checkpoint), "--temperature", "0",
                      "--max-new-tokens", "32", input=b"caf\xe9 au lait\nhello\n",
                      env={"HOME": str(tmp_path), "LC_ALL": "C.UTF-8",
                           "PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"okok\nokok\n" and b"internal error" not in result.stderr


def test_a_reader_that_leaves_ends_the_chat_quietly(hostile_checkpoint, tmp_path):
    """`fragment chat < prompts | head -c 1`: once the reader is gone, the chat stops
    (exit 1, quietly, as click ends any command on EPIPE) instead of answering every
    remaining line into a closed pipe, each one an "internal error" with a traceback."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n" * 50)
    script = (f'"{sys.executable}" -m fragment_llm chat --checkpoint "{hostile_checkpoint}" '
              f'--temperature 0 --max-new-tokens 32 < "{prompts}" 2>"{tmp_path}/err" | '
              f'head -c 1 >/dev/null; echo "${{PIPESTATUS[0]}}"')
    done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    stderr = (tmp_path / "err").read_bytes()
    assert done.stdout.strip() == b"1", stderr
    assert b"internal error" not in stderr and b"Traceback" not in stderr
