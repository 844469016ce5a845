"""model: shapes, causality, KV cache = full recompute, learning, sizes, FLOPs, config rules."""

from __future__ import annotations

import itertools
import math
from functools import cache as memoize
from typing import get_args

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fragment_llm.config import MODEL_PRESETS, ModelConfig, TokenizerConfig, load_stage_config
from fragment_llm.errors import ConfigError, ModelError
from fragment_llm.model.components import MLPS, NORMS, POSITIONS
from fragment_llm.model.gpt import GPT, KVCache
from fragment_llm.model.loss import lm_loss
from fragment_llm.model.size import count_parameters, flops_per_token

V, T = 256, 16
TINY = {"vocab_size": V, "n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": T}
COMPONENTS = list(itertools.product(get_args(ModelConfig.model_fields["positions"].annotation),
                                    get_args(ModelConfig.model_fields["norm"].annotation),
                                    get_args(ModelConfig.model_fields["mlp"].annotation)))
# every component choice, with multi-head and grouped-query attention, tied and untied
VARIANTS = [(*c, kv, tie) for c in COMPONENTS for kv in (None, 2) for tie in (True, False)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def variant_id(v) -> str:
    positions, norm, mlp, kv, tie = v
    attention, head = "mha" if kv is None else "gqa", "tied" if tie else "untied"
    return f"{positions}-{norm}-{mlp}-{attention}-{head}"


def make(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=None,
         tie_embeddings=True, **overrides) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(**{**TINY, "positions": positions, "norm": norm, "mlp": mlp,
                            "n_kv_head": n_kv_head, "tie_embeddings": tie_embeddings,
                            **overrides})
    return GPT(config).eval()


def ids(B=2, length=T, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (B, length), generator=torch.Generator().manual_seed(seed))


def test_registries_offer_exactly_the_config_choices():
    fields = ModelConfig.model_fields
    assert set(POSITIONS) == set(get_args(fields["positions"].annotation))
    assert set(NORMS) == set(get_args(fields["norm"].annotation))
    assert set(MLPS) == set(get_args(fields["mlp"].annotation))


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_forward_shape(variant):
    model = make(*variant)
    assert model(ids(3, 7)).shape == (3, 7, V)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_future_tokens_never_change_past_logits(variant):
    model, idx = make(*variant), ids()
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)  # the change is visible later


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@torch.no_grad()
def test_kv_cache_prefill_then_decode_equals_full_recompute(variant):
    model, idx = make(*variant), ids()
    cache = KVCache.for_model(model, batch_size=2)
    steps = [model(idx[:, :6], cache)] + [model(idx[:, t:t + 1], cache) for t in range(6, T)]
    assert cache.pos == T
    assert torch.allclose(torch.cat(steps, dim=1), model(idx), rtol=0, atol=1e-5)


@memoize
def cached_model(positions: str) -> GPT:
    return make(positions, n_kv_head=2)


@settings(max_examples=20, deadline=None)
@given(positions=st.sampled_from(list(POSITIONS)),
       chunks=st.lists(st.integers(1, 6), min_size=1, max_size=T).filter(lambda c: sum(c) <= T))
@torch.no_grad()
def test_kv_cache_any_chunking_equals_full_recompute(positions, chunks):
    model, idx = cached_model(positions), ids(length=sum(chunks))
    cache, start, outs = KVCache.for_model(model, batch_size=2), 0, []
    for size in chunks:  # chunks after the first attend to the cache through an explicit mask
        outs.append(model(idx[:, start:start + size], cache))
        start += size
    assert torch.allclose(torch.cat(outs, dim=1), model(idx), rtol=0, atol=1e-5)


def test_causal_mask_for_a_chunk_after_cached_positions():
    cache = KVCache(ModelConfig(**TINY), batch_size=1)
    assert cache.causal_mask(3) is None  # empty cache: is_causal is exact
    cache.pos = 2
    assert cache.causal_mask(1) is None  # one query sees every cached key
    assert cache.causal_mask(2).int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


@torch.no_grad()
def test_kv_cache_reset_reuses_buffers():
    model, idx = make(), ids()
    cache = KVCache.for_model(model, batch_size=2, max_len=8)
    first = model(idx[:, :8], cache)
    cache.reset()
    assert torch.equal(model(idx[:, :8], cache), first)


