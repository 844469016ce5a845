"""`fragment serve` through the command line: the dry run, the refusals (each one line,
each before torch or the checkpoint is touched), and a real server in its own process
that answers the official `openai` client and stops cleanly on Ctrl-C or SIGTERM.

(The `--help` examples run in tests/cli/test_pipeline.py, with `--dry-run` added.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from fragment_llm.cli.app import cli
from fragment_llm.cli.serve import serve
from tests.helpers import REPO
from tests.serve.conftest import API_KEY, CHAT_ANSWER, chat_checkpoint  # noqa: F401 (fixture)

openai = pytest.importorskip("openai")

NOWHERE = "/nonexistent/checkpoints"  # a refusal must come before this is looked at
NO_KEY = {"FRAGMENT_API_KEY": None}  # CliRunner: unset, whatever the caller's shell has


def invoke(runner, *args: str, env: dict[str, str | None] = NO_KEY):
    return runner.invoke(cli, ["serve", *args], prog_name="fragment", env=env)


def assert_refused(result, *words: str) -> None:
    """Exit 1, one `error:` line (its `hint:` aside) saying `words`, no traceback."""
    lines = result.output.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 1, result.output
    assert len(errors) == 1 and all(word in errors[0] for word in words), result.output
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), result.output
    assert "Traceback" not in result.output


def test_dry_run_prints_what_it_would_serve_and_exits_0(runner, chat_checkpoint):  # noqa: F811
    result = invoke(runner, "--checkpoint", str(chat_checkpoint), "--port", "0", "--slots", "1",
                    "--max-tokens", "32", "--dry-run")
    assert result.exit_code == 0, result.output
    banner = " ".join(result.output.split())
    assert "chat (step 1)" in banner and "none (loopback only)" in banner
    assert re.search(r"API base URL │ http://127\.0\.0\.1:\d+/v1", banner), banner
    assert "1 / 8" in banner and "32 / 60 s" in banner and "dry run: nothing served" in banner


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "example.com"])
def test_a_host_other_machines_reach_needs_a_key(runner, host):
    result = invoke(runner, "--checkpoint", NOWHERE, "--host", host)
    assert_refused(result, f"--host {host} is reachable from other machines",
                   "no API key is set")


@pytest.mark.parametrize("args", [["--api-key", API_KEY], [f"--api-key={API_KEY}"],
                                  ["--key", API_KEY]])
def test_there_is_no_option_that_takes_the_key_itself(runner, args):
    """A key on the command line is in `ps` for every user: only a file or $FRAGMENT_API_KEY."""
    result = invoke(runner, "--checkpoint", NOWHERE, *args)
    assert result.exit_code == 2 and "No such option" in result.output
    assert API_KEY not in result.output
    names = {name for param in serve.params for name in param.opts}
    assert {name for name in names if "key" in name} == {"--api-key-file"}


def fifo(folder: Path) -> Path:
    path = folder / "key.fifo"
    os.mkfifo(path)
    return path


def symlink_to_a_good_key(folder: Path) -> Path:
    (folder / "real.txt").write_text(API_KEY + "\n")
    (folder / "key.txt").symlink_to(folder / "real.txt")
    return folder / "key.txt"


def written(text: str):
    def make(folder: Path) -> Path:
        (folder / "key.txt").write_text(text)
        return folder / "key.txt"
    return make


@pytest.mark.parametrize("make_key_file, words", [
    (written("short-key\n"), ["is 9 characters", "at least 16"]),
    (written(""), ["is 0 characters"]),
    (written("has spaces in the key\n"), ["spaces, control or non-ASCII"]),
    (written("k" * 5000), ["file too large", "the limit is 4096"]),
    (lambda folder: folder / "missing.txt", ["file not found"]),
    (symlink_to_a_good_key, ["refusing to follow a symlink"]),
    (fifo, ["not a regular file"]),
], ids=["short", "empty", "spaces", "over-4KiB", "missing", "symlink", "fifo"])
def test_a_key_file_that_is_no_good_is_refused(runner, tmp_path, no_hang, make_key_file, words):
    key_file = make_key_file(tmp_path)
    result = invoke(runner, "--checkpoint", NOWHERE, "--host", "0.0.0.0",
                    "--api-key-file", str(key_file))
    assert_refused(result, *words)
    assert API_KEY not in result.output


def test_a_short_key_in_the_environment_is_refused(runner):
    result = invoke(runner, "--checkpoint", NOWHERE, env={"FRAGMENT_API_KEY": "hunter2"})
    assert_refused(result, "$FRAGMENT_API_KEY is 7 characters")
    assert "hunter2" not in result.output


def test_a_bad_origin_and_a_port_in_use_are_refused_before_the_model(runner):
    assert_refused(invoke(runner, "--checkpoint", NOWHERE, "--cors-origin", "*"),
                   "--cors-origin '*' is not one origin")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_refused(invoke(runner, "--checkpoint", NOWHERE, "--port", str(port)),
                       f"cannot listen on 127.0.0.1:{port}")


# What a refusal costs: a process that refuses must never have imported torch (which
# alone takes seconds), let alone read the checkpoint, which does not even exist here.
REFUSALS_WITHOUT_TORCH = textwrap.dedent("""
    import json, socket, sys
    from fragment_llm.cli.app import cli
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = {"host": ["--host", "0.0.0.0"],
             "key": ["--api-key-file", sys.argv[1]],
             "origin": ["--cors-origin", "http://a.example/path"],
             "port": ["--port", str(taken.getsockname()[1])]}
    seen = {}
    for name, args in cases.items():
        code = cli.main(["serve", "--checkpoint", "/nonexistent/checkpoints", *args],
                        prog_name="fragment", standalone_mode=False)
        seen[name] = [code, "torch" in sys.modules]
    print(json.dumps(seen))
