"""The adapter artifact as hostile input: each way an adapter step folder can be wrong is
refused in one line (a CheckpointError) by `load_adapter`, `load_tuned` or `apply_adapter`;
and a sound adapter gives exactly the model that attaching and loading its tensors gives.

Where a case must get past the sha256 checks to reach a deeper rule, the test re-seals
the manifest over the edited file, as an attacker who edits both would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fragment_llm.checkpoint.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    ADAPTER_FORMAT,
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    TOKENIZER_FILE,
    TRAINER_STATE_FILE,
)
from fragment_llm.checkpoint.load import Checkpoint, open_checkpoint
from fragment_llm.checkpoint.records import model_config_sha256
from fragment_llm.checkpoint.save import build_manifest, save_checkpoint
from fragment_llm.checkpoint.trained import load_trained
from fragment_llm.cli.app import cli
from fragment_llm.config import SPECIAL_TOKENS_CHAT_FORMAT, ModelConfig
from fragment_llm.errors import CheckpointError
from fragment_llm.finetune.adapters import (
    MAX_RANK,
    AdapterSpec,
    adapter_tensors,
    attach_adapters,
    load_adapter_tensors,
)
from fragment_llm.finetune.artifact import (
    adapter_record,
    adapter_weights,
    apply_adapter,
    load_adapter,
    load_tuned,
)
from fragment_llm.model.gpt import GPT
from fragment_llm.safety.files import sha256_file
from tests.helpers import CHAT_VOCAB, TINY_GPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECS = {"lora": AdapterSpec(method="lora", rank=4, alpha=8.0),
         "dora": AdapterSpec(method="dora", rank=4, alpha=8.0)}
ADAPTER_FILES = [ADAPTER_FILE, ADAPTER_CONFIG_FILE, TRAINER_STATE_FILE, OPTIMIZER_FILE,
                 CONFIG_FILE, TOKENIZER_FILE, MANIFEST_FILE]
IDS = torch.randint(0, CHAT_VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ building adapters


def save_adapter(run: Path, base: Path, spec: AdapterSpec, *, zero_b: bool = False) -> Path:
    """An adapter step folder for `base`, as a LoRA/DoRA fine-tuning run writes one: the
    adapter's tensors and config, AdamW's state, the records and the base's tokenizer
    copy. With `zero_b`, the adapter as attached (B = 0) and an optimizer not yet stepped."""
    checkpoint = open_checkpoint(base)
    model = load_trained(base).model
    torch.manual_seed(0)
    attach_adapters(model, spec)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if not zero_b:  # B random, then one step: every tensor moved, the optimizer has moments
        with torch.no_grad():
            for name, tensor in adapter_tensors(model).items():
                if name.endswith("lora_B"):
                    tensor.normal_(std=0.1)
        model(IDS).float().square().mean().backward()
        optimizer.step()
    provenance = {"tokenizer_sha256": sha256_file(checkpoint.tokenizer_path, CheckpointError),
                  "model_config_sha256": model_config_sha256(checkpoint.config.model),
                  "base_manifest_sha256": checkpoint.manifest_sha256}
    return save_checkpoint(
        run, 3, model=None, optimizer=optimizer, trainer_state={"step": 3},
        config={"model": checkpoint.config.model, "chat_format": SPECIAL_TOKENS_CHAT_FORMAT},
        tokenizer_file=checkpoint.tokenizer_path, provenance=provenance,
        adapter=adapter_weights(model, adapter_record(spec, checkpoint)))


@pytest.fixture(scope="module")
def templates(tmp_path_factory, checkpoint) -> dict[str, Path]:
    """A LoRA and a DoRA adapter step folder for the session's tiny `checkpoint`. Read only."""
    root = tmp_path_factory.mktemp("adapters")
    return {method: save_adapter(root / method, checkpoint, spec)
            for method, spec in SPECS.items()}


@pytest.fixture(params=sorted(SPECS))
def adapter(request, templates, tmp_path) -> Path:
    """A private copy of one template (LoRA, then DoRA), ready to be vandalised."""
    template = templates[request.param]
    return Path(shutil.copytree(template, tmp_path / "adapter-run" / template.name))


