"""`fragment merge`: a LoRA or DoRA adapter folded into its base is a standalone checkpoint
whose logits are base + adapter's (1e-5, fp32), which chats with the special tokens and
names both parents by their manifests' sha256; and each way a merge can go wrong is
refused in one line with nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from fragment_llm.checkpoint.layout import MANIFEST_FILE
from fragment_llm.checkpoint.load import open_checkpoint
from fragment_llm.checkpoint.save import save_checkpoint
from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.cli.app import cli
from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT
from fragment_llm.finetune import merge as merge_module
from fragment_llm.finetune.artifact import load_tuned
from fragment_llm.model.gpt import GPT
from tests.helpers import CHAT_VOCAB

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADAPTERS = ["lora", "dora"]
IDS = torch.randint(0, CHAT_VOCAB, (3, 64), generator=torch.Generator().manual_seed(11))


def manifest_sha256(step: Path) -> str:
    """What names a checkpoint: the sha256 of its manifest.json's bytes."""
    return hashlib.sha256((step / MANIFEST_FILE).read_bytes()).hexdigest()


def only_step(run: Path) -> Path:
    (step,) = run.glob("step-*")
    return step


@torch.no_grad()
def logits(model: GPT) -> torch.Tensor:
    return model(IDS).float()


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative name -> sha256): what "nothing changed" means."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


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


def merge_cli(runner, adapter: Path, out: Path, *base: Path):
    given = ["--base", str(base[0])] if base else []
    return runner.invoke(cli, ["merge", "--adapter", str(adapter), *given, "--out", str(out),
                               "--json"])


@pytest.fixture(scope="module")
def merged(tuned_runs, tmp_path_factory) -> dict[str, Path]:
    """The LoRA and DoRA runs merged by `fragment merge` (their recorded base): the step
    folders written, by method. Read only."""
    from click.testing import CliRunner

    root, steps = tmp_path_factory.mktemp("merged"), {}
    for method in ADAPTERS:
        result = merge_cli(CliRunner(), tuned_runs[method], root / method)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["max_logit_difference"] <= 1e-5
        steps[method] = Path(report["checkpoint"])
    return steps


# ------------------------------------------------------------------ what a merge gives


@pytest.mark.parametrize("method", ADAPTERS)
def test_the_merged_checkpoint_computes_base_plus_adapter(tuned_runs, base_checkpoint, merged,
                                                          method):
    tuned = load_tuned(base_checkpoint, tuned_runs[method])
    alone = load_trained(merged[method])
    expected = logits(tuned.model)
    # The adapter moved the base's outputs: a merge that dropped it would fail below.
    assert (expected - logits(load_trained(base_checkpoint).model)).abs().max() > 1e-2
    assert (logits(alone.model) - expected).abs().max() <= 1e-5
    assert not any(".lora_" in name or name.endswith("magnitude")
                   for name in alone.model.state_dict())  # folded, not carried along
    assert alone.step == tuned.adapter.checkpoint.step


@pytest.mark.parametrize("method", ADAPTERS)
def test_the_merged_checkpoint_chats_and_names_both_parents(tuned_runs, base_checkpoint,
                                                            merged, method):
    step = merged[method]
    config = json.loads((step / "config.json").read_text())
    assert config["chat_format"] == SPECIAL_TOKENS_CHAT_FORMAT
    provenance = json.loads((step / MANIFEST_FILE).read_text())["provenance"]
    assert provenance["base_manifest_sha256"] == manifest_sha256(base_checkpoint)
    assert provenance["adapter_manifest_sha256"] == manifest_sha256(only_step(tuned_runs[method]))
    assert load_trained(step).checkpoint.config.chat_format == SPECIAL_TOKENS_CHAT_FORMAT


def test_verify_follows_the_merged_checkpoint_to_its_base(runner, merged, base_checkpoint,
                                                          other_base):
    def base_link(base: Path) -> tuple[int, dict]:
        result = runner.invoke(cli, ["verify", str(merged["lora"]), "--base", str(base),
                                     "--json"])
        checks = json.loads(result.stdout)["checks"]
        (link,) = [c for c in checks if c["check"] == "base checkpoint"]
        return result.exit_code, link

    code, link = base_link(base_checkpoint)
    assert code == 0 and link["status"] == "ok", link
    assert manifest_sha256(base_checkpoint)[:12] in link["detail"]
    code, link = base_link(other_base)
    assert code == 1 and link["status"] == "FAILED", link


