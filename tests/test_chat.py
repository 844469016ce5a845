"""chat: sanitising in and out, the REPL's commands, context sliding, `fragment chat`
through a pipe and a pseudo-terminal, `fragment generate`, hostile checkpoints."""

from __future__ import annotations

import json
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

from fragment_llm.chat import (
    ChatSession,
    Conversation,
    SpecialTokenTemplate,
    TextStream,
    TranscriptTemplate,
    Turn,
    render,
    run_repl,
)
from fragment_llm.checkpoint import save_checkpoint
from fragment_llm.cli import ChatTerminal, cli
from fragment_llm.config import ChatConfig, ModelConfig, TokenizerConfig
from fragment_llm.evaluate import load_trained
from fragment_llm.model import GPT
from fragment_llm.sanitize import (
    BIDI_CHARS,
    CONTROL_CHARS,
    ZERO_WIDTH_CHARS,
    OutputSanitizer,
    sanitize_output,
    sanitize_prompt,
)
from fragment_llm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = set(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS)
CORPUS = ("User: hello there, how are you?\nAssistant: I am well, thank you kindly.\n"
          "The quick brown fox jumps over the lazy dog. Café, naïve, 日本語, emoji 🙂.\n") * 20
# What the hostile model says, forever: "ok", a CSI clearing the screen, then an 8-bit
# OSC (U+009D is the bytes C2 9D) setting the window title, ended by BEL.
HOSTILE = b"ok\x1b[2J\xc2\x9d0;pwned\x07"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batch-1 steps: a second thread only waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train([CORPUS], TokenizerConfig(vocab_size=300, workers=1)).save(path)
    return path


