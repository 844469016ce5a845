"""The `fragment` group: help, version, and the one place errors become exit codes."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from fragment_llm import __version__
from fragment_llm.cli.app import cli
from fragment_llm.cli.common import EXIT_INTERNAL, EXIT_INTERRUPTED
from fragment_llm.errors import InputDataError


@pytest.fixture
def failing_preprocess(monkeypatch):
    """Replace the preprocess stage with one that raises what the test asks for."""

    def install(exc: BaseException) -> None:
        def run_preprocess(*args, **kwargs):
            raise exc

        fake = types.ModuleType("fragment_llm.data.preprocess")
        fake.run_preprocess = run_preprocess
        monkeypatch.setitem(sys.modules, "fragment_llm.data.preprocess", fake)

    return install


def test_help_lists_the_pipeline(runner):
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for verb in ("preprocess", "data/raw", "data/processed"):
        assert verb in result.output


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_usage_error_exits_2(runner):
    result = runner.invoke(cli, ["preprocess", "--workers", "0"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_unknown_verb_exits_2(runner):
    assert runner.invoke(cli, ["frobnicate"]).exit_code == 2


def test_fragment_error_is_one_escaped_line(runner, failing_preprocess):
    failing_preprocess(InputDataError("bad file: evil\x1b]52;c;aGk=\x07.txt", hint="fix it"))
    result = runner.invoke(cli, ["preprocess"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: bad file: evil\\x1b]52;c;aGk=\\x07.txt",
                                          "hint: fix it"]
    assert "\x1b" not in result.output


def test_internal_error_saves_traceback(runner, failing_preprocess):
    failing_preprocess(ZeroDivisionError("boom"))
    result = runner.invoke(cli, ["preprocess"])
    assert result.exit_code == EXIT_INTERNAL
    (line,) = result.stderr.splitlines()
    assert line.startswith("internal error: ZeroDivisionError: boom")
    saved = Path(line.split("traceback saved to ")[1].split(";")[0])
    assert "Traceback" in saved.read_text()
    saved.unlink()


def test_debug_prints_traceback(runner, failing_preprocess):
    failing_preprocess(ZeroDivisionError("boom"))
    result = runner.invoke(cli, ["--debug", "preprocess"])
    assert result.exit_code == EXIT_INTERNAL
    assert "Traceback" in result.stderr


def test_ctrl_c_exits_130(runner, failing_preprocess):
    failing_preprocess(KeyboardInterrupt())
    result = runner.invoke(cli, ["preprocess"])
    assert result.exit_code == EXIT_INTERRUPTED
    assert "Traceback" not in result.output


def test_bad_config_file_is_refused_before_work(runner, failing_preprocess, tmp_path):
    failing_preprocess(AssertionError("stage must not run"))
    config = tmp_path / "c.toml"
    config.write_text("[preprocess]\nmin_doc_chars = -1\n")
    result = runner.invoke(cli, ["preprocess", "--config", str(config)])
    assert result.exit_code == 1
    assert "preprocess.min_doc_chars" in result.stderr


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "fragment_llm", "--version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and __version__ in done.stdout
