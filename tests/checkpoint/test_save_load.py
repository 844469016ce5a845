"""checkpoint: bit-identical round trips, exact optimizer/RNG resume, pruning, atomic saves."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fragment_llm.checkpoint.save as checkpoint_save
from fragment_llm.checkpoint.layout import (
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    REQUIRED_FILES,
    clean_stale_temporaries,
    list_checkpoints,
    step_path,
)
from fragment_llm.checkpoint.load import find_latest_valid, load_checkpoint, resolve_checkpoint
from fragment_llm.checkpoint.optimizer import flatten_optimizer_state, unflatten_optimizer_state
from fragment_llm.checkpoint.records import (
    CheckpointConfig,
    Provenance,
    TrainerState,
    model_config_sha256,
)
from fragment_llm.checkpoint.rng import capture_rng_state, restore_rng_state
from fragment_llm.checkpoint.save import _write_bytes, save_checkpoint
from fragment_llm.config import ModelConfig, TrainConfig
from fragment_llm.errors import CheckpointError, OutputError
from fragment_llm.safety.files import OLD_MARKER, TEMP_MARKER, dump_json, parse_json_guarded

VOCAB, DIM = 11, 4


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear whose weight *is* the embedding's (tied), plus a
    persistent integer buffer, so aliases and non-float tensors are both exercised."""

    def __init__(self, vocab: int = VOCAB, dim: int = DIM, tie: bool = True) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.wte.weight
        self.register_buffer("seen", torch.tensor(7, dtype=torch.int64))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.wte(idx)))  # (B, T, vocab)


BATCH = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        logits = model(BATCH[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), BATCH[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def make(seed: int = 0, **kw) -> tuple[TinyLM, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = TinyLM(**kw)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))


def save(run: Path, step: int, model: nn.Module, optimizer, tokenizer_file: Path,
         **kw) -> Path:
    return save_checkpoint(run, step, model=model, optimizer=optimizer,
                              trainer_state={"step": step, "position": [0, step]},
                              config={"model": {"vocab_size": VOCAB}},
                              tokenizer_file=tokenizer_file, **kw)


def same_tensors(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def hidden_entries(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------ round trips


def test_round_trip_is_bit_identical_and_keeps_tied_weights(tmp_path, tokenizer_file):
    model, opt = make(0)
    train_steps(model, opt, 2)
    path = save(tmp_path / "run", 2, model, opt, tokenizer_file,
                provenance={"tokenizer_sha256": "a" * 64})
    assert path.name == "step-0000002"
    assert sorted(p.name for p in path.iterdir()) == sorted(REQUIRED_FILES | {OPTIMIZER_FILE,
                                                                    MANIFEST_FILE})

    loaded = load_checkpoint(path)
    assert loaded.step == 2 and loaded.config.document() == {"model": {"vocab_size": VOCAB}}
    assert loaded.trainer_state.document() == {"step": 2, "position": [0, 2]}
    assert loaded.provenance.document() == {"tokenizer_sha256": "a" * 64}
    assert loaded.tokenizer_path.read_bytes() == tokenizer_file.read_bytes()
    # The tied weight is stored once and recorded as an alias.
    assert "head.weight" not in loaded.model_header.tensors
    assert loaded.model_aliases == {"head.weight": "wte.weight"}

    fresh, _ = make(1)
    assert not same_tensors(model, fresh)
    loaded.load_model_into(fresh)
    assert same_tensors(model, fresh)
    assert fresh.head.weight is fresh.wte.weight


def test_optimizer_resume_continues_bit_identically(tmp_path, tokenizer_file):
    model, opt = make(0)
    train_steps(model, opt, 3)
    path = save(tmp_path / "run", 3, model, opt, tokenizer_file)
    train_steps(model, opt, 4)  # the uninterrupted run

    resumed, resumed_opt = make(5)
    loaded = load_checkpoint(path)
    loaded.load_model_into(resumed)
    loaded.load_optimizer_into(resumed_opt)
    assert resumed_opt.param_groups[0]["betas"] == (0.9, 0.95)
    train_steps(resumed, resumed_opt, 4)
    assert same_tensors(model, resumed)
    for a, b in zip(opt.state.values(), resumed_opt.state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_resumes_across_step_implementations(tmp_path, tokenizer_file):
    model, opt = make(0)  # foreach: how a CPU run saved before fused AdamW on CPU
    train_steps(model, opt, 2)
    path = save(tmp_path / "run", 2, model, opt, tokenizer_file)
    resumed = TinyLM()
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2, betas=(0.9, 0.95),
                                    fused=True)
    loaded = load_checkpoint(path)
    loaded.load_model_into(resumed)
    loaded.load_optimizer_into(resumed_opt)
    assert resumed_opt.param_groups[0]["fused"] is True  # the device's choice stays
    assert resumed_opt.param_groups[0]["foreach"] is None
    train_steps(model, opt, 2)
    train_steps(resumed, resumed_opt, 2)
    for name, value in model.state_dict().items():
        assert torch.allclose(value.float(), resumed.state_dict()[name].float(), atol=1e-6)


def test_flatten_round_trip_with_amsgrad():
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, amsgrad=True, weight_decay=0.1)
    train_steps(model, opt, 2)
    tensors, layout = flatten_optimizer_state(opt.state_dict())
    assert "state.0.max_exp_avg_sq" in tensors
    layout = json.loads(json.dumps(layout))  # must survive JSON as-is
    restored = unflatten_optimizer_state(tensors, layout)
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    assert restored["state"].keys() == original["state"].keys()
    for pid, entry in original["state"].items():
        assert all(torch.equal(entry[k], restored["state"][pid][k]) for k in entry)


_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8)
            | st.floats(allow_nan=False, allow_infinity=False))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.lists(inner, max_size=3).map(tuple), max_leaves=10)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k != "params"),
                       _values, max_size=5))