def save(run: Path, model: GPT, tokenizer_file: Path, **config) -> Path:
    record = {"model": model.config.model_dump(mode="json"), "val_bpb": 2.5, **config}
    return save_checkpoint(run, 7, model=model, optimizer=None, trainer_state={"step": 7},
                           config=record, tokenizer_file=tokenizer_file)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_file) -> Path:
    """A random tiny model: babble, but real babble through the real loader."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=32, block_size=64)
    return save(tmp_path_factory.mktemp("ckpt") / "run", GPT(config), tokenizer_file)


def hostile_model(vocab: int) -> GPT:
    """A bigram machine whose greedy output cycles through HOSTILE's bytes.

    Attention and MLP write nothing (zero output projections), so the final hidden
    state is the current token's embedding: one-hot, hence logits = column `token` of
    lm_head. Column b of a HOSTILE byte points at the byte after it; every other
    token (prompt merges, specials) points at HOSTILE's first byte.
    """
    config = ModelConfig(vocab_size=vocab, n_layer=1, n_head=4, n_embd=320, block_size=64,
                         tie_embeddings=False)
    model = GPT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.zero_()
        model.wte.weight.copy_(torch.eye(vocab, 320))
        head = torch.zeros(vocab, 320)
        head[HOSTILE[0], :vocab] = 1.0
        for here, after in zip(HOSTILE, HOSTILE[1:] + HOSTILE[:1]):
            head[:, here] = 0.0
            head[after, here] = 1.0
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="module")
def hostile_checkpoint(tmp_path_factory, tokenizer_file) -> Path:
    return save(tmp_path_factory.mktemp("hostile") / "run", hostile_model(300), tokenizer_file)


@pytest.fixture(scope="module")
def trained(checkpoint):
    return load_trained(checkpoint)


def session(trained, **settings) -> ChatSession:
    config = ChatConfig(**{"max_new_tokens": 8, "seed": 1, **settings})
    return ChatSession(trained.model, trained.tokenizer, config, trained.checkpoint.config)


def ask(chat: ChatSession, line: str) -> str:
    reply = chat.handle(line)
    return "".join(reply.answer) if reply.answer is not None else reply.message


# ---------------------------------------------------------------- output sanitiser

HOSTILE_OUTPUTS = {
    "csi clear screen": ("a\x1b[2Jb", "ab"),
    "csi colour": ("\x1b[31;1mred\x1b[0m", "red"),
    "osc 8 link": ("\x1b]8;;http://x\x1b\\click\x1b]8;;\x1b\\", "click"),
    "osc 52 clipboard": ("x\x1b]52;c;aGk=\x07y", "xy"),
    "osc title, bel": ("\x1b]0;pwned\x07", ""),
    "dcs": ("\x1bP1$qm\x1b\\z", "z"),
    "apc": ("\x1b_hidden\x1b\\", ""),
    "c1 csi": ("a\x9b2Jb", "ab"),
    "c1 osc": ("\x9d0;title\x9cz", "z"),
    "single esc": ("\x1bcreset\x1b(B", "reset"),
    "carriage return": ("safe\rEVIL", "safeEVIL"),
    "backspace": ("abc\x08\x08d", "abcd"),
    "bell and nul": ("\x07\x00x", "x"),
    "bidi override": ("abc\u202edcba\u2066", "abcdcba"),
    "zero width": ("pay\u200bpal\ufeff", "paypal"),
    "lone surrogates": ("a\ud800b\udfffc", "abc"),
    "del and c1": ("a\x7fb\x85c", "abc"),
    "unterminated osc": ("ok\x1b]52;c;aGk=", "ok"),
    "broken csi": ("\x1b[12é", "[12é"),
    "esc made by removal": ("\x1b\u200b[2J", "[2J"),
    "rich markup is text": ("[link=http://x]a[/link] [/oops] [bold]", None),
    "newline and tab kept": ("a\n\tb", "a\n\tb"),
}


@pytest.mark.parametrize("text, expected", HOSTILE_OUTPUTS.values(), ids=HOSTILE_OUTPUTS)
def test_hostile_output(text, expected):
    clean = sanitize_output(text)
    assert clean == (text if expected is None else expected)
    assert not FORBIDDEN.intersection(clean)
    assert sanitize_output(clean) == clean


@pytest.mark.parametrize("text, expected", HOSTILE_OUTPUTS.values(), ids=HOSTILE_OUTPUTS)
def test_hostile_output_streamed_one_char_at_a_time(text, expected):
    stream = OutputSanitizer()
    shown = "".join(stream.feed(ch) for ch in text) + stream.flush()
    assert shown == sanitize_output(text)


TRICKY = st.text(st.sampled_from(list("ab[];0\\P_^X\x1b\x07\x9b\x9c\x9d\x90\r\n\x08é\u202e"
                                      "\u200b\ud800")) | st.characters(), max_size=80)


@given(TRICKY)
def test_sanitised_output_is_safe_and_idempotent(text):
    clean = sanitize_output(text)
    assert not FORBIDDEN.intersection(clean)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in clean)
    assert sanitize_output(clean) == clean


@given(TRICKY)
def test_sanitised_prompt_is_safe_idempotent_and_nfc(text):
    clean = sanitize_prompt(text)
    assert not FORBIDDEN.intersection(clean) and "\r" not in clean
    assert sanitize_prompt(clean) == clean


@given(TRICKY, st.lists(st.integers(0, 80), max_size=6))
def test_streaming_equals_sanitising_at_once(text, cuts):
    bounds = [0, *sorted(c for c in cuts if c <= len(text)), len(text)]
    stream = OutputSanitizer()
    shown = "".join(stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + stream.flush()
    assert shown == sanitize_output(text)


def test_a_sequence_split_across_chunks_is_removed_whole():
    stream = OutputSanitizer()
    pieces = [stream.feed(p) for p in ("ok\x1b", "]52;c;", "aGk=\x07done", "\x1b[", "2J")]
    assert pieces == ["ok", "", "done", "", ""] and stream.flush() == ""


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40), st.data())
def test_stream_never_emits_a_broken_character_or_an_escape(trained, text, data):
    tok = trained.tokenizer
    raw = tok.encode(text) + list(tok.encode("\x1b[2J\x1b]8;;http://x\x1b\\"))
    stream = TextStream(tok)
    pieces = [stream.feed(t) for t in raw] + [stream.finish()]
    for piece in pieces:
        assert "\ufffd" not in piece or "\ufffd" in text
        assert not FORBIDDEN.intersection(piece)
    assert "".join(pieces) == sanitize_output(tok.decode(raw))


def test_stop_string_split_across_tokens_is_never_shown(trained):
    tok = trained.tokenizer
    stream = TextStream(tok, ["\nUser:"])
    shown = "".join(stream.feed(t) for t in tok.encode("fine.\nUs")) \
        + "".join(stream.feed(t) for t in tok.encode("er: more"))
    assert shown + stream.finish() == "fine." and stream.stopped


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


def test_set_and_settings(trained):
    chat = session(trained)
    assert chat.handle("/set temperature=0 top_k=none seed=3").message
    assert (chat.settings.temperature, chat.settings.top_k, chat.settings.seed) == (0.0, None, 3)
    shown = chat.handle("/settings").message
    assert "temperature = 0.0" in shown and "top_k = None" in shown
    assert "usage" in chat.handle("/set").message


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


def test_save_asks_before_replacing(trained, tmp_path):
    chat = session(trained)
    target = tmp_path / "chat.txt"
    target.write_text("precious")
    assert "exists" in chat.handle(f"/save {target}").message
    assert chat.prompt.startswith("replace")
    assert chat.handle("n").message == "not saved" and target.read_text() == "precious"
    chat.handle(f"/save {target}")
    assert "saved" in chat.handle("y").message and "transcript" in target.read_text()


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
    ids = render(conversation, template, tok, budget=120)
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
    plain = render(conversation, TranscriptTemplate(), tok, budget=64)
    assert [i for i in plain if i in specials] == [tok.eot_id]
    chat = render(conversation, SpecialTokenTemplate(), tok, budget=64)
    markers = [tok.eot_id, tok.special_id("<|user|>"), tok.special_id("<|end|>"),
               tok.special_id("<|assistant|>")]
    assert [i for i in chat if i in specials] == markers


def test_chat_format_comes_from_the_checkpoint(trained):
    chat = ChatSession(trained.model, trained.tokenizer, ChatConfig(),
                       {"chat_format": "special_tokens"})
    assert isinstance(chat.template, SpecialTokenTemplate)
    assert isinstance(session(trained).template, TranscriptTemplate)


def test_history_file_is_private_and_never_a_symlink(tmp_path):
    from fragment_llm.chat import _safe_history_path

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

    def end_answer(self, interrupted: bool) -> None:
        self.shown.append("[stopped]\n" if interrupted else "\n")

    def message(self, text: str) -> None:
        self.shown.append(f"<{text}>")


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
    assert chat.conversation.turns[1].text == io.shown[0].strip()


# ------------------------------------------------------- through a pipe and a pty


def fragment(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1",
           **kwargs.pop("env", {})}
    return subprocess.run([sys.executable, "-m", "fragment_llm", *args], capture_output=True,
                          env=env, cwd=ROOT, timeout=120, **kwargs)


def test_chat_through_a_pipe(hostile_checkpoint, tmp_path):
    lines = b"hello\n\n/set temperature=abc\nhow are you?\n"
    result = fragment("chat", "--checkpoint", str(hostile_checkpoint), "--temperature", "0",
                      "--max-new-tokens", "32", input=lines, env={"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"okok\nokok\n"  # HOSTILE twice per answer, made safe
    assert b"invalid temperature" in result.stderr and b"parameters" in result.stderr
    assert b"Traceback" not in result.stderr and b"pwned" not in result.stderr


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


def test_chat_in_a_pseudo_terminal_never_shows_the_models_escapes(hostile_checkpoint, tmp_path):
    """Keys typed into a real terminal (the chat's controlling tty, so Ctrl-C is a
    signal); the screen must hold none of the model's escape sequences. Colours are
    off, so any ESC at all would be suspect."""
    import pty

    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "HOME": str(tmp_path),
           "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    argv = [sys.executable, "-m", "fragment_llm", "chat", "--checkpoint",
            str(hostile_checkpoint), "--temperature", "0", "--max-new-tokens", "4000"]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: become the chat
        try:
            os.chdir(ROOT)
            # A user's terminal delivers SIGINT; a suite started in the background
            # (`cmd &` without job control) ignores it, and exec would pass that on.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, argv, env)
        finally:
            os._exit(127)
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
    assert b"okokok" in screen and b"[stopped]" in screen
    for leaked in (b"[2J", b"pwned", b"\xc2\x9d", b"\x07", b"\x1b"):
        assert leaked not in screen, (leaked, screen[-300:])
    assert (tmp_path / ".cache" / "fragment-llm" / "chat_history").is_file()


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


# -------------------------------------------------------------- fragment generate


def test_generate_prints_only_the_completion(runner, hostile_checkpoint):
    result = runner.invoke(cli, ["generate", "--checkpoint", str(hostile_checkpoint),
                                 "--prompt", "hi", "--temperature", "0",
                                 "--max-new-tokens", "16"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok\n"


def test_generate_json(runner, checkpoint):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "The quick",
            "--max-new-tokens", "10", "--seed", "4", "--json"]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert set(doc) == {"text", "new_tokens", "prompt_tokens", "tokens_per_s",
                        "time_to_first_token_s"}
    assert 1 <= doc["new_tokens"] <= 10 and doc["prompt_tokens"] >= 2
    assert json.loads(runner.invoke(cli, args).stdout)["text"] == doc["text"]  # same seed


def test_generate_reads_a_file_and_stdin(runner, checkpoint, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick\r\n")
    base = ["generate", "--checkpoint", str(checkpoint), "--max-new-tokens", "3", "--json"]
    assert runner.invoke(cli, [*base, "--prompt-file", str(prompt)]).exit_code == 0
    assert runner.invoke(cli, [*base, "--prompt", "-"], input="The quick").exit_code == 0
    prompt.write_bytes(b"\xff\xfe bad")
    result = runner.invoke(cli, [*base, "--prompt-file", str(prompt)])
    assert result.exit_code == 1 and "UTF-8" in result.stderr


def test_generate_stop_flag_cuts_before_the_stop_text(runner, checkpoint, tmp_path):
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "The quick",
            "--temperature", "0", "--max-new-tokens", "24", "--json"]
    full = json.loads(runner.invoke(cli, base).stdout)["text"]
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full  # the stop text must be visible for the test to mean anything
    cut = runner.invoke(cli, [*base, "--stop", "zzz-never", "--stop", stop])
    assert cut.exit_code == 0, cut.output
    assert json.loads(cut.stdout)["text"] == full[:full.index(stop)]
    config = tmp_path / "stop.toml"
    config.write_text(f"[generate]\nstop = [{json.dumps(stop)}]\n")
    from_file = runner.invoke(cli, [*base, "--config", str(config)])  # no --stop: file wins
    assert json.loads(from_file.stdout)["text"] == full[:full.index(stop)]


@pytest.mark.parametrize("args, code, text", [
    (["--prompt", "x" * 50, "--config", "CONFIG"], 1, "characters"),
    (["--prompt", "\x1b[2J"], 1, "empty"),
    ([], 2, "exactly one"),
    (["--prompt", "a", "--temperature", "nan"], 1, "temperature"),
    (["--prompt", "a", "--top-p", "0"], 1, "top_p"),
    (["--prompt", "a", "--top-k", "0"], 1, "top_k"),
    (["--prompt", "a", "--max-new-tokens", "0"], 1, "max_new_tokens"),
])
def test_generate_refusals(runner, checkpoint, tmp_path, args, code, text):
    config = tmp_path / "gen.toml"
    config.write_text("[generate]\nmax_prompt_chars = 10\n")
    args = [str(config) if a == "CONFIG" else a for a in args]
    result = runner.invoke(cli, ["generate", "--checkpoint", str(checkpoint), *args])
    assert result.exit_code == code and text in result.output
    assert result.stdout == "" and "Traceback" not in result.output


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