@torch.no_grad()
def test_last_only_is_the_last_position_of_the_full_logits():
    model, idx = make(), ids()
    full = model(idx)
    assert torch.allclose(model(idx, last_only=True), full[:, -1:], atol=1e-5)
    cache = KVCache.for_model(model, batch_size=2)
    assert torch.allclose(model(idx, cache, last_only=True), full[:, -1:], atol=1e-5)


def test_rmsnorm_inference_kernel_equals_the_training_formula():
    norm = NORMS["rmsnorm"](ModelConfig(**TINY))
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 5, TINY["n_embd"]) * 3
    trained = norm(x)  # grad enabled: the written-out formula
    with torch.no_grad():
        assert torch.allclose(norm(x), trained, rtol=1e-5, atol=1e-6)


def test_rope_table_follows_the_module_to_another_dtype_and_back():
    model = make()
    before = model.positions.rotation(3, 2).clone()
    model.to(torch.float64).to(torch.float32)
    assert torch.equal(model.positions.rotation(3, 2), before)
    assert before.dtype == torch.complex64


def test_too_long_inputs_are_refused():
    model = make()
    with pytest.raises(ModelError, match="block_size 16"):
        model(ids(1, T + 1))
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    with pytest.raises(ModelError, match="KV cache length 4"):
        model(ids(1, 5), cache)
    with pytest.raises(ModelError, match="batch of 2"):
        model(ids(2, 2), cache)
    with pytest.raises(ModelError, match="outside 1..block_size"):
        KVCache(model.config, batch_size=1, max_len=T + 1)


def test_grouped_query_attention_equals_mha_with_shared_kv_heads():
    gqa = make(n_kv_head=2)
    mha = make()
    hs, nh = gqa.config.head_dim, gqa.config.n_head
    with torch.no_grad():
        for src, dst in zip(gqa.blocks, mha.blocks, strict=True):
            q, k, v = src.attn.qkv.weight.split((nh * hs, 2 * hs, 2 * hs))
            # query heads 0,1 share kv head 0 and heads 2,3 share kv head 1
            k, v = (w.view(2, hs, -1).repeat_interleave(nh // 2, dim=0).flatten(0, 1)
                    for w in (k, v))
            dst.attn.qkv.weight.copy_(torch.cat((q, k, v)))
        mha.load_state_dict({n: p for n, p in gqa.state_dict().items() if "qkv" not in n},
                            strict=False)
        assert torch.allclose(gqa(ids()), mha(ids()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("positions,norm,mlp", COMPONENTS)
def test_loss_falls_when_overfitting_one_batch(positions, norm, mlp):
    model = make(positions, norm, mlp).train()
    idx = ids(4, T + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(V)) < 0.1  # small init: near-uniform predictions
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_lm_loss_matches_cross_entropy_value_and_gradient(dtype):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, V, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (2, 5))
    targets[0, 1] = targets[1, 4] = -1  # ignored positions
    ours = lm_loss(logits, targets)
    ours.backward()
    reference = torch.nn.functional.cross_entropy(logits.double().view(-1, V), targets.view(-1),
                                                  ignore_index=-1)
    expected_grad, = torch.autograd.grad(reference, logits)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert logits.grad.dtype == dtype
    assert abs(ours.item() - reference.item()) < tol
    assert torch.allclose(logits.grad.double(), expected_grad.double(), atol=tol * 1e-2)


def test_lm_loss_is_exact_where_the_target_probability_underflows():
    logits = torch.zeros(3, V)
    logits[0, 5] = 200.0  # target 6 sits 200 nats below: exp(-200) is 0 in fp32
    logits.requires_grad_()
    targets = torch.tensor([6, 1, 2])
    loss = lm_loss(logits, targets)
    reference = torch.nn.functional.cross_entropy(logits.double(), targets)
    assert math.isfinite(loss.item()) and abs(loss.item() - reference.item()) < 1e-4
    loss.backward()
    expected, = torch.autograd.grad(reference, logits)
    assert torch.allclose(logits.grad, expected, atol=1e-7)


def test_hand_written_norm_and_swiglu_backwards_match_autograd():
    from fragment_llm.model.components import _RMSNormFunction, _SwiGLUFunction
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, dtype=torch.float64, requires_grad=True)
    gain = torch.empty(16, dtype=torch.float64).uniform_(0.5, 1.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-5), (x, gain))
    fused = torch.randn(2, 3, 2 * 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUFunction.apply, (fused,))
    gate, up = fused.detach().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    assert torch.allclose(_SwiGLUFunction.apply(fused), expected, rtol=0, atol=1e-12)


