"""The first hour, through the CLI: every `--help` example runs as written, the setup and
quick-start scripts say what they do and end well, errors name the next step, `eval`
shows progress and measures what training measured, and `--json` is one object.

The `workspace` fixture lays out a folder the way the examples assume (the defaults
data/raw, data/processed, data/tokenizer.json, data/tokens/, checkpoints/, plus the
files the examples name), built through the CLI on 60 KB of the sample corpus with a
one-layer, 16-wide model so that it takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from fragment_llm.cli.app import cli
from fragment_llm.cli.common import FLAGS
from tests.helpers import REPO, SAMPLE

PLAYS = ("macbeth_gut.txt", "hamlet_gut.txt", "sonnets_gut.txt")
# A model small enough that 200 steps take about a second (its [train] table keeps the
# token shards on one process, which is all 60 KB need).
MICRO_TOML = ("[model]\nn_layer = 1\nn_head = 1\nn_embd = 16\nblock_size = 16\n"
              "[train]\nbatch_size = 2\nworkers = 1\n")


def fragment(*args: str, stdin: str = "") -> Result:
    """One in-process `fragment` command, with the global flags reset as in a new process."""
    FLAGS.debug = FLAGS.quiet = False
    return CliRunner().invoke(cli, list(args), input=stdin, prog_name="fragment")


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def write_sample(raw: Path, chars: int = 20_000) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for name in PLAYS:
        (raw / name).write_text((SAMPLE / name).read_text(encoding="utf-8")[:chars],
                                encoding="utf-8")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    write_sample(root / "data" / "raw")
    (root / "micro.toml").write_text(MICRO_TOML)
    with contextlib.chdir(root):
        ok(fragment("-q", "preprocess"))
        ok(fragment("-q", "train-tokenizer", "--vocab-size", "300"))
        ok(fragment("-q", "train", "--config", "micro.toml", "--max-steps", "200",
                    "--checkpoint-every", "100", "--device", "cpu"))
    (root / "books").mkdir()
    (root / "books" / "tempest.txt").write_text(
        (SAMPLE / "tempest_gut.txt").read_text(encoding="utf-8")[:8_000], encoding="utf-8")
    (root / "notes.jsonl").write_text(
        "".join(json.dumps({"text": f"Note {i}: what the examples assume exists."}) + "\n"
                for i in range(5)))
    (root / "start.txt").write_text("To be, or not to be")
    (root / "key.txt").write_text("an-example-key-of-32-characters!\n")
    (root / "serve.toml").write_text("[serve]\nport = 0\nslots = 1\nmax_new_tokens = 64\n")
    shutil.copytree(REPO / "examples", root / "examples")  # the experiment plans
    shutil.copytree(root / "data" / "processed", root / "other" / "processed")
    write_conversations(root / "data" / "conversations")
    with contextlib.chdir(root):
        ok(fragment("-q", "finetune", "--base", "checkpoints", "--max-steps", "10",
                    "--batch-size", "2", "--checkpoint-every", "5", "--eval-every", "5"))
        ok(fragment("-q", "merge", "--adapter", "checkpoints-chat", "--out",
                    "checkpoints-merged"))
    return root


def write_conversations(folder: Path, count: int = 60) -> None:
    """The first conversations of the bundled hand-written set: what the finetune
    examples read from data/conversations."""
    folder.mkdir(parents=True)
    lines = (REPO / "data" / "conversations" / "fragment.jsonl").read_text(
        encoding="utf-8").splitlines(keepends=True)
    (folder / "chats.jsonl").write_text("".join(lines[:count]), encoding="utf-8")


@pytest.fixture
def work(workspace, tmp_path, monkeypatch) -> Path:
    """A private copy of the workspace, made the current folder."""
    folder = tmp_path / "w"
    shutil.copytree(workspace, folder, symlinks=True)
    monkeypatch.chdir(folder)
    return folder


# ------------------------------------------------------------- item 16: --help examples


def help_examples() -> list[str]:
    """Every line of every `Examples:` / `Example:` block in every command's --help."""
    found = []
    parent = click.Context(cli, info_name="fragment")
    for name, command in sorted(cli.commands.items()):
        lines = command.get_help(click.Context(command, info_name=name, parent=parent))
        lines = lines.splitlines()
        for i, line in enumerate(lines):
            if line.strip() in ("Examples:", "Example:"):
                for example in lines[i + 1:]:
                    if not example.strip():
                        break
                    found.append(example.strip())
    return found


EXAMPLES = help_examples()

