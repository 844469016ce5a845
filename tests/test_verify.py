"""`fragment verify` and the provenance chain: every artifact verifies, every tamper fails.

One real pipeline is built per module (preprocess -> train-tokenizer -> 4 training steps
of a tiny GPT) in the standard layout `ROOT/data/{processed,tokenizer.json,tokens/<key>}`
plus `ROOT/checkpoints/step-*`. Each tamper test copies it and breaks one thing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from fragment_llm.checkpoint.layout import MODEL_FORMAT
from fragment_llm.checkpoint.load import load_checkpoint, resolve_checkpoint
from fragment_llm.checkpoint.records import model_config_sha256
from fragment_llm.checkpoint.save import _prune, build_manifest
from fragment_llm.checkpoint.tensors import model_tensors
from fragment_llm.cli.app import cli
from fragment_llm.config import ModelConfig, PreprocessConfig, TokenizerConfig, TrainConfig
from fragment_llm.data.preprocess import run_preprocess
from fragment_llm.errors import CheckpointError, DatasetError
from fragment_llm.tokenizer.tokenizer import Tokenizer
from fragment_llm.tokenizer.train import train_tokenizer
from fragment_llm.train.run import TrainRequest, run_training
from fragment_llm.verify import Kind, Status, Upstream, verify

RAW = Path(__file__).resolve().parents[1] / "data" / "raw"
MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32}
TRAIN = {"batch_size": 2, "max_steps": 4, "warmup_steps": 1, "checkpoint_every": 2,
         "eval_every": 0, "eval_blocks": 2, "device": "cpu", "precision": "fp32",
         "workers": 1}
STEP = "checkpoints/step-0000004"


def _request(root: Path, tokenizer: Path | None = None, resume: bool = False) -> TrainRequest:
    return TrainRequest(data=root / "data/processed",
                        tokenizer=tokenizer or root / "data/tokenizer.json",
                        out=root / "checkpoints", model=ModelConfig(**MODEL),
                        train=TrainConfig(**TRAIN), resume=resume)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The quick start in miniature; input roots are absolute, so copies still find them."""
    root = tmp_path_factory.mktemp("pipeline")
    (root / "raw").mkdir()
    for name in ("hamlet_gut.txt", "macbeth_gut.txt"):
        (root / "raw" / name).write_text((RAW / name).read_text()[:12_000])
    run_preprocess([root / "raw"], root / "data/processed", PreprocessConfig(workers=1))
    train_tokenizer(root / "data/processed", root / "data/tokenizer.json",
                    TokenizerConfig(vocab_size=300, workers=1), overwrite=False)
    run_training(_request(root), lambda event: None)
    return root


@pytest.fixture
def copy(built, tmp_path) -> Path:
    shutil.copytree(built, tmp_path / "root", symlinks=True)
    return tmp_path / "root"


def tokens_dir(root: Path) -> Path:
    (folder,) = (root / "data/tokens").iterdir()
    return folder


def run_verify(runner: CliRunner, path: Path, *extra: str):
    return runner.invoke(cli, ["verify", str(path), *extra])


def error_line(result) -> str:
    return next(line for line in result.stderr.splitlines() if line.startswith("error: "))


# ------------------------------------------------------------------ clean artifacts


@pytest.mark.parametrize("target", ["data/processed", "data/tokenizer.json", "tokens",
                                    STEP, "checkpoints"])