""")


def test_a_refusal_never_imports_torch_or_loads_the_checkpoint(tmp_path):
    (tmp_path / "short.txt").write_text("short\n")
    env = {key: value for key, value in os.environ.items() if key != "FRAGMENT_API_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", REFUSALS_WITHOUT_TORCH,
                           str(tmp_path / "short.txt")], capture_output=True, text=True,
                          env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {name: [1, False]
                                       for name in ("host", "key", "origin", "port")}
    assert done.stderr.count("error: ") == 4 and "not found" not in done.stderr


# ------------------------------------------------------------ a real server, a real process


class ServerProcess:
    """`python -m fragment_llm serve ...` with its stderr read on a thread."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(  # noqa: S603 (our own interpreter and module)
            [sys.executable, "-m", "fragment_llm", "serve", *args], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def base_url(self, timeout_s: float = 60.0) -> str:
        """The API base URL from the banner, once the server is listening."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            found = re.search(r"API base URL\s*│\s*(http://\S+/v1)", "".join(self.stderr))
            if found:
                return found.group(1)
            time.sleep(0.05)
        raise AssertionError(f"no banner: {''.join(self.stderr)}")

    def stop(self, how: signal.Signals) -> tuple[int, str]:
        self.process.send_signal(how)
        try:
            code = self.process.wait(timeout=20)
        finally:
            self.process.kill()
        self.reader.join(timeout=5)
        return code, "".join(self.stderr)


@pytest.mark.parametrize("how, code, last_words", [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
def test_a_real_server_answers_the_client_and_stops_cleanly(chat_checkpoint, how, code,  # noqa: F811
                                                            last_words):
    env = {**os.environ, "FRAGMENT_API_KEY": API_KEY, "COLUMNS": "200", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                       os.environ.get("PYTHONPATH")]))}
    server = ServerProcess("--checkpoint", str(chat_checkpoint), "--port", "0", "--slots", "1",
                           env=env)
    try:
        base_url = server.base_url()
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health",  # noqa: S310
                                    timeout=10) as health:
            assert json.load(health) == {"status": "ok"}
        client = openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=30)
        reply = client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "my secret QX7"}], max_tokens=16)
        assert reply.choices[0].message.content == CHAT_ANSWER
        client.close()
    finally:
        exit_code, stderr = server.stop(how)
    assert exit_code == code, stderr
    assert stderr.rstrip().endswith(last_words) and "Traceback" not in stderr, stderr
    assert "POST /v1/chat/completions 200" in stderr and "QX7" not in stderr  # no text logged
