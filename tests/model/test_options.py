"""model: the candidate options of issue 19 (ReLU^2, QK-norm, logit softcap, zero-initialised
projections, x0 mix), each against a direct computation of its formula, and the default
model left exactly as it was."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fragment_llm.config import MODEL_PRESETS, ModelConfig
from fragment_llm.model.components import apply_rotary, softcap
from fragment_llm.model.gpt import GPT, KVCache
from fragment_llm.model.loss import lm_loss
from fragment_llm.model.size import count_parameters
from tests.test_release_compat import RELEASE, STEP

V, T = 256, 16
TINY = {"vocab_size": V, "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": T}
OPTIONS = {"relu2": {"mlp": "relu2"}, "qk_norm": {"qk_norm": True},
           "softcap": {"logit_softcap": 3.0}, "zero_init_proj": {"zero_init_proj": True},
           "x0_mix": {"x0_mix": True}}
ALL = {k: v for option in OPTIONS.values() for k, v in option.items()}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**TINY, **overrides})).eval()


def ids(B=2, length=T, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(seed))


def perturbed(model: GPT) -> GPT:
    """Zero-initialised tensors moved off zero, so an option's path actually computes."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.any():
                param.normal_(0.0, 0.3 if name == "x0_scales" else 0.02)
    return model


# ---- every option: the model's contracts still hold -----------------------------------

@pytest.mark.parametrize("option", [*OPTIONS, "all"])
@torch.no_grad()
def test_each_option_keeps_causality_and_the_kv_cache_exact(option):
    model, idx = perturbed(make(**(ALL if option == "all" else OPTIONS[option]))), ids()
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % V
    full = model(idx)
    assert full.shape == (2, T, V) and torch.isfinite(full).all()
    assert torch.allclose(model(changed)[:, :9], full[:, :9], rtol=0, atol=1e-6)
    cache = KVCache.for_model(model, batch_size=2)
    steps = [model(idx[:, :6], cache)] + [model(idx[:, t:t + 1], cache) for t in range(6, T)]
    assert torch.allclose(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("option", [*OPTIONS, "all"])
def test_each_option_trains_every_parameter_and_counts_them(option):
    model = perturbed(make(**(ALL if option == "all" else OPTIONS[option]))).train()
    lm_loss(model(ids()), ids(seed=2)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    for exclude in (False, True):
        assert count_parameters(model.config, exclude) == count_parameters(model, exclude)


# ---- the default model is the one before the options ----------------------------------

def test_a_checkpoint_config_from_before_the_options_means_the_same_model():
    recorded = json.loads((RELEASE / "run" / STEP / "config.json").read_text())["model"]
    config = ModelConfig.model_validate(recorded)
    assert not set(OPTIONS) & set(recorded)  # written before the options existed
    assert (config.mlp, config.qk_norm, config.logit_softcap, config.zero_init_proj,
            config.x0_mix) == ("swiglu", False, None, False, False)
    assert config.candidate_options == ()
    # the state dict's names and shapes are exactly the file's: nothing added, nothing lost
    weights = load_file(RELEASE / "run" / STEP / "model.safetensors")
    model = GPT(config)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in weights.items()}


def test_options_on_round_trip_through_config_json():
    config = ModelConfig(**TINY, **ALL)
    assert ModelConfig.model_validate(json.loads(json.dumps(config.model_dump()))) == config
    assert config.candidate_options == ("mlp", "qk_norm", "logit_softcap", "x0_mix")


def test_options_that_add_no_parameters_leave_the_initial_weights_bit_identical():
    base = make().state_dict()
    for option in ({"qk_norm": True}, {"logit_softcap": 3.0}, {"x0_mix": True}):
        weights = make(**option).state_dict()
        assert all(torch.equal(weights[name], tensor) for name, tensor in base.items())
    zeroed = make(zero_init_proj=True).state_dict()
    for name, tensor in base.items():
        expected = torch.zeros_like(tensor) if name.endswith("proj.weight") else tensor
        assert torch.equal(zeroed[name], expected), name


# ---- ReLU^2 -----------------------------------------------------------------------------

@pytest.mark.parametrize("preset", list(MODEL_PRESETS))
def test_relu2_hidden_width_gives_swiglus_parameter_count(preset):
    swiglu = ModelConfig(**MODEL_PRESETS[preset], vocab_size=8192)
    relu2 = swiglu.model_copy(update={"mlp": "relu2"})
    assert relu2.hidden_dim == swiglu.hidden_dim * 3 // 2
    assert count_parameters(relu2) == count_parameters(swiglu)
    assert ModelConfig(mlp="relu2").hidden_dim == 1056  # small: 3/2 x 704


def test_relu2_mlp_is_relu_squared_with_its_gradient():
    mlp = make(mlp="relu2").blocks[0].mlp
    x = torch.randn(2, 5, TINY["n_embd"], requires_grad=True)
    y = mlp(x)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    got = x.grad.clone(), mlp.fc.weight.grad.clone()
    x.grad = mlp.fc.weight.grad = None
    reference = mlp.proj(F.relu(mlp.fc(x)) ** 2)
    (reference * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    assert torch.allclose(y, reference, atol=1e-6)
    assert torch.allclose(got[0], x.grad, atol=1e-6)
    assert torch.allclose(got[1], mlp.fc.weight.grad, atol=1e-6)


# ---- QK-norm ------------------------------------------------------------------------------

def test_qk_norm_attention_equals_the_formula():
    model = make(qk_norm=True)
    attn, x = model.blocks[0].attn, torch.randn(2, T, TINY["n_embd"])
    B, nh, hs = 2, attn.n_head, attn.head_dim
    q, k, v = attn.qkv(x).view(B, T, 3 * nh, hs).split(nh, dim=2)

    def unit_rms(t):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + model.config.norm_eps)

    rotation = model.positions.rotation(0, T)
    q, k = apply_rotary(unit_rms(q), rotation), apply_rotary(unit_rms(k), rotation)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True)
    expected = attn.proj(y.transpose(1, 2).reshape(B, T, -1))
    assert torch.allclose(attn(x, rotation, None, None), expected, atol=1e-5)