def test_every_artifact_of_the_pipeline_verifies(built, runner, target):
    path = tokens_dir(built) if target == "tokens" else built / target
    result = run_verify(runner, path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["checks"]
    # The whole chain is present in the standard layout: nothing is skipped.
    assert {c["status"] for c in report["checks"]} == {"ok"}


def test_a_checkpoint_follows_its_chain_to_the_input_files(built):
    report = verify(built / STEP)
    assert report.kind is Kind.CHECKPOINT and report.ok
    checked = {(c.kind, c.check) for c in report.checks}
    assert {(Kind.CHECKPOINT, "weights layout"), (Kind.CHECKPOINT, "token shards"),
            (Kind.TOKENS, "cache key"), (Kind.TOKENIZER, "trained on processed"),
            (Kind.PROCESSED, "document hashes"), (Kind.INPUTS, "input files")} <= checked
    inputs = next(c for c in report.checks if c.check == "input files")
    assert inputs.detail.startswith("2 match")


def test_run_folder_reports_the_latest_valid_step(built):
    report = verify(built / "checkpoints")
    assert report.kind is Kind.RUN and report.ok
    assert report.latest_valid == built / STEP
    assert {c.artifact for c in report.checks} >= {str(built / "checkpoints/step-0000002"),
                                                   str(built / STEP)}


def test_the_table_lists_each_check(built, runner):
    result = run_verify(runner, built / "data/tokenizer.json")
    assert result.exit_code == 0
    assert "trained on processed" in result.stderr and "FAILED" not in result.stderr


def test_absent_upstream_is_reported_not_failed(built, tmp_path):
    shutil.copytree(built / "checkpoints", tmp_path / "alone" / "checkpoints")
    report = verify(tmp_path / "alone" / STEP)
    assert report.ok
    absent = {c.check for c in report.checks if c.status is Status.ABSENT}
    assert absent == {"tokenizer", "token shards", "processed"}


def test_hints_find_upstream_outside_the_standard_layout(built, tmp_path):
    shutil.copytree(built / "checkpoints", tmp_path / "a" / "checkpoints")
    shutil.copytree(built / "data", tmp_path / "b" / "elsewhere")
    data = tmp_path / "b" / "elsewhere"
    hints = Upstream(processed=data / "processed", tokenizer=data / "tokenizer.json",
                     tokens=data / "tokens")
    report = verify(tmp_path / "a" / STEP, hints)
    assert report.ok and all(c.status is Status.OK for c in report.checks)


# ------------------------------------------------------------------------ tampering


def flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def reseal(step: Path) -> None:
    """Rewrite a step's manifest over its current files, keeping its provenance: only the
    provenance can then tell that something changed."""
    old = json.loads((step / "manifest.json").read_text())
    manifest = build_manifest(step, old["step"], old["provenance"])
    (step / "manifest.json").write_text(manifest.to_json())


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def edit_model_config(step: Path, **values) -> None:
    edit_json(step / "config.json", lambda doc: doc["model"].update(values))
    reseal(step)


def forge_model_config(step: Path, **values) -> None:
    """Edit the config and forge its provenance hash too: only the weights can tell."""
    edit_model_config(step, **values)
    model = json.loads((step / "config.json").read_text())["model"]
    old = json.loads((step / "manifest.json").read_text())
    provenance = {**old["provenance"], "model_config_sha256": model_config_sha256(model)}
    manifest = build_manifest(step, old["step"], provenance)
    (step / "manifest.json").write_text(manifest.to_json())


def swap_checkpoint_tokenizer(step: Path) -> None:
    texts = Tokenizer.load(step / "tokenizer.json").decode(range(256, 300))
    Tokenizer.train([texts] * 3, TokenizerConfig(vocab_size=300, pattern="gpt2")).save(
        step / "tokenizer.json")
    reseal(step)


def swap_data_tokenizer(root: Path) -> None:
    train_tokenizer(root / "data/processed", root / "data/tokenizer.json",
                    TokenizerConfig(vocab_size=290, workers=1), overwrite=True)


def symlink_in_place(path: Path) -> None:
    """Move the file out of its folder and leave a symlink to it in its place."""
    real = path.parent.parent / ("real-" + path.name)
    path.rename(real)
    path.symlink_to(real)


def edit_tokens_manifest(root: Path) -> None:
    edit_json(tokens_dir(root) / "manifest.json",
              lambda doc: doc.update(tokenizer_sha256="0" * 64))


def edit_processed_counts(root: Path) -> None:
    edit_json(root / "data/processed/manifest.json",
              lambda doc: doc["counts"].update(documents=doc["counts"]["documents"] + 1))


# (what to verify, how to break it, words the error line must contain)
TAMPERS: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    "processed shard byte": ("data/processed",
                             lambda r: flip_byte(r / "data/processed/shard-00000.parquet", 100),
                             ("sha256", "shard-00000.parquet")),
    "processed manifest edited": ("data/processed", edit_processed_counts,
                                  ("manifest.json", "counts")),
    "processed shard symlinked": ("data/processed",
                                  lambda r: symlink_in_place(
                                      r / "data/processed/shard-00000.parquet"),
                                  ("symlink", "shard-00000.parquet")),
    "processed changed under the tokenizer": ("data/tokenizer.json", edit_processed_counts,
                                              ("manifest.json",)),
    "tokenizer truncated": ("data/tokenizer.json",
                            lambda r: (r / "data/tokenizer.json").write_text("{"),
                            ("tokenizer.json",)),
    "token shard byte": ("tokens", lambda r: flip_byte(tokens_dir(r) / "train-00000.bin", 4),
                         ("sha256", "train-00000.bin")),
    "token shard missing": ("tokens", lambda r: (tokens_dir(r) / "val-00000.bin").unlink(),
                            ("val-00000.bin",)),
    "token manifest edited": ("tokens", edit_tokens_manifest, ("cache key", "data/tokens")),
    "data tokenizer swapped (tokens)": ("tokens", swap_data_tokenizer,
                                        ("tokenizer", "data/tokenizer.json")),
    "data tokenizer swapped (checkpoint)": (STEP, swap_data_tokenizer,
                                            ("tokenizer", "data/tokenizer.json")),
    "weights byte": (STEP, lambda r: flip_byte(r / STEP / "model.safetensors"),
                     ("sha256 mismatch", "model.safetensors")),
    "optimizer missing": (STEP, lambda r: (r / STEP / "optimizer.safetensors").unlink(),
                          ("missing optimizer.safetensors",)),
    "checkpoint file symlinked": (STEP, lambda r: symlink_in_place(r / STEP / "config.json"),
                                  ("symlink", "config.json")),
    "config edited, manifest resealed": (STEP, lambda r: edit_model_config(r / STEP,
                                                                           dropout=0.25),
                                         ("files and manifest", "model table hashes")),
    "config shapes edited, resealed": (STEP, lambda r: edit_model_config(r / STEP,
                                                                         n_embd=32),
                                       ("files and manifest", "model table hashes")),
    "config shapes and provenance forged": (STEP, lambda r: forge_model_config(r / STEP,
                                                                               n_embd=32),
                                            ("config.json", "model.safetensors")),
    "tokenizer copy swapped, resealed": (STEP, lambda r: swap_checkpoint_tokenizer(r / STEP),
                                         ("tokenizer copy hash", "tokenizer.json")),
    "newest step damaged in a run": ("checkpoints",
                                     lambda r: flip_byte(r / STEP / "trainer_state.json", 5),
                                     ("trainer_state.json",)),
}