def test_param_group_values_round_trip_exactly(hyper):
    state = {"state": {}, "param_groups": [{**hyper, "params": [0, 1]}]}
    tensors, layout = flatten_optimizer_state(state)
    restored = unflatten_optimizer_state(tensors, json.loads(json.dumps(layout)))
    assert restored == state
    assert repr(restored) == repr(state)  # tuples stay tuples, floats keep every bit


def test_checkpoint_without_optimizer(tmp_path, tokenizer_file):
    model, _ = make(0)
    path = save(tmp_path / "run", 0, model, None, tokenizer_file)
    loaded = load_checkpoint(path)
    assert not loaded.has_optimizer
    assert not (path / OPTIMIZER_FILE).exists()
    with pytest.raises(CheckpointError, match="no optimizer.safetensors"):
        loaded.load_optimizer_into(make(0)[1])


def test_untied_model_refuses_tied_checkpoint(tmp_path, tokenizer_file):
    model, _ = make(0)
    path = save(tmp_path / "run", 1, model, None, tokenizer_file)
    untied = TinyLM(tie=False)
    with pytest.raises(CheckpointError, match="weight tying differs") as info:
        load_checkpoint(path).load_model_into(untied)
    assert info.value.hint and "config.json" in info.value.hint


# ------------------------------------------------------------------------- records


def run_records() -> tuple[CheckpointConfig, TrainerState, Provenance]:
    """The records as `fragment train` fills them (train/run.py)."""
    model = ModelConfig(vocab_size=320, n_layer=1, n_head=2, n_embd=16, block_size=16)
    config = CheckpointConfig(
        model=model.model_dump(mode="json"), train=TrainConfig().model_dump(mode="json"),
        fragment_version="0.1.0", chat_format="transcript", val_loss=3.25, val_bpb=1.0625,
        resume_changes=[{"step": 2, "field": "max_steps", "recorded": 2, "given": 4,
                         "source": "--max-steps"}])
    state = TrainerState(step=3, elapsed_s=1.5, scaler={}, nonfinite_in_a_row=0,
                         data={"cursor": 96, "seed": 1337, "block_size": 16, "world": 1},
                         warmup_end_progress=None, cosine_start=0.0, rng=capture_rng_state())
    provenance = Provenance(tokenizer_sha256="a" * 64, tokens_manifest_sha256="b" * 64,
                            processed_manifest_sha256="c" * 64,
                            model_config_sha256=model_config_sha256(config.model))
    return config, state, provenance


