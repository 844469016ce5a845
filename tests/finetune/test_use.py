"""Using what fine-tuning made: `fragment eval`, `generate`, `verify` and `chat` with an
adapter (or on a fully fine-tuned run), as a person would type them.

- eval measures the assistant tokens of the run's held-out conversations, the figure
  training reported, beside the base's loss on the same blocks;
- generate answers a chat model's prompt as a user's turn (special tokens around it),
  `--raw` and base models continue it as text, and an answer stops at `<|end|>`;
- verify checks an adapter's tensors against its base and the base itself, and the
  conversations report of the run's shards;
- chat through a pipe answers one line per line, and text that spells a special token
  stays text.

The "scripted" models answer `<|assistant|>` with "ok" then `<|end|>` and continue any
other token with "x" (tests/helpers.py), so what reaches stdout says which ids were fed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from fragment_llm.checkpoint.load import open_checkpoint
from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.cli.app import cli
from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT
from fragment_llm.data.shards import TokenShards
from fragment_llm.inference.engine import Engine
from fragment_llm.tokenizer.chat_template import (
    Conversation,
    SpecialTokenTemplate,
    Turn,
    render_prompt,
)
from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.helpers import (
    REPO,
    save_scripted,
    save_untrained_adapter,
    scripted_answer,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK = 64  # the tiny base's context


def refusal(result) -> str:
    """The one error line of a refused command: exit 1, no traceback, nothing on stdout,
    the error last but for its hint."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1, lines
    assert [line[:6] for line in lines[errors[0] + 1:]] in ([], ["hint: "]), lines
    return lines[errors[0]]


def recorded(run: Path) -> dict:
    """The config.json of a run's (only) step: what its final evaluation reported."""
    (step,) = run.glob("step-*")
    return json.loads((step / "config.json").read_text())


def tokens_folder(run: Path) -> Path:
    (folder,) = (run / "tokens").iterdir()
    return folder


def spy_on_prompts(monkeypatch) -> list[list[int]]:
    """The ids each generation is started from (`Engine.generate`'s prompt), in order."""
    fed: list[list[int]] = []
    real = Engine.generate

    def recording(self, prompt_ids, settings, stop_ids=()):
        fed.append(list(prompt_ids))
        return real(self, prompt_ids, settings, stop_ids)

    monkeypatch.setattr(Engine, "generate", recording)
    return fed


@pytest.fixture(scope="module")
def tok(chat_tokenizer) -> Tokenizer:
    return Tokenizer.load(chat_tokenizer)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, chat_tokenizer, tok) -> dict[str, Path]:
    """"base": a scripted base model (plain transcripts); "adapter": its untrained LoRA
    adapter, which chats with the special tokens; "mute": a tuned model (special tokens)
    whose answer ends at once. Read only."""
    root = tmp_path_factory.mktemp("scripted")
    base = save_scripted(root / "base", scripted_answer(tok, "ok"), chat_tokenizer)
    mute = save_scripted(root / "mute", scripted_answer(tok, ""), chat_tokenizer,
                         SPECIAL_TOKENS_CHAT_FORMAT)
    return {"base": base, "adapter": save_untrained_adapter(root / "adapter", base),
            "mute": mute}


# ------------------------------------------------------------------------ eval


@torch.no_grad()
def loss_by_hand(model, shards_folder: Path) -> tuple[float, float]:
    """Cross-entropy over every held-out block: on the targets whose mask is set (the
    answers and their `<|end|>`), and on every target."""
    split = TokenShards.open(shards_folder).val
    starts = split.block_starts(BLOCK)
    count = split.num_blocks(BLOCK)
    blocks = torch.stack([torch.from_numpy(split.block(i, BLOCK, starts).astype("int64"))
                          for i in range(count)])
    masks = torch.stack([torch.from_numpy(split.mask_block(i, BLOCK, starts).copy())
                         for i in range(count)]).bool()
    logits, targets, counted = model(blocks[:, :-1]).float(), blocks[:, 1:], masks[:, 1:]
    assert 0 < int(counted.sum()) < counted.numel()
    return (float(F.cross_entropy(logits[counted], targets[counted])),
            float(F.cross_entropy(logits.flatten(0, 1), targets.flatten())))


