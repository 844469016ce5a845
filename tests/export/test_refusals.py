"""`fragment export` through the CLI: what it writes, and each thing it refuses in one line
(exit 1, no traceback) with nothing written or replaced: a component no Llama has, an
--out that exists, overlaps an input, is a link or is not a previous export, an adapter
of another base, a quantisation HF does not take, a split pattern llama.cpp lacks; and an
export that fails half-way leaves no folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fragment_llm.checkpoint.load import open_checkpoint
from fragment_llm.cli.app import cli
from fragment_llm.export import hf_model
from fragment_llm.tokenizer.tokenizer import Tokenizer
from tests.export.conftest import save_model, scaled_model
from tests.helpers import MERGES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def export_cli(runner, *args: str | Path):
    return runner.invoke(cli, ["export", *map(str, args)])


def refusal(result) -> str:
    """The one error line of a refused command: exit 1, no traceback, nothing on stdout."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1].startswith(("error: ", "hint: ")), lines
    return errors[0]


def test_json_summary_names_the_source(runner, tmp_path, base_step):
    result = export_cli(runner, "--checkpoint", base_step, "--format", "gguf", "--quantize",
                        "q8_0", "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["source_manifest_sha256"] == open_checkpoint(base_step).manifest_sha256
    assert set(summary["files"]) == {"model.gguf", "fragment_export.json"}
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary left beside it


@pytest.mark.parametrize(("change", "named"), [
    ({"positions": "learned"}, "model.positions = 'learned': learned position embeddings"),
    ({"positions": "sinusoidal"}, "model.positions = 'sinusoidal'"),
    ({"norm": "layernorm"}, "model.norm = 'layernorm': LayerNorm"),
    ({"mlp": "gelu"}, "model.mlp = 'gelu': a GELU MLP"),
    ({"mlp": "relu2"}, "model.mlp = 'relu2': a ReLU² MLP"),
    ({"qk_norm": True}, "model.qk_norm = True: RMSNorm on q and k"),
    ({"logit_softcap": 15.0}, "model.logit_softcap = 15.0: a tanh cap"),
    ({"x0_mix": True}, "model.x0_mix = True: the embedding mixed")])
def test_component_without_a_llama_equivalent_is_refused(runner, tmp_path, chat_tokenizer,
                                                          change, named):
    step = save_model(tmp_path / "run", scaled_model(**change), chat_tokenizer)
    for fmt in ("hf", "gguf"):
        line = refusal(export_cli(runner, "--checkpoint", step, "--format", fmt,
                                  "--out", tmp_path / "out"))
        assert named in line and "no faithful Llama equivalent" in line
    assert not (tmp_path / "out").exists()


def test_existing_out_needs_overwrite_and_only_replaces_an_export(runner, tmp_path, base_step):
    out = tmp_path / "out"
    assert export_cli(runner, "--checkpoint", base_step, "--format", "hf", "--out", out
                      ).exit_code == 0
    line = refusal(export_cli(runner, "--checkpoint", base_step, "--format", "gguf",
                              "--out", out))
    assert "already exists" in line
    assert (out / "model.safetensors").is_file()
    assert export_cli(runner, "--checkpoint", base_step, "--format", "gguf", "--out", out,
                      "--overwrite").exit_code == 0
    assert sorted(os.listdir(out)) == ["fragment_export.json", "model.gguf"]
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    line = refusal(export_cli(runner, "--checkpoint", base_step, "--format", "hf",
                              "--out", precious, "--overwrite"))
    assert "replaces only a previous export" in line
    (precious / "fragment_export.json").symlink_to(out / "fragment_export.json")  # a decoy
    line = refusal(export_cli(runner, "--checkpoint", base_step, "--format", "hf",
                              "--out", precious, "--overwrite"))
    assert "replaces only a previous export" in line
    assert (precious / "thesis.txt").read_text() == "years of work"


def test_out_overlapping_the_checkpoint_is_refused(runner, base_step):
    run = base_step.parent
    before = sorted(os.listdir(run))
    for out in (run / "hf", base_step / "hf", run, run.parent):
        line = refusal(export_cli(runner, "--checkpoint", run, "--format", "hf", "--out", out,
                                  "--overwrite"))
        assert "overlaps the input" in line
    assert sorted(os.listdir(run)) == before and open_checkpoint(base_step)


def test_symlinked_out_is_refused(runner, tmp_path, base_step):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "out").symlink_to(target)
    line = refusal(export_cli(runner, "--checkpoint", base_step, "--format", "hf",
                              "--out", tmp_path / "out", "--overwrite"))
    assert "symbolic link" in line
    assert os.listdir(target) == [] and (tmp_path / "out").is_symlink()


def test_adapter_of_another_base_is_refused(runner, tmp_path, chat_tokenizer, adapter_step):
    other = save_model(tmp_path / "other", scaled_model(seed=9), chat_tokenizer)
    line = refusal(export_cli(runner, "--checkpoint", other, "--adapter", adapter_step,
                              "--format", "hf", "--out", tmp_path / "out"))
    assert "was trained on a base whose manifest hashes to" in line
    assert not (tmp_path / "out").exists()


def test_quantized_hf_export_is_refused(runner, tmp_path, base_step):
    line = refusal(export_cli(runner, "--checkpoint", base_step, "--format", "hf",
                              "--quantize", "q8_0", "--out", tmp_path / "out"))
    assert "--quantize q8_0 is for --format gguf" in line


def test_custom_split_pattern_is_refused_for_gguf_only(runner, tmp_path):
    tokenizer = tmp_path / "custom.json"
    Tokenizer.from_merges(MERGES, pattern="custom", custom_pattern=r"\w+|\s+|[^\w\s]+"
                          ).save(tokenizer)
    step = save_model(tmp_path / "run", scaled_model(vocab_size=264), tokenizer)
    line = refusal(export_cli(runner, "--checkpoint", step, "--format", "gguf",
                              "--out", tmp_path / "gguf"))
    assert "custom split pattern" in line
    assert export_cli(runner, "--checkpoint", step, "--format", "hf",
                      "--out", tmp_path / "hf").exit_code == 0


def test_failure_half_way_leaves_no_folder(runner, tmp_path, base_step, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_model.safetensors.torch, "save_file", broken)
    result = export_cli(runner, "--checkpoint", base_step, "--format", "hf",
                        "--out", tmp_path / "out")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert os.listdir(tmp_path) == []


def test_gguf_export_needs_no_gguf_package(runner, tmp_path, base_step, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # any import of it now fails
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = export_cli(runner, "--checkpoint", base_step, "--format", "gguf",
                        "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert Path(tmp_path / "out" / "model.gguf").read_bytes()[:4] == b"GGUF"