def test_records_round_trip_through_a_checkpoint_byte_for_byte(tmp_path, tokenizer_file):
    config, state, provenance = run_records()
    model, opt = make(0)
    path = save_checkpoint(tmp_path / "run", 3, model=model, optimizer=opt, trainer_state=state,
                           config=config, tokenizer_file=tokenizer_file, provenance=provenance)
    loaded = load_checkpoint(path)
    assert (loaded.config, loaded.trainer_state, loaded.provenance) == (config, state,
                                                                         provenance)
    for name, record in (("config.json", loaded.config),
                         ("trainer_state.json", loaded.trainer_state)):
        written = (path / name).read_bytes()
        assert dump_json(record.document()).encode() == written, name
        # The same bytes as the plain dict written before the records existed.
        assert dump_json(json.loads(written)).encode() == written, name
    assert json.loads((path / MANIFEST_FILE).read_text())["provenance"] == \
        provenance.document()


def test_config_json_loads_as_leniently_as_it_always_has(tmp_path, tokenizer_file):
    """Any JSON object loads; the tables stay as written for the checks that own them,
    and a value of a type fragment never writes reads as absent, as it always did."""
    odd = {"model": "not a table", "train": 5, "chat_format": 7, "val_bpb": "low",
           "val_loss": 10**400, "resume_changes": [{"step": 1}, "junk"], "extra": [1]}
    model, _ = make(0)
    path = save_checkpoint(tmp_path / "run", 1, model=model, optimizer=None,
                           trainer_state={"step": "one", "extra": True}, config=odd,
                           tokenizer_file=tokenizer_file)
    loaded = load_checkpoint(path)
    config, state = loaded.config, loaded.trainer_state
    assert config.model == "not a table" and config.train is None
    assert (config.chat_format, config.val_bpb, config.val_loss) == (None, None, None)
    assert config.resume_changes == [{"step": 1}] and config.document()["extra"] == [1]
    assert config.train_count("batch_size", 8) == 8
    assert state.step == "one" and state.rng is None
    assert state.document() == {"step": "one", "extra": True}


@pytest.mark.parametrize("train, expected", [
    ({"batch_size": 4}, 4), ({"batch_size": 0}, 8), ({"batch_size": True}, 8),
    ({"batch_size": 2.0}, 8), ({}, 8), (None, 8),
])
def test_train_count_reads_only_a_positive_integer(train, expected):
    assert CheckpointConfig(train=train).train_count("batch_size", 8) == expected


# ------------------------------------------------------------------------------- RNG


def draw() -> tuple:
    return (torch.rand(4), torch.randint(0, 1000, (3,)), np.random.randn(3),
            np.random.randint(0, 1000, 3), random.random(), random.gauss(0, 1))


def assert_same_draws(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
    assert a[4:] == b[4:]


def test_rng_round_trip_is_exact_through_json():
    np.random.randn()  # leave a cached gaussian in numpy ...
    random.gauss(0, 1)  # ... and in python's random, both part of the state
    saved = parse_json_guarded(dump_json(capture_rng_state()), "rng", CheckpointError)
    first = draw()
    restore_rng_state(saved)
    assert_same_draws(first, draw())


def test_rng_state_survives_a_checkpoint(tmp_path, tokenizer_file):
    model, _ = make(0)
    path = save_checkpoint(tmp_path / "run", 1, model=model, optimizer=None,
                              trainer_state={"step": 1, "rng": capture_rng_state()},
                              config={}, tokenizer_file=tokenizer_file)
    first = draw()
    restore_rng_state(load_checkpoint(path).trainer_state.rng)
    assert_same_draws(first, draw())


def test_bad_rng_state_changes_nothing():
    saved = capture_rng_state()
    bad = {**saved, "python": {**saved["python"], "version": 99}}
    before = torch.get_rng_state()
    torch.rand(1)
    after_draw = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="RNG state refused"):
        restore_rng_state(bad)
    assert torch.equal(torch.get_rng_state(), after_draw)  # torch was not restored either
    assert not torch.equal(before, after_draw)
    with pytest.raises(CheckpointError, match="RNG state breaks the schema"):
        restore_rng_state({**saved, "extra": 1})


