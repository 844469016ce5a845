"""`fragment chat --adapter DIR` in a real pseudo-terminal: the banner names the adapter
and the special-token format, each question gets its answer on a `model>` line and the
prompt comes back, and Ctrl-D leaves with exit code 0. (The pty chat of a base model:
tests/inference/test_chat.py.)

The adapter is an untrained LoRA on a scripted base (tests/helpers.py) that answers
`<|assistant|>` with "ok" then `<|end|>`, and continues anything else with "x": "ok" on
the screen means the question went in as a user's turn and the answer stopped at its
end token.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.helpers import REPO, save_scripted, save_untrained_adapter, scripted_answer


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, chat_tokenizer) -> Path:
    """An adapter step folder whose base + adapter answers "ok". Read only."""
    root = tmp_path_factory.mktemp("scripted-chat")
    model = scripted_answer(Tokenizer.load(chat_tokenizer), "ok")
    return save_untrained_adapter(root / "adapter", save_scripted(root / "base", model,
                                                                  chat_tokenizer))


def chat_in_a_pty(adapter: Path, home: Path) -> tuple[int, int]:
    """`fragment chat --adapter ADAPTER` in a new pseudo-terminal, as its controlling tty:
    (pid, the terminal's fd)."""
    import pty

    # A terminal type that is not "dumb": rich would draw a dumb terminal 80 columns
    # wide, whatever COLUMNS says, and cut the banner's paths.
    env = {**os.environ, "NO_COLOR": "1", "TERM": "xterm-256color", "HOME": str(home),
           "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    argv = [sys.executable, "-m", "fragment_llm", "chat", "--adapter", str(adapter),
            "--temperature", "0", "--max-new-tokens", "16"]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: become the chat
        try:
            os.chdir(REPO)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
    return pid, terminal


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


def exit_code(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_chat_with_an_adapter_in_a_terminal(adapter, tmp_path):
    pid, terminal = chat_in_a_pty(adapter, tmp_path)
    try:
        banner = read_until(terminal, b"you> ")
        answers = []
        for question in (b"Who are you?", b"<|end|> and again"):
            os.write(terminal, question + b"\r")
            answers.append(read_until(terminal, b"you> "))
        os.write(terminal, b"\x04")  # Ctrl-D at the prompt: leave
        read_until(terminal, b"\xff", timeout=20)
        assert exit_code(pid, timeout=30) == 0
    finally:
        os.close(terminal)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", banner.decode("utf-8", "replace"))  # bold
    assert re.search(r"adapter\W+" + re.escape(str(adapter)), text), text
    assert re.search(r"format\W+chat special tokens", text), text
    for question, answer in zip((b"Who are you?", b"<|end|> and again"), answers):
        assert answer.startswith(question)  # the terminal echoes what was typed
        assert b"\nmodel> ok\r\n" in answer, answer
        assert answer.endswith(b"you> ")