def test_lm_loss_second_backward_is_refused_not_wrong():
    logits = torch.randn(1, 3, V, requires_grad=True)
    loss = lm_loss(logits, torch.tensor([[1, 2, 3]]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_dropout_is_active_in_training_only():
    model, idx = make(dropout=0.5), ids()
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))
        model.train()
        assert not torch.equal(model(idx), model(idx))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    grads = []
    for recompute in (False, True):
        model, idx = make(dropout=0.1).train(), ids(2, T + 1)
        model.activation_checkpointing = recompute
        torch.manual_seed(5)  # the same dropout masks, also when recomputed
        loss = lm_loss(model(idx[:, :-1]), idx[:, 1:])
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.allclose(plain, recomputed, rtol=0, atol=1e-6)


def test_tied_weights_are_one_tensor_and_save_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file
    tied, untied = make(), make(tie_embeddings=False)
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    for model in (tied, untied):
        save_file(model.state_dict(), tmp_path / "m.safetensors")
        fresh = GPT(model.config).eval()
        fresh.load_state_dict(load_file(tmp_path / "m.safetensors"), strict=True)
        assert torch.equal(fresh(ids()), model(ids()))


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "n_layer": 8, "n_embd": 128}))
    block = model.blocks[0]
    assert block.attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(block.attn_norm.weight, torch.ones(128))


def test_bf16_autocast_forward_runs():
    model, idx = make(), ids()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
    assert logits.shape == (2, T, V) and torch.isfinite(logits).all()


# ---- sizes and FLOPs ------------------------------------------------------------------

def hand_count(c: ModelConfig, exclude_embeddings: bool) -> int:
    """Tied RMSNorm/SwiGLU/RoPE GPT: per layer qkv + proj + fc (2 hidden) + down + 2 norms."""
    C, H, kv = c.n_embd, c.hidden_dim, c.kv_heads * c.head_dim
    per_layer = C * (C + 2 * kv) + C * C + C * 2 * H + H * C + 2 * C
    body = c.n_layer * per_layer + C
    return body if exclude_embeddings else body + c.vocab_size * C


# tiny and base are named for their non-embedding parameters; small (~10M) for all of
# them at the default tokenizer vocabulary, where the embedding is half the model.
@pytest.mark.parametrize("name,vocab,count_embedding,low,high", [
    ("tiny", 8192, False, 0.7e6, 1.3e6),
    ("small", TokenizerConfig().vocab_size, True, 8e6, 12e6),
    ("base", 8192, False, 35e6, 45e6),
])
def test_preset_sizes_are_as_documented(name, vocab, count_embedding, low, high):
    config = ModelConfig(**MODEL_PRESETS[name], vocab_size=vocab)
    non_embedding = count_parameters(config, exclude_embeddings=True)
    assert low <= count_parameters(config, exclude_embeddings=not count_embedding) <= high
    assert non_embedding == hand_count(config, exclude_embeddings=True)
    assert count_parameters(config) == hand_count(config, exclude_embeddings=False)
    assert count_parameters(config) - non_embedding == vocab * config.n_embd


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_count_of_a_config_equals_count_of_its_model(variant):
    model = make(*variant)
    for exclude in (False, True):
        assert count_parameters(model.config, exclude) == count_parameters(model, exclude)