@pytest.mark.parametrize("name", TAMPERS)
def test_each_tampered_artifact_is_refused(copy, runner, name):
    target, tamper, words = TAMPERS[name]
    tamper(copy)
    path = tokens_dir(copy) if target == "tokens" else copy / target
    result = run_verify(runner, path)
    assert result.exit_code == 1, result.output
    line = error_line(result)
    for word in words:
        assert word in line, line
    assert "FAILED" in result.stderr  # the table is shown too


def test_damaged_newest_step_leaves_the_older_one_latest(copy):
    flip_byte(copy / STEP / "model.safetensors")
    report = verify(copy / "checkpoints")
    assert not report.ok
    assert report.latest_valid == copy / "checkpoints/step-0000002"


def test_chat_falls_back_from_an_edited_newest_step(copy, runner):
    # Every file hash holds after the reseal; only the provenance shows the edit, and a
    # run folder must then resolve to the older step, as `verify` reports it.
    edit_model_config(copy / STEP, dropout=0.25)
    assert resolve_checkpoint(copy / "checkpoints") == copy / "checkpoints/step-0000002"
    result = runner.invoke(cli, ["generate", "--checkpoint", str(copy / "checkpoints"),
                                 "--prompt", "ROMEO:", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output


def test_input_files_changed_or_gone(tmp_path, runner):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("To be, or not to be, that is the question.\n" * 20)
    (raw / "b.txt").write_text("Tomorrow, and tomorrow, and tomorrow.\n" * 20)
    run_preprocess([raw], tmp_path / "processed", PreprocessConfig(workers=1))
    assert run_verify(runner, tmp_path / "processed").exit_code == 0
    (raw / "a.txt").write_text("To be, or not to be, that is the questioN.\n" * 20)
    result = run_verify(runner, tmp_path / "processed")
    assert result.exit_code == 1
    assert "a.txt" in error_line(result) and "changed since preprocess" in error_line(result)
    (raw / "a.txt").unlink()
    report = verify(tmp_path / "processed")
    assert report.ok
    assert "1 not present" in next(c.detail for c in report.checks if c.check == "input files")


def test_hostile_names_are_escaped(built, tmp_path, runner):
    evil = tmp_path / "evil\x1b]52;c;aGk=\x07"
    shutil.copytree(built / "checkpoints", evil)
    flip_byte(evil / "step-0000004" / "model.safetensors")
    result = run_verify(runner, evil)
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "\\x1b" in result.stderr


def test_unknown_path_is_refused(tmp_path, runner):
    (tmp_path / "empty").mkdir()
    result = run_verify(runner, tmp_path / "empty")
    assert result.exit_code == 1 and "cannot tell which artifact" in error_line(result)
    assert run_verify(runner, tmp_path / "nothing").exit_code == 1


# ------------------------------------------------------- the same checks on load


def test_generate_refuses_a_resealed_config(copy, runner):
    edit_model_config(copy / STEP, dropout=0.25)
    result = runner.invoke(cli, ["generate", "--checkpoint", str(copy / STEP),
                                 "--prompt", "ROMEO:", "--max-new-tokens", "2"])
    assert result.exit_code == 1
    line = error_line(result)
    assert "config.json" in line and "model_config" not in line.split("records")[0]


def test_resume_refuses_another_tokenizer(copy, tmp_path):
    other = tmp_path / "other.json"
    texts = Tokenizer.load(copy / "data/tokenizer.json").decode(range(256, 300))
    Tokenizer.train([texts] * 3, TokenizerConfig(vocab_size=300, pattern="gpt2")).save(other)
    with pytest.raises(CheckpointError) as caught:
        run_training(_request(copy, tokenizer=other, resume=True), lambda event: None)
    recorded = json.loads((copy / STEP / "manifest.json").read_text())["provenance"]
    message = caught.value.message
    assert recorded["tokenizer_sha256"][:16] in message
    assert Tokenizer.load(other).sha256[:16] in message
    assert caught.value.hint and "verify" in caught.value.hint


def test_train_refuses_an_edited_token_manifest(copy):
    edit_tokens_manifest(copy)
    with pytest.raises(DatasetError, match="cache key"):
        run_training(_request(copy, resume=True), lambda event: None)


# ------------------------------------------------- how much of the chain was checked


def test_verify_says_when_the_chain_was_not_followed(built, tmp_path, runner):
    """A run folder copied without its data/: every own check holds, but the links to
    the tokenizer, token shards and processed folder could not be followed."""
    run = tmp_path / "alone" / "r"
    shutil.copytree(built / "checkpoints", run)
    result = run_verify(runner, run)
    assert result.exit_code == 0, result.output
    words = " ".join(result.stderr.split())  # the table wraps the footer
    assert "6 not present; chain NOT verified" in words
    assert "6 link(s) not followed" in words
    assert "--processed DIR, --tokenizer FILE, --tokens DIR" in words
    report = json.loads(run_verify(runner, run, "--json").stdout)
    assert report["ok"] and not report["complete"]
    assert report["note"].startswith("chain NOT verified") and "--tokens DIR" in report["note"]

    strict = run_verify(runner, run, "--strict")
    assert strict.exit_code == 1
    assert "chain NOT verified" in error_line(strict) and "--processed DIR" in strict.stderr
    data = built / "data"
    pointed = run_verify(runner, run, "--strict", "--json", "--processed", str(data / "processed"),
                         "--tokenizer", str(data / "tokenizer.json"),
                         "--tokens", str(data / "tokens"))
    assert pointed.exit_code == 0, pointed.output
    assert json.loads(pointed.stdout)["complete"]


def test_input_files_not_present_make_the_chain_incomplete(tmp_path, runner):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a.txt", "b.txt"):
        (raw / name).write_text(f"{name}: To be, or not to be, that is the question.\n" * 20)
    run_preprocess([raw], tmp_path / "processed", PreprocessConfig(workers=1))
    assert run_verify(runner, tmp_path / "processed", "--strict").exit_code == 0
    (raw / "a.txt").unlink()  # one of two gone: half the inputs unchecked
    result = run_verify(runner, tmp_path / "processed", "--strict")
    assert result.exit_code == 1 and "input files" in error_line(result)
    assert "where the processed manifest records them" in result.stderr


def prune_to_newest(run: Path) -> None:
    """What a trainer with keep_checkpoints = 1 does after saving step 4."""
    _prune(run, 1, 4)


@pytest.mark.parametrize("when", ["after the listing", "while reading its tokenizer copy"])
def test_a_step_pruned_while_being_verified_is_removed_not_damaged(copy, runner,
                                                                   monkeypatch, when):
    """A trainer pruning old checkpoints renames a step away while verify reads it:
    a step gone is reported as removed, and the run still verifies."""
    import fragment_llm.verify as verify_module

    run, old = copy / "checkpoints", copy / "checkpoints/step-0000002"
    if when == "after the listing":
        real = load_checkpoint

        def prune_first(path, **kwargs):
            if path == old:
                prune_to_newest(run)
            return real(path, **kwargs)

        monkeypatch.setattr(verify_module, "load_checkpoint", prune_first)
    else:
        real = verify_module._load_tokenizer

        def prune_then_load(path):
            if path.parent == old:
                prune_to_newest(run)
            return real(path)

        monkeypatch.setattr(verify_module, "_load_tokenizer", prune_then_load)
    result = run_verify(runner, run, "--json", "--strict")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert not old.exists() and report["ok"] and report["complete"]
    assert report["latest_valid"] == str(copy / STEP)
    mine = [c for c in report["checks"] if c["artifact"] == str(old)]
    assert [(c["check"], c["status"]) for c in mine] == [("step folder", "removed")]
    assert "removed while being verified" in mine[0]["detail"]


def test_a_step_saved_while_every_listed_one_is_pruned_is_verified(copy, runner,
                                                                  monkeypatch):
    """Verify listed only step 2; meanwhile the trainer saved step 4 and pruned step 2.
    The run folder is listed again, and step 4 is its latest valid step."""
    import fragment_llm.verify as verify_module

    run, saved = copy / "checkpoints", copy / "step-0000004"
    (run / "step-0000004").rename(saved)  # not there yet when verify lists the run
    real = verify_module._load_tokenizer

    def save_and_prune(path):
        if saved.exists():
            saved.rename(run / "step-0000004")
            prune_to_newest(run)
        return real(path)

    monkeypatch.setattr(verify_module, "_load_tokenizer", save_and_prune)
    result = run_verify(runner, run, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["latest_valid"] == str(copy / STEP)
    statuses = {c["artifact"]: c["status"] for c in report["checks"]
                if c["check"] in ("step folder", "files and manifest")}
    assert statuses == {str(run / "step-0000002"): "removed", str(copy / STEP): "ok"}


@pytest.mark.slow
def test_verify_while_a_real_trainer_prunes_every_step(built, tmp_path):
    """The issue's race for real: a trainer saving every step and keeping 2 while verify
    checks the run folder over and over. No run may fail (on the old code most did:
    "tokenizer copy: file not found", or an internal FileNotFoundError)."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    (tmp_path / "cfg.toml").write_text(
        "[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 32\n"
        "[train]\nbatch_size = 2\nwarmup_steps = 1\ncheckpoint_every = 1\n"
        "keep_checkpoints = 2\neval_every = 0\neval_blocks = 2\ndevice = 'cpu'\n"
        "precision = 'fp32'\nworkers = 1\n")
    trainer = subprocess.Popen(  # noqa: S603 (our own CLI, fixed arguments)
        [sys.executable, "-m", "fragment_llm", "-q", "train", "--config",
         str(tmp_path / "cfg.toml"), "--data", str(built / "data/processed"),
         "--tokenizer", str(built / "data/tokenizer.json"), "--out", str(out),
         "--max-steps", "150"])
    runs, passed = 0, 0
    try:
        while trainer.poll() is None:
            if not any(out.glob("step-*")):
                time.sleep(0.05)
                continue
            report = verify(out, Upstream(tokens=built / "data/tokens"))
            runs += 1
            passed += report.ok
            # No step is ever called damaged; at this rate (a save every ~50 ms) a run
            # may rarely find that no step stayed long enough, and says so.
            for failure in report.failures:
                assert failure.check == "latest valid", failure
                assert "no step stayed long enough" in failure.detail
    finally:
        trainer.kill()
        trainer.wait()
    assert runs >= 10 and passed >= runs * 0.8, (passed, runs)


def test_a_step_folder_removed_while_verified_alone_is_not_verified(copy, runner,
                                                                    monkeypatch):
    import fragment_llm.verify as verify_module

    real = verify_module._load_tokenizer

    def prune_then_load(path):
        prune_to_newest(copy / "checkpoints")
        return real(path)

    monkeypatch.setattr(verify_module, "_load_tokenizer", prune_then_load)
    result = run_verify(runner, copy / "checkpoints/step-0000002")
    assert result.exit_code == 1
    assert "removed while being verified" in error_line(result)


# -------------------------------------------------------- what a config.json implies


def forge_deep_long_model(step: Path) -> None:
    """The issue's recipe: a real 256-layer, 32-wide model (its weights a few MB) with a
    131,072-token context (RoPE adds no parameters), provenance forged, manifest
    re-sealed. The parameter count and every tensor shape agree with config.json."""
    import safetensors.torch

    from fragment_llm.model.gpt import GPT

    model = json.loads((step / "config.json").read_text())["model"]
    model.update(n_layer=256, n_embd=32, n_head=2, mlp_hidden=8, block_size=131072)
    tensors, aliases = model_tensors(GPT(ModelConfig(**model)))
    safetensors.torch.save_file(tensors, step / "model.safetensors", metadata={
        "format": MODEL_FORMAT, "aliases": json.dumps(aliases)})
    (step / "optimizer.safetensors").unlink()
    forge_model_config(step, **model)


def test_a_config_that_plans_too_much_memory_is_refused(copy, runner):
    step = copy / STEP
    forge_deep_long_model(step)
    assert (step / "model.safetensors").stat().st_size < 6 << 20
    result = runner.invoke(cli, ["generate", "--checkpoint", str(step), "--prompt", "ROMEO:",
                                 "--max-new-tokens", "2"])
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert "config.json plans" in line and "MiB to generate" in line
    assert "over the limit of" in line and str(step / "config.json") in line
    assert "hint:" in result.stderr
    verified = run_verify(runner, step)
    assert verified.exit_code == 1
    assert "memory plan" in error_line(verified) and "config.json plans" in error_line(verified)


def test_the_memory_plan_row_of_a_clean_checkpoint(built):
    report = verify(built / STEP)
    (row,) = [c for c in report.checks if c.check == "memory plan"]
    assert row.status is Status.OK and "within the" in row.detail


# ------------------------------------------------------------------ NaN and inf


def poison(path: Path, value: float) -> str:
    """Set one value of the first floating tensor with a shape to `value`, keeping the
    file's metadata; returns the tensor's name."""
    import safetensors.torch
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = safetensors.torch.load_file(path)
    name = sorted(n for n, t in tensors.items() if t.is_floating_point() and t.dim())[0]
    tensors[name].view(-1)[-1] = value
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(copy, runner, value):
    step = copy / STEP
    name = poison(step / "model.safetensors", value)
    reseal(step)
    result = runner.invoke(cli, ["generate", "--checkpoint", str(step), "--prompt", "ROMEO:",
                                 "--max-new-tokens", "2"])
    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert f"tensor {name!r} holds NaN or inf" in line and "model.safetensors" in line
    verified = run_verify(runner, step)
    assert verified.exit_code == 1 and "holds NaN or inf" in error_line(verified)
    # As with any damaged step, a run folder falls back to the previous one.
    assert verify(copy / "checkpoints").latest_valid == copy / "checkpoints/step-0000002"
    assert resolve_checkpoint(copy / "checkpoints") == copy / "checkpoints/step-0000002"


def test_non_finite_optimizer_state_is_refused_for_resume(copy, runner):
    step = copy / STEP
    poison(step / "optimizer.safetensors", float("nan"))
    reseal(step)
    with pytest.raises(CheckpointError, match="holds NaN or inf.*optimizer.safetensors"):
        load_checkpoint(step)
    verified = run_verify(runner, step)
    assert verified.exit_code == 1 and "optimizer.safetensors" in error_line(verified)
