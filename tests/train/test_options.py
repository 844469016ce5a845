"""train: the candidate options of issue 19: Muon (with AdamW for the rest), its momentum
warmup, and the warmup-stable-decay schedule; each against a direct computation, exact
resume with them on, and the default optimizer and schedule left as they were."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from fragment_llm.config import ModelConfig, TrainConfig
from fragment_llm.events import StepEvent
from fragment_llm.model.gpt import GPT
from fragment_llm.model.loss import lm_loss
from fragment_llm.train.muon import MuonAdamW, build_muon, orthogonalize
from fragment_llm.train.run import TrainRequest, run_training
from fragment_llm.train.schedule import lr_at, muon_momentum_at
from fragment_llm.train.trainer import build_optimizer
from tests.helpers import FAST, MODEL, assert_same_weights, cli_train_config, final_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"vocab_size": 256, "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides}))


# ---- schedule ---------------------------------------------------------------------------

def test_wsd_holds_the_peak_then_decays_in_a_straight_line_to_the_floor():
    config = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1,
                         schedule="wsd", decay_fraction=0.25)
    assert lr_at(0, config, 0.0) == pytest.approx(0.1)  # warmup as before
    # after warmup the span is 100 steps: 75 at the peak, then 25 down to 0.1
    assert [lr_at(s, config, s / 110) for s in (10, 50, 85)] == pytest.approx([1.0] * 3)
    assert lr_at(97, config, 97.5 / 110) == pytest.approx(1.0 - 0.9 * 0.5)
    assert lr_at(110, config, 1.0) == pytest.approx(0.1)
    values = [lr_at(s, config, s / 110) for s in range(85, 111)]
    steps = [a - b for a, b in zip(values, values[1:], strict=False)]
    assert steps == pytest.approx([0.9 / 25] * 25)  # linear


def test_the_default_schedule_is_the_cosine():
    cosine = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    assert cosine.schedule == "cosine"
    ratio = (55 / 100 - 0.1) / 0.9
    assert lr_at(55, cosine, 0.55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * ratio)))


def test_muon_momentum_warms_up_linearly_then_holds():
    config = TrainConfig(muon_momentum_start=0.85, muon_momentum=0.95,
                         muon_momentum_warmup_steps=300)
    assert [muon_momentum_at(s, config) for s in (0, 150, 300, 5000)] == pytest.approx(
        [0.85, 0.90, 0.95, 0.95])
    assert muon_momentum_at(0, config.model_copy(update={"muon_momentum_warmup_steps": 0})) \
        == 0.95


# ---- Muon: the update ---------------------------------------------------------------------

def newton_schulz_float64(g: torch.Tensor, steps: int) -> torch.Tensor:
    """The quintic iteration written out, in float64, on the wide orientation."""
    x = g.double().T if g.size(0) > g.size(1) else g.double()
    x = x / x.norm()
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if g.size(0) > g.size(1) else x


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (32, 32)])
def test_orthogonalize_is_the_newton_schulz_iteration_and_lands_near_u_vt(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    o = orthogonalize(g[None], 5)[0]
    assert o.dtype == torch.float32 and o.shape == g.shape
    assert torch.allclose(o.double(), newton_schulz_float64(g, 5), atol=1e-4)
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    # singular values go to ~[0.68, 1.13], not exactly 1 (by design), except the ones far
    # below the largest, which 5 steps only start to lift (the iteration keeps their order)
    singular, original = torch.linalg.svdvals(o), torch.linalg.svdvals(g)
    kept = singular[original > 0.1 * original[0]]
    assert kept.min() > 0.6 and singular.max() < 1.2
    assert torch.nn.functional.cosine_similarity(o.flatten(), (u @ vt).flatten(), dim=0) > 0.9


def test_a_muon_step_matches_torch_optim_muon_with_an_fp32_iteration(monkeypatch):
    """torch's Muon is the reference for momentum, Nesterov, decay and the lr scale; its
    bf16 Newton-Schulz is swapped for the fp32 one both are meant to compute."""
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz",
                        lambda g, coeffs, steps, eps: orthogonalize(g[None], steps)[0])
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.randn(48, 32))
    with torch.no_grad():
        theirs.copy_(ours)
    mine = MuonAdamW([{"kind": "muon", "params": [ours], "lr": 0.05, "momentum": 0.9,
                       "weight_decay": 0.1, "ns_steps": 5, "split_rows": (48,)}])
    reference = torch.optim.Muon([theirs], lr=0.05, momentum=0.9, weight_decay=0.1, ns_steps=5)
    for seed in range(4):
        grad = torch.randn(48, 32, generator=torch.Generator().manual_seed(seed))
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        mine.step()
        reference.step()
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(mine.state[ours]["momentum_buffer"],
                          reference.state[theirs]["momentum_buffer"], atol=1e-6)


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_a_fused_qkv_is_orthogonalised_as_q_k_and_v(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    qkv = model.blocks[0].attn.qkv.weight
    optimizer = build_muon(model, TrainConfig(optimizer="muon", muon_lr=0.1))
    C, kv = model.config.n_embd, model.config.kv_heads * model.config.head_dim
    grad = torch.randn(qkv.shape, generator=torch.Generator().manual_seed(1))
    before = qkv.detach().clone()
    qkv.grad = grad
    optimizer.step()  # first step: the update is the gradient's direction, any momentum
    parts = grad.split([C, kv, kv])
    expected = torch.cat([orthogonalize(p[None], 5)[0] for p in parts])
    assert torch.allclose(before - qkv.detach(), 0.1 * expected, atol=1e-5)
    assert not torch.allclose(expected, orthogonalize(grad[None], 5)[0], atol=1e-2)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny(tie_embeddings=False, positions="learned", x0_mix=True, mlp="relu2")
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in optimizer.param_groups if g["kind"] == "muon"
               for p in g["params"]}
    expected = {f"blocks.{i}.{m}.weight" for i in range(2)
                for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}
    assert on_muon == expected
    on_adamw = {names[id(p)] for g in optimizer.param_groups if g["kind"] == "adamw"
                for p in g["params"]}
    assert on_adamw == set(names.values()) - expected  # wte, lm_head, wpe, norms, x0_scales
    assert {"wte.weight", "lm_head.weight", "positions.wpe.weight", "x0_scales"} <= on_adamw


def test_the_adamw_part_computes_exactly_what_torch_adamw_does():
    mixed, plain = tiny(), tiny()
    config = TrainConfig(optimizer="muon", weight_decay=0.1, beta1=0.8, beta2=0.99)
    ours = build_muon(mixed, config)
    theirs = build_optimizer(plain, config.model_copy(update={"optimizer": "adamw"}),
                             torch.device("cpu"))
    assert type(theirs) is torch.optim.AdamW  # the default path builds what it always did
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        for a, b in zip(mixed.parameters(), plain.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        ours.step()
        theirs.step()
    for (name, a), b in zip(mixed.named_parameters(), plain.parameters(), strict=True):
        if not name.startswith("blocks.") or a.dim() < 2:
            assert torch.equal(a, b), name


def test_muon_trains_a_tiny_model_with_every_model_option():
    model = tiny(mlp="relu2", qk_norm=True, logit_softcap=15.0, zero_init_proj=True,
                 x0_mix=True).train()
    optimizer = build_muon(model, TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02))
    x = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0  # memorises one batch


# ---- a real run: resume is exact with the options on --------------------------------------

OPTIONS_MODEL = {**MODEL, "mlp": "relu2", "qk_norm": True, "logit_softcap": 30.0,
                 "zero_init_proj": True, "x0_mix": True}
OPTIONS_TRAIN = {**FAST, "optimizer": "muon", "muon_momentum_warmup_steps": 8,
                 "muon_ns_steps": 3, "muon_weight_decay": 0.01, "schedule": "wsd",
                 "decay_fraction": 0.5}


def options_request(corpus, out, resume=False) -> TrainRequest:
    return TrainRequest(data=corpus.processed, tokenizer=corpus.tokenizer, out=out,
                        model=ModelConfig(**OPTIONS_MODEL),
                        train=cli_train_config(**OPTIONS_TRAIN),
                        tokens_dir=out.parent / "tokens", resume=resume)


def test_ctrl_c_then_resume_equals_uninterrupted_with_every_option_on(corpus, tmp_path):
    full = run_training(options_request(corpus, tmp_path / "full"), lambda e: None)
    assert full.steps == 12 and math.isfinite(full.val_loss)

    def interrupt_at_step_5(event):
        if isinstance(event, StepEvent) and event.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    cut = run_training(options_request(corpus, tmp_path / "cut"), interrupt_at_step_5)
    assert cut.interrupted and cut.steps == 5
    resumed = run_training(options_request(corpus, tmp_path / "cut", resume=True),
                           lambda e: None)
    assert resumed.steps == 12
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "cut"))
    saved = (tmp_path / "cut" / "step-0000012" / "optimizer.safetensors")
    assert saved.is_file()


# ---- the presets (issue 19's plans chose them) -----------------------------------------

def test_the_default_preset_trains_with_muon_wsd_and_zero_initialised_projections(
        corpus, runner, tmp_path):
    """`fragment train` without --preset: small's Muon (3 Newton-Schulz steps), warmup-
    stable-decay and zero-initialised projections, recorded in the checkpoint; the config
    only shrinks the shape and the budget. The tiny preset keeps AdamW and the cosine."""
    import json

    from fragment_llm.cli.app import cli

    config = tmp_path / "shrunk.toml"
    config.write_text("[model]\nn_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 16\n"
                      "[train]\nbatch_size = 2\nmax_steps = 2\neval_blocks = 1\n"
                      "final_eval_blocks = 1\nworkers = 1\n")
    recorded = {}
    for name, preset in (("default", []), ("tiny", ["--preset", "tiny"])):
        out = tmp_path / name
        result = runner.invoke(cli, ["-q", "train", "--data", str(corpus.processed),
                                     "--tokenizer", str(corpus.tokenizer), "--out", str(out),
                                     "--config", str(config), *preset])
        assert result.exit_code == 0, result.output
        recorded[name] = json.loads((out / "step-0000002" / "config.json").read_text())
    default, tiny_run = recorded["default"], recorded["tiny"]
    assert (default["train"]["optimizer"], default["train"]["muon_ns_steps"],
            default["train"]["schedule"], default["model"]["zero_init_proj"]) == (
        "muon", 3, "wsd", True)
    assert (tiny_run["train"]["optimizer"], tiny_run["train"]["schedule"],
            tiny_run["model"]["zero_init_proj"]) == ("adamw", "cosine", False)