# ------------------------------------------------------------------ saving, pruning


def test_keep_last_prunes_oldest_and_leaves_no_temporaries(tmp_path, tokenizer_file):
    model, opt = make(0)
    run = tmp_path / "run"
    for step in (10, 20, 30, 40, 50):
        save(run, step, model, opt, tokenizer_file, keep_last=3)
    assert [p.name for p in list_checkpoints(run)] == \
        ["step-0000030", "step-0000040", "step-0000050"]
    assert hidden_entries(run) == []


def test_pruning_never_removes_the_new_or_a_higher_step(tmp_path, tokenizer_file):
    model, _ = make(0)
    run = tmp_path / "run"
    for step in (100, 300, 200):  # 200 written after resuming from 100
        save(run, step, model, None, tokenizer_file, keep_last=1)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000200", "step-0000300"]


def test_same_step_is_replaced_atomically(tmp_path, tokenizer_file):
    model, _ = make(0)
    run = tmp_path / "run"
    save(run, 5, model, None, tokenizer_file)
    with torch.no_grad():
        model.ln.bias.add_(1.0)
    save(run, 5, model, None, tokenizer_file)
    fresh = TinyLM()
    load_checkpoint(run / "step-0000005").load_model_into(fresh)
    assert same_tensors(model, fresh)
    assert hidden_entries(run) == []


@pytest.mark.parametrize("fail_at", [1, 3])
def test_disk_full_mid_save_keeps_previous_checkpoints(tmp_path, tokenizer_file, monkeypatch,
                                                       fail_at):
    model, opt = make(0)
    run = tmp_path / "run"
    save(run, 1, model, opt, tokenizer_file)
    save(run, 2, model, opt, tokenizer_file)
    before = {p.name: sorted(f.read_bytes() for f in p.iterdir())
              for p in list_checkpoints(run)}
    calls = []
    real_write = _write_bytes

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == fail_at:  # after the tensors (and some JSON) are already written
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, data)

    monkeypatch.setattr(checkpoint_save, "_write_bytes", failing_write)
    for step in (3, 2):  # a new step, and replacing an existing one
        calls.clear()
        with pytest.raises(OutputError, match="disk full"):
            save(run, step, model, opt, tokenizer_file)
    assert {p.name: sorted(f.read_bytes() for f in p.iterdir())
            for p in list_checkpoints(run)} == before
    assert hidden_entries(run) == []
    load_checkpoint(run / "step-0000002")


def test_tensor_writer_failure_leaves_no_partial_folder(tmp_path, tokenizer_file, monkeypatch):
    model, _ = make(0)
    run = tmp_path / "run"
    save(run, 1, model, None, tokenizer_file)

    def broken(path, tensors, metadata):
        path.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_save, "_write_tensors", broken)
    with pytest.raises(OutputError, match="disk full"):
        save(run, 2, model, None, tokenizer_file)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000001"]
    assert hidden_entries(run) == []


@pytest.mark.parametrize("where", ["model", "optimizer"])
def test_non_finite_tensors_are_refused_before_writing(tmp_path, tokenizer_file, where):
    model, opt = make(0)
    train_steps(model, opt, 1)
    with torch.no_grad():
        if where == "model":
            model.ln.weight[0] = float("nan")
        else:
            opt.state[model.ln.bias]["exp_avg"][0] = float("inf")
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=f"non-finite checkpoint: {where} tensor"):
        save(run, 1, model, opt, tokenizer_file)
    assert not run.exists() or list(run.iterdir()) == []


@pytest.mark.parametrize("state,rule", [
    ({"loss": float("nan")}, "not JSON-serialisable"),
    ({"betas": (0.9, 0.95)}, "does not round-trip"),
    ({1: "int key"}, "does not round-trip"),
    ({"x": object()}, "not JSON-serialisable"),
])
def test_trainer_state_must_round_trip_through_json(tmp_path, tokenizer_file, state, rule):
    model, _ = make(0)
    with pytest.raises(CheckpointError, match=rule):
        save_checkpoint(tmp_path / "run", 1, model=model, optimizer=None,
                           trainer_state=state, config={}, tokenizer_file=tokenizer_file)


