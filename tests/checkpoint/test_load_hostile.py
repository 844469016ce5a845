"""checkpoint: one test per hostile folder. Each must raise CheckpointError naming the rule.

Where a case needs to get past the sha256 checks to reach a deeper rule, the test
re-seals the manifest over the modified file, as an attacker who edits both would.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import fragment_llm.checkpoint.load as checkpoint_load
from fragment_llm.checkpoint.layout import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    REQUIRED_FILES,
    TRAINER_STATE_FILE,
    _step_of,
)
from fragment_llm.checkpoint.load import load_checkpoint, resolve_checkpoint
from fragment_llm.checkpoint.records import Manifest
from fragment_llm.checkpoint.save import build_manifest, save_checkpoint
from fragment_llm.checkpoint.tensors import read_safetensors_header
from fragment_llm.errors import CheckpointError

VOCAB, DIM = 11, 4


class TinyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, DIM)
        self.ln = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied


@pytest.fixture(scope="module")
def template(tmp_path_factory, tokenizer_file) -> Path:
    """A valid checkpoint (model + stepped AdamW), saved once per module."""
    tmp = tmp_path_factory.mktemp("template")
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.head(model.ln(model.wte(torch.tensor([1, 2, 3])))).sum().backward()
    opt.step()
    return save_checkpoint(tmp / "run", 1, model=model, optimizer=opt,
                              trainer_state={"step": 1}, config={"vocab": VOCAB},
                              tokenizer_file=tokenizer_file)


@pytest.fixture
def folder(template: Path, tmp_path: Path) -> Path:
    """A private copy of the template, ready to be vandalised."""
    return Path(shutil.copytree(template, tmp_path / "run" / template.name))


def reseal(folder: Path) -> None:
    manifest = build_manifest(folder, _step_of(folder), {})
    (folder / MANIFEST_FILE).write_text(manifest.to_json())


def refused(folder: Path, rule: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=rule) as info:
        load_checkpoint(folder)
    return info.value


def st_blob(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file by hand: 8-byte LE header length, header JSON, data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def install_model(folder: Path, blob: bytes) -> None:
    (folder / MODEL_FILE).write_bytes(blob)
    reseal(folder)


MODEL_META = {"format": "fragment-model", "aliases": "{}"}


def f32(shape: list[int], begin: int) -> dict:
    n = 4
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


# ------------------------------------------------------------------ flipped bytes


@pytest.mark.parametrize("name", sorted(REQUIRED_FILES | {OPTIMIZER_FILE}))
@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_flipped_byte_in_each_file_is_refused(folder, name, where):
    path = folder / name
    data = bytearray(path.read_bytes())
    data[int(len(data) * where) if isinstance(where, float) else where] ^= 0x01
    path.write_bytes(bytes(data))
    refused(folder, f"sha256 mismatch for {name}")


def test_every_flipped_byte_in_the_manifest_is_refused(folder):
    # The manifest is not hashed by anything else; its own checksum must catch these.
    path = folder / MANIFEST_FILE
    original = path.read_bytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, byte in enumerate(original):
            os.pwrite(fd, bytes([byte ^ 0x01]), offset)
            with pytest.raises(CheckpointError, match="manifest"):
                load_checkpoint(folder)
            os.pwrite(fd, bytes([byte]), offset)
    finally:
        os.close(fd)
    load_checkpoint(folder)


# ------------------------------------------------------------------------ manifest


def edit_manifest(folder: Path, change) -> None:
    path = folder / MANIFEST_FILE
    doc = json.loads(path.read_text())
    change(doc)
    doc["checksum"] = Manifest.body_checksum(doc)  # a careful forger re-seals
    path.write_text(json.dumps(doc))


def test_missing_manifest(folder):
    (folder / MANIFEST_FILE).unlink()
    refused(folder, "missing manifest.json")


def test_manifest_extra_key(folder):
    edit_manifest(folder, lambda d: d.update(signed_by="me"))
    refused(folder, "signed_by: Extra inputs are not permitted")


def test_manifest_missing_key(folder):
    edit_manifest(folder, lambda d: d.pop("files"))
    refused(folder, "files: Field required")


def test_manifest_wrong_format(folder):
    edit_manifest(folder, lambda d: d.update(format="other-checkpoint"))
    refused(folder, "manifest breaks the schema \\(format")


def test_manifest_wrong_version(folder):
    edit_manifest(folder, lambda d: d.update(version=2))
    refused(folder, "manifest breaks the schema \\(version")


def test_manifest_version_as_string(folder):
    edit_manifest(folder, lambda d: d.update(version="1"))
    refused(folder, "version")


def test_manifest_nested_100000_deep(folder):
    (folder / MANIFEST_FILE).write_text("[" * 100_000 + "]" * 100_000)
    refused(folder, "nested deeper than")


def test_manifest_duplicate_key(folder):
    path = folder / MANIFEST_FILE
    path.write_text(path.read_text().replace('"step": 1,', '"step": 1, "step": 1,'))
    refused(folder, "duplicate key 'step'")


def test_manifest_step_disagrees_with_folder_name(folder):
    edit_manifest(folder, lambda d: d.update(step=2))
    refused(folder, "manifest says step 2 but the folder is step-0000001")


def test_manifest_unknown_file_name(folder):
    edit_manifest(folder, lambda d: d["files"].update({"../escape": d["files"]["config.json"]}))
    refused(folder, "files.../escape")


def test_manifest_size_mismatch(folder):
    edit_manifest(folder, lambda d: d["files"]["config.json"].update(size=1))
    refused(folder, "size mismatch for config.json")


def test_manifest_lists_an_absent_file(folder):
    (folder / OPTIMIZER_FILE).unlink()
    refused(folder, "missing optimizer.safetensors")


def test_missing_required_file(folder):
    (folder / CONFIG_FILE).unlink()
    reseal(folder)
    refused(folder, "missing config.json")


def test_file_not_listed_in_manifest(folder):
    edit_manifest(folder, lambda d: d["files"].pop("optimizer.safetensors"))
    refused(folder, "optimizer.safetensors not listed in the manifest")


# --------------------------------------------------------- symlinks, specials, pickles


def test_symlinked_file_inside_the_folder(folder, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_bytes((folder / CONFIG_FILE).read_bytes())
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).symlink_to(outside)
    refused(folder, "refusing to follow a symlink: config.json")


def test_step_folder_itself_a_symlink(folder, tmp_path):
    link = tmp_path / "step-0000002"
    link.symlink_to(folder, target_is_directory=True)
    refused(link, "refusing to follow a symlink")
    with pytest.raises(CheckpointError, match="symlink"):
        resolve_checkpoint(link)


@pytest.mark.parametrize("name", ["evil.pkl", "model.pt", "weights.bin", "optimizer.pth",
                                  "MODEL.PT"])
def test_pickle_capable_files_are_refused(folder, name):
    (folder / name).write_bytes(b"\x80\x04cos\nsystem\n.")
    refused(folder, f"refusing {name}: pickle-capable formats are never loaded")


def test_unknown_file(folder):
    (folder / "notes.txt").write_text("hi")
    refused(folder, "unexpected file 'notes.txt'")


def test_folder_in_place_of_a_file(folder):
    (folder / CONFIG_FILE).unlink()
    (folder / CONFIG_FILE).mkdir()
    refused(folder, "config.json is not a regular file")


def test_fifo_in_place_of_a_file_does_not_hang(folder):
    (folder / TRAINER_STATE_FILE).unlink()
    os.mkfifo(folder / TRAINER_STATE_FILE)
    outcome: list[BaseException] = []

    def attempt():
        try:
            load_checkpoint(folder)
        except CheckpointError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "a FIFO blocked the loader"
    assert "trainer_state.json is not a regular file" in str(outcome[0])


def test_oversized_file_refused_before_hashing(folder):
    with pytest.raises(CheckpointError, match="file too large"):
        load_checkpoint(folder, max_bytes=64)


# --------------------------------------------------------------- safetensors headers


def test_file_shorter_than_header_length(folder):
    install_model(folder, b"\x01\x00")
    refused(folder, "shorter than its 8-byte header length")


def test_header_length_larger_than_file(folder):
    install_model(folder, st_blob({"__metadata__": MODEL_META}, length=10_000))
    refused(folder, "header length 10000 does not fit in the")


def test_header_length_absurd(folder):
    install_model(folder, st_blob(b"{}", length=2**63))
    refused(folder, f"header length {2**63} exceeds the")


def test_header_not_json(folder):
    install_model(folder, st_blob(b"not json at all"))
    refused(folder, "invalid JSON .*safetensors header")


def test_header_not_utf8(folder):
    install_model(folder, st_blob(b'{"\xff": 1}'))
    refused(folder, "invalid UTF-8")


def test_header_not_an_object(folder):
    install_model(folder, st_blob(b"[1, 2]"))
    refused(folder, "header is not a JSON object")


def test_duplicate_tensor_names(folder):
    # The library keeps the last duplicate silently; we refuse the file.
    entry = json.dumps(f32([1], 0))
    header = f'{{"__metadata__": {json.dumps(MODEL_META)}, "w": {entry}, "w": {entry}}}'
    install_model(folder, st_blob(header.encode(), b"\x00" * 4))
    refused(folder, "duplicate key 'w'")


def test_offsets_overlapping(folder):
    header = {"a": f32([2], 0), "b": f32([2], 4)}
    install_model(folder, st_blob(header, b"\x00" * 12))
    refused(folder, "tensor 'b' data_offsets overlap another tensor")


def test_offsets_out_of_range(folder):
    install_model(folder, st_blob({"a": f32([4], 0)}, b"\x00" * 8))
    refused(folder, "tensor 'a' data_offsets end at 16, past the 8-byte data section")


def test_offsets_not_covering_the_data(folder):
    install_model(folder, st_blob({"a": f32([1], 0)}, b"\x00" * 8))
    refused(folder, "tensors cover 4 of the 8 data bytes")


def test_offsets_leave_a_gap(folder):
    install_model(folder, st_blob({"a": f32([1], 0), "b": f32([1], 8)}, b"\x00" * 12))
    refused(folder, "gap before tensor 'b'")


def test_offsets_reversed(folder):
    entry = {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}
    install_model(folder, st_blob({"a": entry}, b"\x00" * 4))
    refused(folder, "data_offsets \\[begin, end\\]")


@pytest.mark.parametrize("dtype", ["C64", "F8_E4M3", "OBJECT", 4])
def test_dtype_not_allowed(folder, dtype):
    install_model(folder, st_blob({"a": {"dtype": dtype, "shape": [1],
                                         "data_offsets": [0, 8]}}, b"\x00" * 8))
    refused(folder, "tensor 'a' has dtype .*, not one of F64, F32")


def test_shape_product_mismatch(folder):
    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}
    install_model(folder, st_blob({"a": entry}, b"\x00" * 20))
    refused(folder, "shape \\[2, 3\\] of F32 does not match its 20-byte data span")


@pytest.mark.parametrize("shape", [[-1], [True], [1.5], "3", [1] * 9])
def test_shape_malformed(folder, shape):
    entry = {"dtype": "U8", "shape": shape, "data_offsets": [0, 1]}
    install_model(folder, st_blob({"a": entry}, b"\x00"))
    refused(folder, "needs a shape of at most 8 non-negative ints")


def test_tensor_entry_with_extra_field(folder):
    entry = {**f32([1], 0), "pickle": "yes"}
    install_model(folder, st_blob({"a": entry}, b"\x00" * 4))
    refused(folder, "must have exactly dtype, shape and data_offsets")


def test_metadata_with_non_string_values(folder):
    install_model(folder, st_blob({"__metadata__": {"format": "fragment-model", "n": 3}}))
    refused(folder, "__metadata__ must map strings to strings")


def test_model_metadata_unknown_format(folder):
    install_model(folder, st_blob({"__metadata__": {"format": "x", "aliases": "{}"}}))
    refused(folder, "model __metadata__ must be exactly")


def test_alias_pointing_nowhere(folder):
    meta = {"format": "fragment-model", "aliases": json.dumps({"head.weight": "ghost"})}
    install_model(folder, st_blob({"__metadata__": meta}))
    refused(folder, "aliases metadata must map")


# ------------------------------------------------- header vs. the target module


def rewrite_model_tensors(folder: Path, change) -> None:
    tensors = safetensors.torch.load((folder / MODEL_FILE).read_bytes())
    change(tensors)
    safetensors.torch.save_file(tensors, folder / MODEL_FILE, metadata=MODEL_META | {
        "aliases": json.dumps({"head.weight": "wte.weight"})})
    reseal(folder)


@contextlib.contextmanager
def no_tensor_reads():
    """Refusals must come from the header alone, before tensor data is read."""
    def forbidden(*_args, **_kwargs):
        raise AssertionError("tensor data was read before the layout check")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_load, "_read_verified", forbidden)
        patch.setattr(safetensors.torch, "load", forbidden)
        yield


def load_into(folder: Path, model: nn.Module, rule: str) -> None:
    loaded = load_checkpoint(folder)  # header and hashes are fine ...
    with no_tensor_reads(), pytest.raises(CheckpointError, match=rule):  # ... the target is not
        loaded.load_model_into(model)


def test_tensor_the_model_does_not_have(folder):
    rewrite_model_tensors(folder, lambda t: t.update(extra=torch.zeros(2)))
    load_into(folder, TinyLM(), "has 1 tensor\\(s\\) the model does not have: 'extra'")


def test_missing_tensor(folder):
    rewrite_model_tensors(folder, lambda t: t.pop("ln.bias"))
    model = TinyLM()
    load_into(folder, model, "lacks 1 tensor\\(s\\) the model has: 'ln.bias'")


def test_wrong_shape_vocab_mismatch(folder):
    load_into(folder, TinyLM(vocab=VOCAB + 2),
              "tensor 'wte.weight' has shape \\[11, 4\\] .*expects \\[13, 4\\]")


def test_wrong_dtype(folder):
    load_into(folder, TinyLM().to(torch.float64), "tensor 'ln.bias' is F32 .*expects F64")


def test_refused_model_is_left_untouched(folder):
    model = TinyLM(vocab=VOCAB + 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_into(folder, model, "shape")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_file_replaced_after_verification(folder):
    loaded = load_checkpoint(folder)
    rewrite_model_tensors(folder, lambda t: t["ln.bias"].add_(1))  # re-sealed, but too late
    with pytest.raises(CheckpointError, match="model.safetensors changed since"):
        loaded.load_model_into(TinyLM())


# ------------------------------------------------------------------ optimizer file


def rewrite_optimizer(folder: Path, tensors_change=None, layout_change=None) -> None:
    path = folder / OPTIMIZER_FILE
    header = read_safetensors_header(path)
    tensors = safetensors.torch.load(path.read_bytes())
    layout = json.loads(header.metadata["layout"])
    if tensors_change:
        tensors_change(tensors)
    if layout_change:
        layout_change(layout)
    safetensors.torch.save_file(tensors, path, metadata={
        "format": "fragment-optimizer", "layout": json.dumps(layout)})
    reseal(folder)


def test_optimizer_layout_references_a_missing_tensor(folder):
    rewrite_optimizer(folder, tensors_change=lambda t: t.pop("state.0.exp_avg"))
    refused(folder, "references tensor 'state.0.exp_avg', which is missing")


def test_optimizer_tensor_not_in_layout(folder):
    rewrite_optimizer(folder, tensors_change=lambda t: t.update(stray=torch.zeros(1)))
    refused(folder, "optimizer tensors not referenced by the layout: 'stray'")


def test_optimizer_layout_bad_param_index(folder):
    rewrite_optimizer(folder, layout_change=lambda d: d["state"].update(
        {"01": d["state"].pop("0")}))
    refused(folder, "optimizer state key '01' is not a parameter index")


def test_optimizer_for_a_different_model(folder):
    model = TinyLM(vocab=VOCAB + 2)
    loaded = load_checkpoint(folder)
    with no_tensor_reads(), \
            pytest.raises(CheckpointError, match="tensor .state.0.exp_avg. has shape"):
        loaded.load_optimizer_into(torch.optim.AdamW(model.parameters()))


def test_optimizer_with_other_hyperparameter_keys(folder):
    model = TinyLM()
    loaded = load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="param group 0 .* has keys"):
        loaded.load_optimizer_into(torch.optim.SGD(model.parameters(), lr=0.1))


def test_optimizer_param_count_mismatch(folder):
    loaded = load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="holds 3 parameters, the optimizer's holds 1"):
        loaded.load_optimizer_into(torch.optim.AdamW([nn.Parameter(torch.zeros(3))]))


# --------------------------------------------------------------------- JSON files


@pytest.mark.parametrize("name", [CONFIG_FILE, TRAINER_STATE_FILE])
@pytest.mark.parametrize("content,rule", [
    (b"[1, 2]", "must hold a JSON object"),
    (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    (b'{"lr": NaN}', "non-standard JSON constant NaN"),
    (b"[" * 5000, "nested deeper than"),
])
def test_hostile_json_files(folder, name, content, rule):
    (folder / name).write_bytes(content)
    reseal(folder)
    refused(folder, rule)