@pytest.fixture(scope="module")
def base_losses(tuned_runs, base_checkpoint) -> tuple[float, float]:
    """The base's loss by hand on the held-out conversations (the runs share them)."""
    folder = tokens_folder(tuned_runs["lora"])
    assert TokenShards.open(folder).val.num_blocks(BLOCK) <= 64  # final_eval_blocks: all
    return loss_by_hand(load_trained(base_checkpoint).model, folder)


def eval_json(runner, *args: str) -> dict:
    result = runner.invoke(cli, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_eval_of_an_adapter_is_trainings_figure_beside_the_bases(runner, tuned_runs,
                                                                 base_checkpoint, base_losses,
                                                                 method):
    run = tuned_runs[method]
    report = eval_json(runner, "--adapter", str(run))
    assert report["loss_counts"] == "assistant tokens" and report["split"] == "val"
    assert Path(report["data"]) == tokens_folder(run)
    assert report["adapter"] == str(run)
    assert report["loss"] == pytest.approx(recorded(run)["val_loss"], abs=1e-6)
    assert report["bpb"] == pytest.approx(recorded(run)["val_bpb"], abs=1e-6)
    answers_only, everything = base_losses
    baseline = report["baseline"]
    assert Path(baseline["checkpoint"]) == base_checkpoint
    assert baseline["loss"] == pytest.approx(answers_only, rel=1e-5)
    assert baseline["loss"] != pytest.approx(everything, rel=1e-3)
    assert report["loss"] != pytest.approx(baseline["loss"], rel=1e-4)  # tuning moved it


def test_eval_of_a_full_fine_tune_against_its_base(runner, tuned_runs, base_checkpoint,
                                                   base_losses):
    run = tuned_runs["full"]
    report = eval_json(runner, "--checkpoint", str(run), "--baseline", str(base_checkpoint))
    assert "adapter" not in report and report["loss_counts"] == "assistant tokens"
    assert report["loss"] == pytest.approx(recorded(run)["val_loss"], abs=1e-6)
    assert report["baseline"]["loss"] == pytest.approx(base_losses[0], rel=1e-5)
    assert "baseline" not in eval_json(runner, "--checkpoint", str(run))  # only when asked


def test_eval_refuses_a_baseline_with_another_tokenizer(runner, tuned_runs,
                                                        other_tokenizer_base):
    line = refusal(runner.invoke(cli, ["eval", "--adapter", str(tuned_runs["lora"]),
                                       "--baseline", str(other_tokenizer_base)]))
    assert f"the baseline {other_tokenizer_base} uses another tokenizer" in line


def test_eval_table_shows_the_change_against_the_baseline(runner, tuned_runs):
    report = eval_json(runner, "--adapter", str(tuned_runs["lora"]))
    change = (report["loss"] - report["baseline"]["loss"]) / report["baseline"]["loss"] * 100
    result = runner.invoke(cli, ["eval", "--adapter", str(tuned_runs["lora"])])
    assert result.exit_code == 0, result.output
    assert "assistant tokens" in result.stderr
    row = re.search(r"loss vs baseline\W+([+-]\d+\.\d)%", result.stderr)
    assert row is not None, result.stderr
    assert row.group(1) == f"{change:+.1f}"


# ------------------------------------------------------------------------ generate


def generate(runner, *args: str):
    return runner.invoke(cli, ["generate", *args, "--temperature", "0",
                               "--max-new-tokens", "8"])


QUESTION = "Who are you, <|end|> really?"  # a special token's spelling stays text


def test_generate_with_an_adapter_asks_the_prompt_as_a_users_turn(runner, tuned_runs, tok,
                                                                  monkeypatch):
    fed = spy_on_prompts(monkeypatch)
    result = generate(runner, "--adapter", str(tuned_runs["lora"]), "--prompt", QUESTION)
    assert result.exit_code == 0, result.output
    question = Conversation(turns=[Turn("user", QUESTION)])
    assert fed == [render_prompt(question, SpecialTokenTemplate(), tok, 10**6)]
    special = tok.special_id
    assert fed[0] == [tok.eot_id, special("<|user|>"), *tok.encode(QUESTION),
                      special("<|end|>"), special("<|assistant|>")]


@pytest.mark.parametrize("model, raw", [("adapter", True), ("base", False)],
                         ids=["adapter --raw", "base model"])
def test_raw_and_base_models_continue_the_prompt_as_text(runner, scripted, tok, monkeypatch,
                                                         model, raw):
    fed = spy_on_prompts(monkeypatch)
    given = ["--adapter", str(scripted["adapter"])] if model == "adapter" else [
        "--checkpoint", str(scripted["base"])]
    result = generate(runner, *given, "--prompt", "the lazy dog", *(["--raw"] if raw else []))
    assert result.exit_code == 0, result.output
    assert fed == [[tok.eot_id, *tok.encode("the lazy dog")]]
    assert result.stdout == "x" * 8 + "\n"  # a continuation, not an answer


def test_a_chat_models_answer_stops_at_its_end_token(runner, scripted):
    """Greedily the scripted adapter says "ok", `<|end|>`, then "x" forever: only "ok"."""
    result = generate(runner, "--adapter", str(scripted["adapter"]), "--prompt", "hi")
    assert result.exit_code == 0, result.output
    assert result.stdout == "ok\n"


def test_an_answer_that_ends_at_once_is_empty(runner, scripted):
    result = generate(runner, "--checkpoint", str(scripted["mute"]), "--prompt", "hi", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["text"] == "" and report["new_tokens"] == 0


def test_a_question_too_long_for_a_chat_models_window_is_refused(runner, scripted, tok,
                                                                 monkeypatch):
    """As chat refuses a message that does not fit the window (room left for the answer):
    sliding it in would cut the `<|user|>` opening off the turn, a prompt the model was
    never tuned on. A question that fits is fed whole."""
    fed = spy_on_prompts(monkeypatch)
    room = 64 - 8  # the window less --max-new-tokens
    fits = " the" * (room - 4)  # one token each; the template adds four
    assert len(tok.encode(fits)) == room - 4
    result = generate(runner, "--adapter", str(scripted["adapter"]), "--prompt", fits)
    assert result.exit_code == 0 and result.stdout == "ok\n", result.output
    assert len(fed[0]) == room and fed[0][1] == tok.special_id("<|user|>")
    line = refusal(generate(runner, "--adapter", str(scripted["adapter"]), "--prompt",
                            fits + " the"))
    assert f"need {room + 1} tokens; the model's context holds {room}" in line
    assert len(fed) == 1  # nothing reached the model
    raw = generate(runner, "--adapter", str(scripted["adapter"]), "--prompt", fits + " the",
                   "--raw")
    assert raw.exit_code == 0  # a document may slide: the raw continuation is not a turn


# ------------------------------------------------------------------------ verify


def verify_json(runner, *args: str) -> tuple[int, list[dict]]:
    result = runner.invoke(cli, ["verify", *args, "--json"])
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout)["checks"]


def checks_named(checks: list[dict], name: str, artifact: Path | None = None) -> list[dict]:
    return [c for c in checks if c["check"] == name
            and (artifact is None or c["artifact"] == str(artifact))]


@pytest.mark.parametrize("method, given", [
    ("lora", "--adapter RUN"),  # its recorded base
    ("dora", "--adapter STEP BASE"),
    ("lora", "RUN"),  # a fine-tuning run folder as any artifact
])
def test_verify_an_adapter_and_its_base(runner, tuned_runs, base_checkpoint, method, given):
    run = tuned_runs[method]
    (step,) = run.glob("step-*")
    args = {"--adapter RUN": ["--adapter", str(run)], "RUN": [str(run)],
            "--adapter STEP BASE": ["--adapter", str(step), str(base_checkpoint)]}[given]
    code, checks = verify_json(runner, *args)
    assert code == 0, [c for c in checks if c["status"] == "FAILED"]
    (layout,) = checks_named(checks, "weights layout", step)
    assert layout["status"] == "ok" and layout["detail"].startswith(f"{method} rank 4 on ")
    (base,) = checks_named(checks, "base checkpoint", step)
    assert base["status"] == "ok", base
    recorded = open_checkpoint(base_checkpoint).manifest_sha256
    assert base["detail"].startswith(f"sha256 {recorded[:16]}")


def test_verify_an_adapter_against_another_base_fails(runner, tuned_runs, other_base):
    code, checks = verify_json(runner, "--adapter", str(tuned_runs["lora"]), str(other_base))
    (base,) = checks_named(checks, "base checkpoint")
    assert code == 1 and base["status"] == "FAILED", base


def test_verify_a_full_fine_tune_follows_its_base(runner, tuned_runs, base_checkpoint,
                                                  other_base):
    run = tuned_runs["full"]
    code, checks = verify_json(runner, str(run), "--base", str(base_checkpoint))
    (base,) = checks_named(checks, "base checkpoint")
    assert code == 0 and base["status"] == "ok", base
    (layout,) = checks_named(checks, "weights layout", next(run.glob("step-*")))
    assert layout["status"] == "ok" and "rank" not in layout["detail"]
    code, checks = verify_json(runner, str(run), "--base", str(other_base))
    (base,) = checks_named(checks, "base checkpoint")
    assert code == 1 and base["status"] == "FAILED", base


def test_verify_a_full_fine_tune_finds_its_base_where_the_run_recorded_it(runner, tuned_runs,
                                                                          base_checkpoint):
    code, checks = verify_json(runner, str(tuned_runs["full"]))  # no --base
    (base,) = checks_named(checks, "base checkpoint")
    assert code == 0 and base["status"] == "ok", base  # found, not "not present"
    recorded = open_checkpoint(tuned_runs["full"]).provenance.document()["base_checkpoint"]
    assert recorded == str(base_checkpoint)


def test_a_base_at_a_non_ascii_path_is_recorded_escaped(tmp_path, base_checkpoint,
                                                        conversations_file):
    """Provenance and adapter_config.json take printable ASCII only: a base in a folder
    named "café" must not make the first save fail."""
    from tests.finetune.conftest import tune

    base = Path(shutil.copytree(base_checkpoint, tmp_path / "café" / base_checkpoint.name))
    run = tune(base, conversations_file, tmp_path / "lora", "lora")
    step = open_checkpoint(run)
    config = json.loads((step.path / "adapter_config.json").read_text())
    assert config["base_checkpoint"] == str(base).replace("é", "\\xe9")
    assert step.provenance.document()["base_checkpoint"] == config["base_checkpoint"]


def test_verify_checks_the_conversations_report_of_the_shards(runner, tuned_runs, tmp_path):
    run = Path(shutil.copytree(tuned_runs["lora"], tmp_path / "run"))
    code, checks = verify_json(runner, str(run))
    (report,) = checks_named(checks, "conversations report")
    assert code == 0 and report["status"] == "ok", report
    path = tokens_folder(run) / "conversations.json"
    path.write_text(path.read_text().replace("1", "2", 1))  # one record's count, say
    code, checks = verify_json(runner, str(run))
    (report,) = checks_named(checks, "conversations report")
    assert code == 1 and report["status"] == "FAILED", report


# ------------------------------------------------------------------------ chat


def test_chat_feeds_a_typed_special_token_as_text(runner, tuned_runs, tok, monkeypatch):
    fed = spy_on_prompts(monkeypatch)
    typed = "say <|end|><|assistant|> and <|endoftext|>"
    result = runner.invoke(cli, ["chat", "--adapter", str(tuned_runs["lora"]), "-q",
                                 "--temperature", "0", "--max-new-tokens", "4"],
                           input=f"{typed}\n")
    assert result.exit_code == 0, result.output
    special = tok.special_id
    (ids,) = fed
    assert ids == [tok.eot_id, special("<|user|>"), *tok.encode(typed), special("<|end|>"),
                   special("<|assistant|>")]
    specials = set(tok.special_tokens.values())
    assert [i for i in ids if i in specials] == [tok.eot_id, special("<|user|>"),
                                                 special("<|end|>"), special("<|assistant|>")]


def test_chat_through_a_pipe_answers_one_line_per_line(scripted, tmp_path):
    """`printf 'hi\\n...' | fragment chat --adapter DIR -q`, a real pipe: one plain answer
    per line on stdout, nothing else."""
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "fragment_llm", "chat", "--adapter",
                           str(scripted["adapter"]), "-q", "--temperature", "0"],
                          input=b"hi\nhow are you?\n<|end|>\n", capture_output=True, env=env,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"ok\nok\nok\n"
    assert b"Traceback" not in done.stderr


def test_the_scripted_adapter_is_the_base_plus_special_tokens(scripted):
    """What the tests above lean on: the adapter's checkpoint chats with the special
    tokens, its base does not."""
    assert open_checkpoint(scripted["adapter"]).config.chat_format == SPECIAL_TOKENS_CHAT_FORMAT
    assert open_checkpoint(scripted["base"]).config.chat_format != SPECIAL_TOKENS_CHAT_FORMAT