def every_option(preset: str) -> list[ModelConfig]:
    """The preset under every value ModelConfig allows for its parts: each registry's keys,
    multi-head, grouped-query and multi-query attention, tied or untied, the default or an
    explicit MLP width; dropout (no parameters) on every other one."""
    base, fields = MODEL_PRESETS[preset], ModelConfig.model_fields
    choices = [get_args(fields[name].annotation) for name in ("positions", "norm", "mlp")]
    options = itertools.product(*choices, (None, 1, base["n_head"] // 2), (True, False),
                                (None, 100))
    return [ModelConfig(**{**base, "vocab_size": 16_003, "positions": positions, "norm": norm,
                           "mlp": mlp, "n_kv_head": kv, "tie_embeddings": tie,
                           "mlp_hidden": hidden, "dropout": 0.1 * (i % 2)})
            for i, (positions, norm, mlp, kv, tie, hidden) in enumerate(options)]


@pytest.mark.parametrize("preset", list(MODEL_PRESETS))
def test_count_from_the_config_equals_the_built_model_for_every_option(preset, monkeypatch):
    """The one source of sizes, the parts' own parameter_count, against a model built on
    the meta device (shapes, no memory). Init only writes values, which meta tensors do
    not have, and is most of the time a meta build takes: skipped."""
    monkeypatch.setattr(GPT, "_init_weights", lambda self: None)
    for config in every_option(preset):
        with torch.device("meta"):
            model = GPT(config)
        for exclude in (False, True):
            assert count_parameters(config, exclude) == count_parameters(model, exclude), (
                config, exclude)


def test_vocab_size_comes_only_from_the_tokenizer():
    config = ModelConfig(**TINY).model_copy(update={"vocab_size": None})
    assert ModelConfig().vocab_size is None  # no default of its own
    with pytest.raises(ModelError, match="no vocab_size"):
        GPT(config)
    with pytest.raises(ModelError, match="no vocab_size"):
        count_parameters(config)
    with pytest.raises(ModelError, match="no vocab_size"):
        flops_per_token(config)
    assert count_parameters(config, exclude_embeddings=True) == count_parameters(
        make(), exclude_embeddings=True)


def test_untied_head_and_learned_positions_count_as_embeddings():
    tied = make(positions="learned")
    untied = make(positions="learned", tie_embeddings=False)
    C = tied.config.n_embd
    assert count_parameters(untied) - count_parameters(tied) == V * C
    assert count_parameters(untied, True) == count_parameters(tied, True)
    assert count_parameters(tied) - count_parameters(tied, True) == (V + T) * C


def test_flops_per_token_matches_hand_computation():
    config = ModelConfig(**MODEL_PRESETS["tiny"], vocab_size=8192)
    L, C, H, T_ = 4, 128, 384, 128
    n = L * (C * 3 * C + C * C + C * 2 * H + H * C + 2 * C) + C  # 853,120 non-embedding
    expected = 6 * (n + 8192 * C) + 12 * L * C * T_
    assert flops_per_token(config) == expected == 12_196_608
    assert flops_per_token(config, seq_len=1) == expected - 12 * L * C * (T_ - 1)


def test_defaults_are_the_small_preset_but_its_start():
    """The shape and components are small's. zero_init_proj, which small sets (issue 19),
    stays off by default: a recorded config that lacks it means what it always meant."""
    assert ModelConfig() != ModelConfig(**MODEL_PRESETS["small"])
    assert ModelConfig(zero_init_proj=True) == ModelConfig(**MODEL_PRESETS["small"])


# ---- config rules ---------------------------------------------------------------------

@pytest.mark.parametrize("values,message", [
    ({"n_embd": 100, "n_head": 3}, r"n_embd \(100\) must be divisible by n_head \(3\)"),
    ({"n_embd": 320, "n_head": 5, "n_kv_head": 2},
     r"n_head \(5\) must be divisible by n_kv_head \(2\)"),
    ({"n_embd": 36, "n_head": 4}, r"rope.*even head dim.*n_embd \(36\) / n_head \(4\) = 9"),
    ({"positions": "alibi"}, "positions"),
    ({"norm": "batchnorm"}, "norm"),
    ({"mlp": "relu"}, "mlp"),
    ({"dropout": 0.95}, "dropout"),
    ({"dropout": -0.1}, "dropout"),
    ({"block_size": 0}, "block_size"),
    ({"vocab_size": 100}, "vocab_size"),
    ({"n_layers": 4}, "n_layers"),
])
def test_config_rules_are_refused_naming_the_fields(values, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**values)


def test_odd_head_dim_is_fine_without_rope():
    config = ModelConfig(**{**TINY, "n_embd": 36, "positions": "sinusoidal"})
    assert GPT(config)(ids(1, 4)).shape == (1, 4, V)


def test_config_layer_turns_rule_breaks_into_config_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_embd = 100\nn_head = 3\n")
    with pytest.raises(ConfigError, match=r"n_embd \(100\) must be divisible by n_head"):
        load_stage_config(ModelConfig, "model", path, {})
    path.write_text("[model]\nblock_size = 0\n")
    with pytest.raises(ConfigError, match="model.block_size"):
        load_stage_config(ModelConfig, "model", path, {})