@torch.no_grad()
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    model, idx = make(qk_norm=True), ids()
    before = model(idx)
    for block in model.blocks:
        block.attn.qkv.weight[: 2 * TINY["n_embd"]] *= 10.0  # the q and k rows
    assert torch.allclose(model(idx), before, atol=1e-4)


# ---- logit softcap -------------------------------------------------------------------------

@torch.no_grad()
def test_softcap_logits_are_cap_tanh_of_the_uncapped_logits():
    capped, plain, idx = make(logit_softcap=0.5), make(), ids()
    expected = 0.5 * torch.tanh(plain(idx) / 0.5)
    logits = capped(idx)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert logits.abs().max() < 0.5
    assert torch.allclose(capped(idx, last_only=True), expected[:, -1:], atol=1e-6)


def test_softcap_gradient_equals_the_formulas():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softcap(t, 1.5), (x,))
    weights = torch.randn(3, 7, dtype=torch.float64)
    (softcap(x, 1.5) * weights).sum().backward()
    got = x.grad.clone()
    x.grad = None
    (1.5 * torch.tanh(x / 1.5) * weights).sum().backward()
    assert torch.allclose(got, x.grad)


# ---- zero-initialised projections ----------------------------------------------------------

@torch.no_grad()
def test_zero_init_proj_makes_every_block_start_as_the_identity():
    model, idx = make(zero_init_proj=True), ids()
    embedded = model.wte(idx)
    assert torch.allclose(model(idx), F.linear(model.norm_f(embedded), model.wte.weight),
                          atol=1e-6)


# ---- x0 mix -----------------------------------------------------------------------------------

@torch.no_grad()
def test_x0_mix_starts_as_the_plain_model_and_then_adds_scaled_x0_per_block():
    plain, mixed, idx = make(), make(x0_mix=True), ids()
    assert mixed.x0_scales.shape == (TINY["n_layer"],)
    assert torch.equal(mixed(idx), plain(idx))  # scales start at zero
    mixed.x0_scales.copy_(torch.tensor([0.5, -2.0]))
    x0 = x = mixed.wte(idx)
    rotation = mixed.positions.rotation(0, T)
    for scale, block in zip((0.5, -2.0), mixed.blocks, strict=True):
        x = block(x + scale * x0, rotation, None, None)
    expected = F.linear(mixed.norm_f(x), mixed.wte.weight)
    assert torch.allclose(mixed(idx), expected, atol=1e-6)
