"""inference text: model text streamed out whole characters at a time and made safe, stop
strings never shown, and `fragment generate` end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fragment_llm.cli.app import cli
from fragment_llm.inference.text import TextStream
from fragment_llm.safety.text import BIDI_CHARS, CONTROL_CHARS, ZERO_WIDTH_CHARS, sanitize_output
from tests.test_config import extremes, numeric_fields  # the same walk over every range

FORBIDDEN = set(CONTROL_CHARS + BIDI_CHARS + ZERO_WIDTH_CHARS)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------- streamed text


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


def test_generate_temperature_1e_50_is_greedy(runner, checkpoint):
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "The quick",
            "--max-new-tokens", "12", "--json"]
    tiny = runner.invoke(cli, [*base, "--temperature", "1e-50", "--seed", "1"])
    assert tiny.exit_code == 0, tiny.output
    greedy = runner.invoke(cli, [*base, "--temperature", "0"])
    assert json.loads(tiny.stdout)["text"] == json.loads(greedy.stdout)["text"]


SAMPLING_CASES = [pytest.param(name, value, accepted, id=f"{name}={label}")
                  for table, name, kind, bounds in numeric_fields() if table == "generate"
                  for label, value, accepted in extremes(kind, bounds)]


@pytest.mark.parametrize("name, value, accepted", SAMPLING_CASES)
def test_every_sampling_setting_works_at_its_extremes_or_is_refused(runner, checkpoint,
                                                                     tmp_path, name, value,
                                                                     accepted):
    """Each number of [generate] at its min and max, just outside, inf and NaN, end to
    end: in range it generates (exit 0), outside it is one error naming the field."""
    values = {"max_new_tokens": 8, name: value}
    config = tmp_path / "gen.toml"
    config.write_text("[generate]\n" + "".join(f"{k} = {v!r}\n" for k, v in values.items()))
    try:
        result = runner.invoke(cli, ["generate", "--checkpoint", str(checkpoint), "--prompt",
                                     "a", "--config", str(config), "--json"])
    finally:
        torch.set_num_threads(1)  # threads = 256 is in range: undo it for the next tests
    if accepted:
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["new_tokens"] <= values["max_new_tokens"]
    else:
        assert result.exit_code == 1 and f"invalid generate.{name} = " in result.stderr
        assert result.stdout == "" and "Traceback" not in result.output