# Examples whose exact run takes minutes on 2 cores. The fast test runs each as written
# with `--dry-run` added, which does everything a run does before its first step (the
# configs, the tokenizer and token shards, a resume's checkpoint, the memory plan) and
# times a few steps; one already a dry run is only parsed there. `slow` runs them as
# written, except the ten-minute budget, whose length is the point of the example.
LONG = {
    "fragment train --preset tiny": "200 steps of the tiny preset, about a minute",
    "fragment train --max-time 10m": "ten minutes by design",
    "fragment train --resume": "continues checkpoints/ to the end of its run",
    "fragment train --preset base --dry-run": "its probe times 3 steps of the 40M-parameter "
                                              "model: about 5 minutes on 2 cores",
    "fragment finetune --base checkpoints --data data/conversations": "300 steps",
    "fragment finetune --base checkpoints --method dora --rank 8 --max-time 10m":
        "ten minutes by design",
    "fragment finetune --base checkpoints --method full --out checkpoints-full": "300 steps",
    "fragment experiment examples/plan-mlp.toml": "6 runs of ten minutes by design",
    "fragment serve": "serves until Ctrl-C",
    "fragment serve --checkpoint checkpoints-merged --port 8080": "serves until Ctrl-C",
    "fragment serve --adapter checkpoints-chat --slots 1 --max-tokens 128": "serves until Ctrl-C",
    "fragment serve --host 0.0.0.0 --api-key-file key.txt": "serves until Ctrl-C",
}
# Examples that need room the workspace's 16-token model lacks, given it by a flag.
ROOMIER = {'fragment generate --adapter checkpoints-chat --prompt "Who are you?"':
           " --max-new-tokens 1"}  # a chat question must fit the window less the answer
NEVER_EXACT = {"fragment train --max-time 10m", "fragment experiment examples/plan-mlp.toml",
               "fragment finetune --base checkpoints --method dora --rank 8 --max-time 10m",
               *(line for line in LONG if line.startswith("fragment serve"))}

# What a verb writes by default, removed before its examples run: each example runs at
# the point in the pipeline where a user types it (`--resume` continues what exists).
NOT_YET_WRITTEN = {"preprocess": ["data/processed"],
                   "train-tokenizer": ["data/tokenizer.json"],
                   "train": ["checkpoints"],
                   "finetune": ["checkpoints-chat", "checkpoints-full"],
                   "merge": ["checkpoints-merged", "merged"]}


def without_comment(line: str) -> str:
    return " ".join(shlex.split(line, comments=True))


def prepare(folder: Path, line: str) -> None:
    verb = shlex.split(line, comments=True)[1]
    if "--resume" in line or "--init-from" in line:  # they read what the verb wrote
        return
    for relative in NOT_YET_WRITTEN.get(verb, []):
        path = folder / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def run_example(line: str, folder: Path) -> tuple[int, str]:
    """Run one example line in `folder`: through a shell when it is a pipe, otherwise
    in-process (the same click command, without starting Python and torch again)."""
    if "|" not in line:
        args = shlex.split(line, comments=True)
        assert args[0] == "fragment"
        result = fragment(*args[1:])
        return result.exit_code, result.output
    bin_dir = folder.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "fragment"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fragment_llm "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(["bash", "-o", "pipefail", "-c", line], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


def test_the_examples_were_found():
    verbs = {shlex.split(line, comments=True)[1] for line in EXAMPLES}
    assert {"preprocess", "train-tokenizer", "train", "eval", "generate", "chat",
            "verify", "export-tokenizer"} <= verbs
    assert set(LONG) <= {without_comment(line) for line in EXAMPLES}, "LONG is out of date"


@pytest.mark.parametrize("line", EXAMPLES)
def test_help_example_runs(line, work):
    command = without_comment(line)
    if command in LONG and "--dry-run" in command:
        verb, *args = shlex.split(command)[1:]  # parsed only; see LONG
        cli.commands[verb].make_context(verb, args, parent=click.Context(cli))
        return
    if command in LONG:
        line = command + " --dry-run"
    line = line + ROOMIER.get(line, "")
    prepare(work, line)
    code, output = run_example(line, work)
    assert code == 0, output


@pytest.mark.slow
@pytest.mark.parametrize("line", sorted(set(LONG) - NEVER_EXACT))
def test_long_help_example_runs_as_written(line, work):
    prepare(work, line)
    code, output = run_example(line, work)
    assert code == 0, output


# ------------------------------------------------------ item 17: setup and quick start