def test_eval_of_the_merged_checkpoint_on_the_adapters_conversations(runner, tuned_runs,
                                                                     merged):
    """`fragment eval --checkpoint MERGED --tokens ADAPTER_RUN/tokens` (docs/finetune.md):
    the adapter's held-out conversations, the adapter's loss."""
    def evaluate(*args: str) -> dict:
        result = runner.invoke(cli, ["eval", *args, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    run = tuned_runs["lora"]
    tuned = evaluate("--adapter", str(run))
    alone = evaluate("--checkpoint", str(merged["lora"]), "--tokens", str(run / "tokens"))
    assert alone["data"] == tuned["data"] and alone["tokens"] == tuned["tokens"]
    assert alone["loss_counts"] == "assistant tokens"
    assert alone["loss"] == pytest.approx(tuned["loss"], abs=1e-5)


# ------------------------------------------------------------------ a base as a run folder


def add_newer_step(run: Path, base: Path) -> Path:
    """A step newer than `base` in its run folder, with other weights (same config and
    tokenizer): the run's newest step, but not the one an adapter of `base` was tuned on."""
    checkpoint = open_checkpoint(base)
    torch.manual_seed(5)
    model = GPT(load_trained(base).model.config)
    return save_checkpoint(run, checkpoint.step + 10, model=model, optimizer=None,
                           trainer_state={"step": checkpoint.step + 10},
                           config={"model": checkpoint.config.model},
                           tokenizer_file=checkpoint.tokenizer_path,
                           provenance=checkpoint.provenance.document())


def test_a_base_run_folder_gives_the_step_the_adapter_was_tuned_on(runner, tuned_runs,
                                                                   base_checkpoint, tmp_path):
    run = Path(shutil.copytree(base_checkpoint.parent, tmp_path / "base-run"))
    newest = add_newer_step(run, run / base_checkpoint.name)
    assert open_checkpoint(run).path == newest  # what a plain load of the run gives
    result = merge_cli(runner, tuned_runs["lora"], tmp_path / "merged", run)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert Path(report["base"]) == run / base_checkpoint.name
    step = Path(report["checkpoint"])
    provenance = json.loads((step / MANIFEST_FILE).read_text())["provenance"]
    assert provenance["base_manifest_sha256"] == manifest_sha256(base_checkpoint)
    expected = logits(load_tuned(base_checkpoint, tuned_runs["lora"]).model)
    assert (logits(load_trained(step).model) - expected).abs().max() <= 1e-5


# ------------------------------------------------------------------ refusals


def test_an_out_folder_holding_checkpoints_is_refused_and_left_alone(runner, tuned_runs,
                                                                     base_checkpoint,
                                                                     tmp_path):
    out = Path(shutil.copytree(base_checkpoint.parent, tmp_path / "taken"))
    before = tree(out)
    line = refusal(merge_cli(runner, tuned_runs["lora"], out))
    assert f"{out} already holds checkpoints" in line
    assert tree(out) == before


def test_another_base_is_refused_naming_both_hashes(runner, tuned_runs, other_base,
                                                    base_checkpoint, tmp_path):
    line = refusal(merge_cli(runner, tuned_runs["dora"], tmp_path / "out", other_base))
    assert manifest_sha256(base_checkpoint)[:16] in line
    assert manifest_sha256(other_base)[:16] in line
    assert not (tmp_path / "out").exists()


def test_a_merge_beyond_the_tolerance_is_refused_and_writes_nothing(runner, tuned_runs,
                                                                    tmp_path, monkeypatch):
    """A merge that changes the function (here: one weight nudged by 1e-3 after the real
    merge) is caught by the probe, before anything is written."""
    real = merge_module.merge_adapters

    def sloppy(model: GPT) -> None:
        real(model)
        with torch.no_grad():
            model.blocks[1].mlp.proj.weight[0, 0] += 1e-3

    monkeypatch.setattr(merge_module, "merge_adapters", sloppy)
    line = refusal(merge_cli(runner, tuned_runs["lora"], tmp_path / "out"))
    assert "logits differ from base + adapter by" in line and "1e-05" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