@pytest.fixture
def lora(templates, tmp_path) -> Path:
    """A private copy of the LoRA template, for the rules that do not depend on the method."""
    template = templates["lora"]
    return Path(shutil.copytree(template, tmp_path / "lora-run" / template.name))


@pytest.fixture(scope="module")
def other_base(tmp_path_factory, chat_tokenizer) -> Path:
    """A checkpoint of exactly the base's config and tokenizer, other weights."""
    torch.manual_seed(1)
    model = GPT(ModelConfig(**{**TINY_GPT, "vocab_size": CHAT_VOCAB, "block_size": 64}))
    return save_checkpoint(tmp_path_factory.mktemp("other") / "run", 7, model=model,
                           optimizer=None, trainer_state={"step": 7},
                           config={"model": model.config.model_dump(mode="json")},
                           tokenizer_file=chat_tokenizer)


# ------------------------------------------------------------------ vandalising them


def reseal(folder: Path) -> None:
    """Rebuild manifest.json over the files as they are now (same step and provenance)."""
    old = json.loads((folder / MANIFEST_FILE).read_text())
    (folder / MANIFEST_FILE).write_text(
        build_manifest(folder, old["step"], old["provenance"]).to_json())


def rewrite_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = safetensors.torch.load((folder / ADAPTER_FILE).read_bytes())
    change(tensors)
    safetensors.torch.save_file(tensors, folder / ADAPTER_FILE,
                                metadata={"format": ADAPTER_FORMAT})
    reseal(folder)


def rewrite_config(folder: Path, change: Callable[[dict[str, object]], object]) -> None:
    doc = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
    change(doc)
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(doc))
    reseal(folder)


def refused(rule: str, load: Callable[[], object]) -> CheckpointError:
    """`load()` raises a CheckpointError matching `rule`, in one line."""
    with pytest.raises(CheckpointError, match=rule) as info:
        load()
    assert "\n" not in info.value.message and "\x1b" not in info.value.message
    return info.value


@contextlib.contextmanager
def adapter_data_unread() -> Iterator[None]:
    """Refusals from the adapter's header alone: its tensor data is never read (the base's
    weights still load as usual)."""
    original = Checkpoint.read_weights

    def guarded(self: Checkpoint) -> dict[str, torch.Tensor]:
        if self.is_adapter:
            raise AssertionError("adapter tensor data was read before the header was checked")
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Checkpoint, "read_weights", guarded)
        yield


def short(digest: str) -> str:
    return digest[:16] + "…"


# ------------------------------------------------------------------ a sound adapter


@pytest.mark.parametrize("method", sorted(SPECS))
def test_load_tuned_is_the_base_with_the_adapters_tensors_attached(templates, checkpoint,
                                                                   method):
    tuned = load_tuned(checkpoint, templates[method])
    manual = load_trained(checkpoint).model
    attach_adapters(manual, SPECS[method])
    load_adapter_tensors(manual, safetensors.torch.load_file(templates[method] / ADAPTER_FILE))
    manual.eval()
    with torch.no_grad():
        expected, got, base = manual(IDS), tuned.model(IDS), load_trained(checkpoint).model(IDS)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter really changes outputs
    assert tuned.chat_format == SPECIAL_TOKENS_CHAT_FORMAT
    assert not tuned.model.training


def test_without_a_base_the_one_the_adapter_recorded_is_used(templates, checkpoint):
    tuned = load_tuned(None, templates["lora"])
    assert tuned.checkpoint.path == checkpoint
    assert tuned.adapter is not None and tuned.adapter.base_path == checkpoint