def make_executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def test_setup_says_what_it_installs_and_pip_stays_quiet(tmp_path):
    """setup.sh against a stand-in .venv/bin/python that prints each pip call it gets."""
    make_executable(tmp_path / "scripts" / "setup.sh", (REPO / "scripts" / "setup.sh").read_text())
    make_executable(tmp_path / ".venv" / "bin" / "python", '#!/bin/sh\necho "CALL $*"\n')
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True,
                          text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    calls = [i for i, line in enumerate(lines) if line.startswith("CALL ")]
    assert len(calls) == 3
    for i in calls:
        assert "-m pip install -q " in lines[i]
        assert i > 0 and lines[i - 1].startswith("setup: "), lines  # said before it starts
    said = "\n".join(lines)
    assert "pip" in said.split("CALL")[0] and "torch" in lines[calls[1] - 1]
    assert "fragment-llm" in lines[calls[2] - 1]
    assert lines[-1].startswith("setup: done")


def test_quickstart_pretrains_fine_tunes_and_ends_with_a_chat_answer(tmp_path):
    """quickstart.sh as written, on a 30 KB corpus, with setup.sh stood in for (nothing to
    install) and, to keep it to seconds, `train` given the one-layer model and 2 steps
    and `finetune` 2 steps."""
    make_executable(tmp_path / "scripts" / "quickstart.sh",
                    (REPO / "scripts" / "quickstart.sh").read_text())
    make_executable(tmp_path / "scripts" / "setup.sh", "#!/bin/sh\necho 'setup: (stand-in)'\n")
    (tmp_path / "micro.toml").write_text(MICRO_TOML)
    make_executable(tmp_path / ".venv" / "bin" / "fragment", (
        "#!/bin/sh\n"
        f'if [ "$1" = train ]; then set -- "$@" --config "{tmp_path}/micro.toml" '
        "--max-steps 2; fi\n"
        'if [ "$1" = finetune ]; then set -- "$@" --max-steps 2 --batch-size 2; fi\n'
        f'exec "{sys.executable}" -m fragment_llm "$@"\n'))
    write_sample(tmp_path / "data" / "raw", chars=10_000)
    write_conversations(tmp_path / "data" / "conversations")
    (tmp_path / "data" / "conversations" / "chats.jsonl").rename(
        tmp_path / "data" / "conversations" / "fragment.jsonl")
    (tmp_path / "checkpoints").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "quickstart.sh")], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    continuation = subprocess.run(
        [sys.executable, "-m", "fragment_llm", "generate", "--checkpoint", "checkpoints",
         "--prompt", "ROMEO.", "--max-new-tokens", "80", "--seed", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    said = done.stdout
    header = 'The model you just trained, continuing "ROMEO.":\n\n'
    assert header + "ROMEO." + continuation + "\n" in said  # the prompt, then its continuation
    assert "baseline loss" in done.stderr  # eval: the tuned model beside the base
    answer = subprocess.run(
        [sys.executable, "-m", "fragment_llm", "chat", "--checkpoint", "checkpoints-chat", "-q",
         "--seed", "1", "--temperature", "0.5", "--max-new-tokens", "60"], input="Who are you?\n",
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "you> Who are you?\n" + answer in said  # the model's answer, as chat gives it
    last = said.splitlines()[-1]
    assert "fragment chat --checkpoint checkpoints-chat" in last and said.endswith("\n")


# ------------------------------------------------------------- item 19: hints and eval


@pytest.mark.parametrize("args,next_step", [
    (["chat"], "`fragment train`"),
    (["generate", "--prompt", "hello"], "`fragment train`"),
    (["eval"], "`fragment train`"),
    (["chat", "--checkpoint", "runs/none"], "`fragment train`"),
    (["train"], "`fragment train-tokenizer`"),
    (["train-tokenizer"], "`fragment preprocess`"),
])
def test_a_missing_input_names_the_verb_that_makes_it(tmp_path, monkeypatch, args, next_step):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()  # as in a fresh clone: the folder, no steps
    result = fragment(*args)
    assert result.exit_code == 1, result.output
    error, hint = result.stderr.splitlines()
    assert error.startswith("error: ") and hint.startswith("hint: ") and next_step in hint


def test_eval_shows_progress_and_names_the_text(work):
    result = ok(fragment("eval"))
    assert "evaluating" in result.stderr and "512 / 512" in result.stderr
    assert "held-out split of data/tokens/" in result.stderr
    result = ok(fragment("eval", "--data", "data/processed"))
    assert "documents of data/processed, from its start" in result.stderr


def test_eval_reports_the_figure_training_reported(work):
    trained = json.loads(ok(fragment("train", "--config", "micro.toml", "--max-steps", "6",
                                     "--out", "run", "--json")).stdout)
    held_out = json.loads(ok(fragment("eval", "--checkpoint", "run", "--json")).stdout)
    assert held_out["split"] == "val" and held_out["data"].startswith("data/tokens/")
    assert held_out["bpb"] == pytest.approx(trained["val_bpb"], rel=1e-6)
    assert held_out["loss"] == pytest.approx(trained["val_loss"], rel=1e-6)
    everything = json.loads(ok(fragment("eval", "--checkpoint", "run", "--data",
                                        "data/processed", "--json")).stdout)
    assert everything["split"] == "all" and everything["data"] == "data/processed"


def test_eval_without_the_run_token_shards_says_what_to_pass(work):
    shutil.rmtree(work / "data" / "tokens")
    result = fragment("eval")
    assert result.exit_code == 1
    assert "--data" in result.stderr and "not in data/tokens" in result.stderr


def test_eval_refuses_other_token_shards(work):
    before = set((work / "data" / "tokens").iterdir())
    ok(fragment("-q", "train-tokenizer", "--vocab-size", "300", "--pattern", "gpt2", "--out",
                "other.json"))
    ok(fragment("-q", "train", "--config", "micro.toml", "--tokenizer", "other.json",
                "--out", "run2", "--dry-run"))
    (other,) = set((work / "data" / "tokens").iterdir()) - before
    result = fragment("eval", "--tokens", str(other))
    assert result.exit_code == 1
    assert "holds other token shards than the ones" in result.stderr


# --------------------------------------------------------------------- item 20: --json


def one_json_object(stdout: str) -> dict:
    assert stdout.count("\n") == 1 and stdout.endswith("\n"), stdout
    value = json.loads(stdout)
    assert isinstance(value, dict)
    return value


def test_preprocess_json(work):
    report = one_json_object(ok(fragment("preprocess", "books", "notes.jsonl", "--out",
                                         "data/mine", "--json")).stdout)
    assert report["out"] == "data/mine" and report["counts"]["documents"] == 6
    assert report["counts"]["files_kept"] == 2 and report["shards"] == 1


def test_preprocess_json_lists_the_files_not_used(work):
    (work / "books" / "picture.png").write_bytes(b"\x89PNG\r\n")
    report = one_json_object(ok(fragment("preprocess", "books", "--out", "data/mine",
                                         "--json")).stdout)
    assert [p["file"] for p in report["problems"]] == ["books/picture.png"]


def test_train_tokenizer_json(work):
    report = one_json_object(ok(fragment("train-tokenizer", "--vocab-size", "280", "--out",
                                         "t.json", "--json")).stdout)
    assert report["out"] == "t.json" and report["vocab_size"] == 280
    assert len(report["sha256"]) == 64 and report["bytes_per_token"] > 1


def test_train_json(work):
    report = one_json_object(ok(fragment("train", "--config", "micro.toml", "--max-steps",
                                         "3", "--out", "run", "--json")).stdout)
    assert report["steps"] == 3 and report["checkpoint"] == "run/step-0000003"
    assert report["dry_run"] is False and report["plan"]["parameters"] == report["parameters"]
    assert isinstance(report["val_bpb"], float)


def test_train_dry_run_json(work):
    report = one_json_object(ok(fragment("train", "--config", "micro.toml", "--out", "run",
                                         "--dry-run", "--json")).stdout)
    assert report["dry_run"] is True and report["seconds_per_step_probe"] > 0
    assert "steps" not in report and report["plan"]["tokens_per_step"] == 32


def test_json_is_all_a_real_process_writes_to_stdout(work):
    done = subprocess.run([sys.executable, "-m", "fragment_llm", "preprocess", "--out",
                           "data/again", "--json"], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120,
                          check=True)
    assert one_json_object(done.stdout)["counts"]["files_kept"] == 3


def test_shell_completion_works_as_the_readme_says():
    assert "_FRAGMENT_COMPLETE=bash_source fragment" in (REPO / "README.md").read_text()
    env = {**os.environ, "PYTHONPATH": str(REPO), "_FRAGMENT_COMPLETE": "bash_source"}
    script = subprocess.run([sys.executable, "-m", "fragment_llm"], env=env, timeout=60,
                            capture_output=True, text=True, check=True).stdout
    assert "_FRAGMENT_COMPLETE=bash_complete" in script and "complete " in script
    env.update(_FRAGMENT_COMPLETE="bash_complete", COMP_WORDS="fragment train-t",
               COMP_CWORD="1")
    words = subprocess.run([sys.executable, "-m", "fragment_llm"], env=env, timeout=60,
                           capture_output=True, text=True, check=True).stdout.split()
    assert words == ["plain,train-tokenizer"]