@pytest.mark.parametrize("kwargs,rule", [
    ({"step": -1}, "step must be an int"),
    ({"step": 10**7}, "step must be an int"),
    ({"keep_last": 0}, "keep_last"),
    ({"provenance": {"Bad Key": "x"}}, "provenance refused"),
    ({"provenance": {"ok": "\x1b]52;c;"}}, "provenance refused"),
])
def test_save_arguments_are_checked(tmp_path, tokenizer_file, kwargs, rule):
    model, _ = make(0)
    args = {"step": 1, **kwargs}
    step = args.pop("step")
    with pytest.raises(CheckpointError, match=rule):
        save(tmp_path / "run", step, model, None, tokenizer_file, **args)


# ---------------------------------------------------------- finding and resolving


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_latest_valid_falls_back_past_a_damaged_newest(tmp_path, tokenizer_file):
    model, opt = make(0)
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save(run, step, model, opt, tokenizer_file)
    flip_byte(run / "step-0000003" / MODEL_FILE, -1)
    found, skipped = find_latest_valid(run)
    assert found == run / "step-0000002"
    assert [(p.name, "sha256 mismatch for model.safetensors" in r) for p, r in skipped] == \
        [("step-0000003", True)]
    heard = []
    assert resolve_checkpoint(run, on_skip=lambda p, r: heard.append(p.name)) == found
    assert heard == ["step-0000003"]


def test_resolve_accepts_run_and_step_folders(tmp_path, tokenizer_file):
    model, _ = make(0)
    run = tmp_path / "run"
    for step in (7, 8):
        save(run, step, model, None, tokenizer_file)
    assert resolve_checkpoint(run) == run / "step-0000008"
    assert resolve_checkpoint(run / "step-0000007") == run / "step-0000007"


def test_resolve_refuses_with_a_hint(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    for path, rule in [(tmp_path / "empty", "no valid checkpoint"),
                       (tmp_path / "file", "not a checkpoint folder"),
                       (tmp_path / "missing", "checkpoint not found")]:
        with pytest.raises(CheckpointError, match=rule) as info:
            resolve_checkpoint(path)
        assert info.value.hint


def test_all_damaged_is_reported(tmp_path, tokenizer_file):
    model, _ = make(0)
    run = tmp_path / "run"
    save(run, 1, model, None, tokenizer_file)
    (run / "step-0000001" / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="step-0000001: missing manifest.json"):
        resolve_checkpoint(run)


def test_list_checkpoints_ignores_symlinks_and_other_names(tmp_path, tokenizer_file):
    model, _ = make(0)
    run = tmp_path / "run"
    real = save(run, 1, model, None, tokenizer_file)
    (run / "step-0000009").symlink_to(real, target_is_directory=True)
    (run / "step-12").mkdir()
    (run / "step-0000005").write_text("a file")
    assert list_checkpoints(run) == [real]
    found, skipped = find_latest_valid(run)
    assert found == real
    assert [(p.name, r) for p, r in skipped] == [
        ("step-0000009", "is a symlink, never followed"), ("step-0000005", "is not a folder")]


def test_clean_stale_temporaries(tmp_path, tokenizer_file):
    model, _ = make(0)
    run = tmp_path / "run"
    save(run, 1, model, None, tokenizer_file)
    dead = 99_999_999  # above any pid_max: no such process
    stale = run / f".step-0000002{TEMP_MARKER}{dead}-abcd1234"
    stale.mkdir()
    (stale / MODEL_FILE).write_bytes(b"partial")
    # A kill between the two renames of a same-step replacement: only the old copy is left.
    os.replace(run / "step-0000001", run / f".step-0000001{OLD_MARKER}{dead}-ffff0000")
    removed = clean_stale_temporaries(run)
    assert stale in removed
    assert hidden_entries(run) == []
    assert find_latest_valid(run) == (run / "step-0000001", [])
    assert clean_stale_temporaries(tmp_path / "nothing-here") == []


def test_step_path_is_zero_padded():
    assert step_path(Path("run"), 100) == Path("run/step-0000100")
    with pytest.raises(CheckpointError):
        step_path(Path("run"), True)  # a bool is not a step