@pytest.mark.parametrize("method", sorted(SPECS))
def test_an_adapter_with_b_zero_leaves_the_base_outputs(checkpoint, tmp_path, method):
    folder = save_adapter(tmp_path / "run", checkpoint, SPECS[method], zero_b=True)
    tensors = safetensors.torch.load_file(folder / ADAPTER_FILE)
    assert all(not t.any() for name, t in tensors.items() if name.endswith("lora_B"))
    with torch.no_grad():
        tuned, base = load_tuned(checkpoint, folder).model(IDS), load_trained(checkpoint).model(IDS)
    if method == "lora":
        assert torch.equal(tuned, base)
    else:  # m / ||W|| is 1 up to rounding
        torch.testing.assert_close(tuned, base, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the wrong base


def test_an_adapter_against_another_base_names_both_hashes(lora, checkpoint, other_base):
    recorded = open_checkpoint(checkpoint).manifest_sha256
    actual = open_checkpoint(other_base).manifest_sha256
    assert recorded != actual
    error = refused(f"manifest hashes to {short(recorded)}, but .* hashes to {short(actual)}",
                    lambda: load_tuned(other_base, lora))
    assert str(lora) in error.message and error.hint


def test_a_forged_base_config_hash_is_refused(lora, checkpoint):
    rewrite_config(lora, lambda d: d.update(base_model_config_sha256="0" * 64))
    refused("was trained on another model config than", lambda: load_tuned(checkpoint, lora))


@pytest.mark.parametrize("recorded", ["/dev/zero", "/nonexistent/base", "/"])
def test_a_recorded_base_that_is_no_checkpoint_is_refused(lora, recorded):
    rewrite_config(lora, lambda d: d.update(base_checkpoint=recorded))
    refused("not a checkpoint folder|checkpoint not found|no valid checkpoint",
            lambda: load_tuned(None, lora))


# ------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("name", ADAPTER_FILES)
def test_a_flipped_byte_in_each_file_is_refused(adapter, checkpoint, name):
    path = adapter / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    rule = "manifest" if name == MANIFEST_FILE else f"sha256 mismatch for {name}"
    refused(rule, lambda: load_adapter(adapter))
    refused(rule, lambda: load_tuned(checkpoint, adapter))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(adapter, value):
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        name = sorted(tensors)[-1]
        tensors[name].view(-1)[-1] = value
    rewrite_tensors(adapter, poison)
    refused("holds NaN or inf, in .*adapter.safetensors", lambda: load_adapter(adapter))


# ------------------------------------------------------------------ ranks and shapes


def test_a_rank_over_the_cap_is_refused(adapter):
    rewrite_config(adapter, lambda d: d.update(rank=MAX_RANK + 1))
    refused(f"invalid adapter config: rank: .*{MAX_RANK}, in .*adapter_config.json",
            lambda: load_adapter(adapter))


def test_a_rank_that_disagrees_with_the_tensors_is_refused_unread(adapter, checkpoint):
    rewrite_config(adapter, lambda d: d.update(rank=2))
    with adapter_data_unread():
        refused(r"lora_A has shape \[4, 32\], the base and rank 2 need \[2, 32\]",
                lambda: load_tuned(checkpoint, adapter))


def test_shapes_that_do_not_fit_the_base_are_refused_unread(adapter, checkpoint):
    name = "blocks.0.attn.qkv.lora_A"
    rewrite_tensors(adapter, lambda t: t.update({name: torch.zeros(4, 48)}))
    with adapter_data_unread():
        refused(rf"{name} has shape \[4, 48\], the base and rank 4 need \[4, 32\]",
                lambda: load_tuned(checkpoint, adapter))


def test_an_adapter_for_a_wider_model_is_refused_before_anything_is_attached(adapter):
    config = ModelConfig(**{**TINY_GPT, "n_embd": 64, "vocab_size": CHAT_VOCAB,
                            "block_size": 64})
    model = GPT(config)
    with adapter_data_unread():
        refused(r"has shape \[.*\], the base and rank 4 need",
                lambda: apply_adapter(model, load_adapter(adapter), config))
    assert not adapter_tensors(model)  # nothing attached


@pytest.mark.parametrize(("change", "rule"), [
    (lambda t: t.update({"blocks.0.attn.qkv.lora_C": torch.zeros(1)}),
     "unexpected adapter tensor blocks.0.attn.qkv.lora_C"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(CHAT_VOCAB, 32)}),
     "unexpected adapter tensor lm_head.weight"),
    (lambda t: t.pop("blocks.1.mlp.proj.lora_B"), "adapter lacks blocks.1.mlp.proj.lora_B"),
])
def test_an_extra_or_a_missing_tensor_is_refused_unread(adapter, checkpoint, change, rule):
    rewrite_tensors(adapter, change)
    with adapter_data_unread():
        refused(rule, lambda: load_tuned(checkpoint, adapter))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_a_tensor_that_is_not_float32_is_refused_unread(adapter, checkpoint, dtype):
    name = "blocks.0.mlp.fc.lora_A"
    rewrite_tensors(adapter, lambda t: t.update({name: t[name].to(dtype)}))
    with adapter_data_unread():
        refused(f"adapter tensor {name} is not float32", lambda: load_tuned(checkpoint, adapter))


