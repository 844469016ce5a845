"""Usage errors and global flags: what click reports is escaped like our own errors, and
`--debug` / `--quiet` work after the verb as well as before it."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from fragment_llm.cli.app import cli
from fragment_llm.cli.common import EXIT_INTERNAL, EXIT_USAGE, FLAGS
from fragment_llm.safety.text import strip_unsafe

# Arguments a shell glob over hostile file names can hand us: an OSC title change and a
# clipboard write (OSC 52), a CSI screen clear, a newline that forges an output line,
# bidi overrides that reorder what is read, and an 8-bit CSI.
HOSTILE = {
    "osc-title": "b\x1b]0;pwned\x07",
    "osc-clipboard": "b\x1b]52;c;aGk=\x07",
    "csi": "b\x1b[2J\x1b[31mred",
    "newline": "b\nError: forged line",
    "bidi": "b\u202eevil\u2066x\u2069",
    "c1-csi": "b\x9b2J",
}

# Each kind of usage error click raises, with the hostile text where a user's argument goes.
KINDS = {
    "extra-argument": lambda h: ["verify", "a", h],
    "no-such-command": lambda h: [h],
    "no-such-option": lambda h: ["preprocess", "--x" + h.replace("=", "")],
    "bad-integer": lambda h: ["preprocess", "--workers", h],
    "bad-choice": lambda h: ["train-tokenizer", "--pattern", h],
    "bad-duration": lambda h: ["train", "--max-time", h],
    "missing-argument": lambda h: ["verify", "--processed", h],
}


def assert_one_safe_report(output: str, verb: str | None) -> None:
    """Usage line, help hint, blank line, one `Error:` line; nothing a terminal acts on."""
    assert strip_unsafe(output) == output, repr(output)
    lines = output.splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("Usage: fragment")
    command = f"fragment {verb}" if verb else "fragment"
    assert lines[1] == f"Try '{command} --help' for help."
    assert lines[2] == "" and lines[3].startswith("Error: ")


def verb_of(args: list[str]) -> str | None:
    return args[0] if args[0] in cli.commands else None


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE.keys())
@pytest.mark.parametrize("kind", KINDS.keys())
def test_usage_errors_are_escaped(runner, kind, hostile):
    args = KINDS[kind](hostile)
    result = runner.invoke(cli, args, prog_name="fragment")
    assert result.exit_code == EXIT_USAGE, result.output
    assert result.stdout == ""
    assert_one_safe_report(result.stderr, verb_of(args))


def test_extra_argument_is_shown_escaped(runner):
    result = runner.invoke(cli, ["verify", "a", "b\x1b]0;pwned\x07\x1b]52;c;aGk=\x07\n\u202e"],
                           prog_name="fragment")
    assert result.stderr.splitlines()[-1] == (
        "Error: Got unexpected extra argument (b\\x1b]0;pwned\\x07\\x1b]52;c;aGk=\\x07\\x0a"
        "\\u202e)")


def test_did_you_mean_is_escaped(runner):
    result = runner.invoke(cli, ["preprocess", "--overwrit\x1b[0m"], prog_name="fragment")
    assert result.exit_code == EXIT_USAGE
    assert_one_safe_report(result.stderr, "preprocess")
    assert "Did you mean '--overwrite'?" in result.stderr


def test_our_own_usage_error_keeps_click_layout(runner):
    result = runner.invoke(cli, ["generate"], prog_name="fragment")
    assert result.exit_code == EXIT_USAGE
    assert_one_safe_report(result.stderr, "generate")
    assert "give exactly one of --prompt TEXT" in result.stderr


def test_no_arguments_still_prints_the_help(runner):
    result = runner.invoke(cli, [])
    assert "fragment preprocess" in result.output and "Error" not in result.output


@pytest.mark.parametrize("hostile", HOSTILE.values(), ids=HOSTILE.keys())
def test_usage_errors_are_escaped_in_a_real_process(hostile):
    for args in (["verify", "a", hostile], [hostile], ["preprocess", "--workers", hostile]):
        done = subprocess.run([sys.executable, "-m", "fragment_llm", *args],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == EXIT_USAGE, done.stderr
        assert done.stdout == ""
        assert_one_safe_report(done.stderr, verb_of(args))


# ------------------------------------------------------------------------ global flags


@pytest.fixture
def fake_preprocess(monkeypatch):
    """A preprocess stage that shows a summary, or raises what the test asks for."""

    def install(exc: BaseException | None = None) -> None:
        def run_preprocess(*args, **kwargs):
            if exc is not None:
                raise exc
            return types.SimpleNamespace(problem_rows=list, summary_rows=lambda: [("k", "v")])

        fake = types.ModuleType("fragment_llm.data.preprocess")
        fake.run_preprocess = run_preprocess
        monkeypatch.setitem(sys.modules, "fragment_llm.data.preprocess", fake)

    return install


@pytest.mark.parametrize("args", [["-q", "preprocess"], ["preprocess", "-q"],
                                  ["preprocess", "--quiet"], ["--quiet", "preprocess", "-q"]])
def test_quiet_before_or_after_the_verb(runner, fake_preprocess, args):
    fake_preprocess()
    result = runner.invoke(cli, args, prog_name="fragment")
    assert result.exit_code == 0, result.output
    assert result.output == ""


def test_flags_after_the_verb_do_not_stick_to_the_next_command(runner, fake_preprocess):
    fake_preprocess()
    assert runner.invoke(cli, ["preprocess", "-q"]).output == ""
    result = runner.invoke(cli, ["preprocess"])
    assert "│ k │ v │" in result.stderr and not FLAGS.quiet


@pytest.mark.parametrize("args", [["--debug", "preprocess"], ["preprocess", "--debug"]])
def test_debug_before_or_after_the_verb(runner, fake_preprocess, args):
    fake_preprocess(ZeroDivisionError("boom"))
    result = runner.invoke(cli, args, prog_name="fragment")
    assert result.exit_code == EXIT_INTERNAL
    assert "Traceback" in result.stderr


def test_every_verb_takes_the_global_flags():
    for name, command in cli.commands.items():
        options = {opt for param in command.params for opt in param.opts}
        assert {"--debug", "--quiet", "-q"} <= options, name