def test_adapter_metadata_of_another_format_is_refused(lora):
    tensors = safetensors.torch.load((lora / ADAPTER_FILE).read_bytes())
    safetensors.torch.save_file(tensors, lora / ADAPTER_FILE,
                                metadata={"format": "fragment-model", "aliases": "{}"})
    reseal(lora)
    refused("adapter __metadata__ must be exactly", lambda: load_adapter(lora))


# ------------------------------------------------------------------ the folder itself


def test_a_symlinked_adapter_folder_is_refused(lora, tmp_path):
    for link, target in [(tmp_path / "step-0000009", lora), (tmp_path / "linked-run", lora.parent)]:
        link.symlink_to(target, target_is_directory=True)
        refused("refusing to follow a symlink", lambda link=link: load_adapter(link))


def test_a_symlinked_file_inside_the_adapter_is_refused(lora, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(lora / ADAPTER_FILE, outside)
    (lora / ADAPTER_FILE).symlink_to(outside)
    refused("refusing to follow a symlink: adapter.safetensors", lambda: load_adapter(lora))


def test_a_step_folder_with_both_a_model_and_an_adapter_is_refused(lora, checkpoint):
    shutil.copy(checkpoint / MODEL_FILE, lora / MODEL_FILE)
    reseal(lora)
    refused("both model.safetensors and adapter.safetensors", lambda: load_adapter(lora))
    refused("both model.safetensors and adapter.safetensors",
            lambda: load_tuned(checkpoint, lora))


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter.pt", "optimizer.pkl"])
def test_a_planted_pickle_is_refused(lora, name):
    (lora / name).write_bytes(b"\x80\x04cos\nsystem\n.")
    refused(f"refusing {name}: pickle-capable formats are never loaded",
            lambda: load_adapter(lora))


# ------------------------------------------------------------------ adapter_config.json


@pytest.mark.parametrize(("change", "rule"), [
    (lambda d: d.update(signed_by="me"), "signed_by: Extra inputs are not permitted"),
    (lambda d: d.update({"evil\n\x1b]52;c;aGk=\x07": 1}), r"evil\\x0a\\x1b\]52"),
    (lambda d: d.update(format="peft"), "format: Input should be 'fragment-adapter'"),
    (lambda d: d.update(version=2), "version: Input should be 1"),
    (lambda d: d.update(version="1"), "version: Input should be 1"),
    (lambda d: d.update(method="ia3"), "method: Input should be 'lora' or 'dora'"),
    (lambda d: d.update(targets=["qkv", "lm_head"]), "targets.1: Input should be"),
    (lambda d: d.update(targets=[]), "targets: List should have at least 1 item"),
    (lambda d: d.update(rank=True), "rank: Input should be a valid integer"),
    (lambda d: d.update(rank=0), "rank: Input should be greater than or equal to 1"),
    (lambda d: d.update(alpha=-8.0), "alpha: Input should be greater than 0"),
    (lambda d: d.update(dropout=1.0), "dropout: Input should be less than 1"),
    (lambda d: d.update(base_checkpoint="caf\u00e9/base"), "base_checkpoint: String should"),
    (lambda d: d.update(base_checkpoint="base\x1b[2J"), "base_checkpoint: String should"),
    (lambda d: d.update(base_manifest_sha256="../" * 21 + "x"), "base_manifest_sha256: String"),
    (lambda d: d.pop("base_manifest_sha256"), "base_manifest_sha256: Field required"),
])
def test_an_invalid_adapter_config_is_refused(lora, change, rule):
    rewrite_config(lora, change)
    error = refused(f"invalid adapter config: {rule}", lambda: load_adapter(lora))
    assert error.message.endswith(f"in {lora / ADAPTER_CONFIG_FILE}")


@pytest.mark.parametrize(("content", "rule"), [
    (b"[" * 5000 + b"]" * 5000, "nested deeper than"),
    (b'{"rank": 4, "rank": 4}', "duplicate key 'rank'"),
    (b'{"alpha": NaN}', "non-standard JSON constant NaN"),
    (b"[1, 2]", "adapter_config.json must hold a JSON object"),
    (b'"lora"', "adapter_config.json must hold a JSON object"),
    (b'{"method": "caf\xe9"}', "invalid UTF-8"),
])
def test_adapter_config_that_is_no_safe_json_object_is_refused(lora, content, rule):
    (lora / ADAPTER_CONFIG_FILE).write_bytes(content)
    reseal(lora)
    refused(rule, lambda: load_adapter(lora))


# ------------------------------------------------------------------ the wrong kind of folder


def test_a_model_checkpoint_given_as_the_adapter_is_refused(checkpoint):
    refused("holds a whole model, not an adapter", lambda: load_adapter(checkpoint))
    refused("holds a whole model, not an adapter", lambda: load_tuned(checkpoint, checkpoint))


def test_an_adapter_given_as_the_base_is_refused(lora):
    for load in (lambda: load_trained(lora), lambda: load_tuned(lora, None),
                 lambda: load_tuned(lora, lora)):
        error = refused("holds an adapter, not a model", load)
        assert "--adapter" in error.hint


def test_through_the_cli_an_adapter_as_checkpoint_or_base_is_one_line(runner, lora, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n")
    for args in (["generate", "--checkpoint", str(lora), "--prompt", "hi"],
                 ["finetune", "--base", str(lora), "--data", str(data),
                  "--out", str(tmp_path / "out")]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and "adapter" in lines[0] and len(lines) <= 2
        assert "Traceback" not in result.output and result.stdout == ""
    assert not (tmp_path / "out" / "step-0000001").exists()


# ------------------------------------------------------------------ --adapter on the CLI


def has_adapter_flag(verb: str) -> bool:
    return any(param.name == "adapter" or "--adapter" in getattr(param, "opts", [])
               for param in cli.commands[verb].params)


def flip_middle_byte(folder: Path) -> None:
    path = folder / ADAPTER_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "rule"), [
    (flip_middle_byte, "sha256 mismatch for adapter.safetensors"),
    (lambda f: rewrite_config(f, lambda d: d.update(rank=MAX_RANK + 1)), "rank"),
    (lambda f: rewrite_tensors(f, lambda t: t["blocks.0.mlp.fc.lora_B"].fill_(float("nan"))),
     "NaN or inf"),
])
def test_through_the_cli_a_hostile_adapter_is_one_line(runner, checkpoint, lora, damage,
                                                       rule):
    if not has_adapter_flag("generate"):
        pytest.skip("`fragment generate --adapter` is not there yet")
    damage(lora)
    result = runner.invoke(cli, ["generate", "--checkpoint", str(checkpoint),
                                 "--adapter", str(lora), "--prompt", "hi"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and rule in lines[0] and len(lines) <= 2
    assert "Traceback" not in result.output and result.stdout == ""


def test_through_the_cli_an_adapter_for_another_base_is_one_line(runner, lora, other_base):
    if not has_adapter_flag("generate"):
        pytest.skip("`fragment generate --adapter` is not there yet")
    result = runner.invoke(cli, ["generate", "--checkpoint", str(other_base),
                                 "--adapter", str(lora), "--prompt", "hi"])
    assert result.exit_code == 1 and "manifest hashes to" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_a_fifo_as_the_adapter_does_not_hang(tmp_path, no_hang):
    os.mkfifo(tmp_path / "step-0000001")
    refused("not a checkpoint folder", lambda: load_adapter(tmp_path / "step-0000001"))
