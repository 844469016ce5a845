"""finetune.adapters: LoRA/DoRA layers on the GPT, their names and shapes, load, merge."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fragment_llm.config import ModelConfig
from fragment_llm.finetune.adapters import (
    MAX_RANK,
    TARGETS,
    AdapterSpec,
    LoRALinear,
    adapter_tensors,
    attach_adapters,
    expected_adapter_shapes,
    load_adapter_tensors,
    merge_adapters,
    trainable_parameter_count,
)
from fragment_llm.model.gpt import GPT
from tests.helpers import tiny_gpt

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, T = 256, 12
# SwiGLU and GELU MLPs, multi-head and grouped-query attention (4 query heads, 2 kv heads).
VARIANTS = list(itertools.product(("swiglu", "gelu"), (None, 2)))
SPECS = [AdapterSpec(method=m, rank=4, alpha=a, rslora=r)
         for m, (a, r) in itertools.product(("lora", "dora"), ((8.0, False), (3.0, True)))]


def base_model(mlp="swiglu", n_kv_head=None, **config) -> GPT:
    return tiny_gpt(vocab_size=V, block_size=T, n_head=4, mlp=mlp, n_kv_head=n_kv_head, **config)


def ids(B=2, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def adapted(spec: AdapterSpec, mlp="swiglu", n_kv_head=None, seed=0) -> GPT:
    model = base_model(mlp, n_kv_head)
    torch.manual_seed(seed)
    attach_adapters(model, spec)
    return model


def randomize_adapters(model: nn.Module, seed=2) -> None:
    """Nonzero A, B and magnitudes, so every term of the math shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in adapter_tensors(model).items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("magnitude"):
                tensor.mul_(1 + 0.5 * noise.tanh())  # stays positive, moves off the init
            else:
                tensor.copy_(0.1 * noise)


def base_names(model: nn.Module) -> set[str]:
    return set(dict(model.named_parameters()))


# ------------------------------------------------------------------ the spec


def test_scale_is_alpha_over_rank_or_its_square_root_with_rslora():
    assert AdapterSpec(rank=8, alpha=16.0).scale == 2.0
    assert AdapterSpec(rank=16, alpha=8.0, rslora=True).scale == 2.0


@pytest.mark.parametrize("fields", [
    {"method": "ia3"}, {"rank": 0}, {"rank": MAX_RANK + 1}, {"alpha": 0.0},
    {"alpha": math.inf}, {"alpha": math.nan}, {"dropout": 1.0}, {"dropout": -0.1},
    {"targets": ()}, {"targets": ("qkv", "qkv")}, {"targets": ("q_proj",)},
])
def test_spec_refuses_nonsense(fields):
    with pytest.raises(ValueError, match="adapter"):
        AdapterSpec(**fields)


# ------------------------------------------------------------------ attaching


@pytest.mark.parametrize("targets", [tuple(TARGETS), ("qkv",), ("attn_proj", "mlp_proj")])
def test_attach_adapts_exactly_the_targets_and_freezes_the_base(targets):
    model = base_model()
    names, weights = base_names(model), {p: m.weight for p, m in model.named_modules()
                                         if isinstance(m, nn.Linear)}
    paths = attach_adapters(model, AdapterSpec(targets=targets))
    suffixes = [TARGETS[t] for t in targets]
    assert paths == [f"blocks.{i}.{s}" for i in range(2) for s in TARGETS.values()
                     if s in suffixes]
    for path in paths:  # the base weight is the same Parameter, not a copy
        assert model.get_submodule(path).weight is weights[path]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_tensors(model))
    assert names == base_names(model) - trainable  # the base keeps its state_dict names
    assert trainable_parameter_count(model) == sum(t.numel() for t in
                                                   adapter_tensors(model).values())


def test_init_is_kaiming_uniform_a_zero_b_and_row_norm_magnitudes_from_the_global_rng():
    model = adapted(AdapterSpec(method="dora", rank=4), seed=5)
    again = adapted(AdapterSpec(method="dora", rank=4), seed=5)
    other = adapted(AdapterSpec(method="dora", rank=4), seed=6)
    layer = model.get_submodule("blocks.0.mlp.proj")
    bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) = nn.Linear's
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3
    assert torch.equal(layer.lora_B, torch.zeros(layer.out_features, 4))
    assert torch.allclose(layer.magnitude, layer.weight.norm(dim=1))
    mine, same, different = (adapter_tensors(m) for m in (model, again, other))
    assert all(torch.equal(mine[n], same[n]) for n in mine)
    assert not torch.equal(mine["blocks.0.attn.qkv.lora_A"], different["blocks.0.attn.qkv.lora_A"])


def test_attach_refuses_a_second_time_a_model_without_targets_and_a_bias():
    model = base_model()
    attach_adapters(model, AdapterSpec())
    with pytest.raises(ValueError, match="already carries adapters"):
        attach_adapters(model, AdapterSpec())
    with pytest.raises(ValueError, match="no layer named like"):
        attach_adapters(nn.Sequential(nn.Linear(4, 4)), AdapterSpec())
    with pytest.raises(ValueError, match="has a bias"):
        attach_adapters(nn.ModuleDict({"attn": nn.ModuleDict({"qkv": nn.Linear(4, 4)})}),
                        AdapterSpec(targets=("qkv",)))


# ------------------------------------------------------------------ outputs


@pytest.mark.parametrize("mlp,n_kv_head", VARIANTS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_a_fresh_adapter_leaves_outputs_unchanged_in_eval_and_in_train_with_dropout(
        mlp, n_kv_head, method):
    model = base_model(mlp, n_kv_head)
    with torch.no_grad():
        before = model(ids())
    attach_adapters(model, AdapterSpec(method=method, dropout=0.3))
    for training in (False, True):  # B = 0: the update is zero, dropped inputs or not
        with torch.no_grad():
            after = model.train(training)(ids())
        if method == "lora":
            assert torch.equal(after, before)
        else:  # m / ||W|| = 1 up to rounding
            torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mlp,n_kv_head", VARIANTS)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_merged_model_equals_base_plus_adapter(mlp, n_kv_head, spec):
    model = adapted(spec, mlp, n_kv_head)
    randomize_adapters(model)
    names = base_names(base_model(mlp, n_kv_head))
    with torch.no_grad():
        adapted_logits = model(ids())
    unchanged = model.wte.weight.clone()
    merge_adapters(model)
    with torch.no_grad():
        merged_logits = model(ids())
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=0, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert base_names(model) == names and set(model.state_dict()) == names
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model.wte.weight, unchanged)
    assert not model.training  # merging keeps the mode


def test_the_adapter_changes_outputs_so_merge_is_tested_on_real_updates():
    for spec in SPECS:
        model = adapted(spec)
        with torch.no_grad():
            fresh = model(ids())
        randomize_adapters(model)
        with torch.no_grad():
            assert (model(ids()) - fresh).abs().max() > 1e-2


@settings(max_examples=40)
@given(fan_in=st.integers(1, 24), fan_out=st.integers(1, 24), rank=st.integers(1, 8),
       alpha=st.floats(0.5, 64.0), method=st.sampled_from(["lora", "dora"]),
       rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_merged_weight_is_the_layer(fan_in, fan_out, rank, alpha, method, rslora, seed):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(fan_in, fan_out, bias=False),
                       AdapterSpec(method=method, rank=rank, alpha=alpha, rslora=rslora))
    randomize_adapters(layer, seed)
    x = torch.randn(3, 5, fan_in)
    with torch.no_grad():
        torch.testing.assert_close(x @ layer.merged_weight().T, layer(x), rtol=1e-5, atol=1e-5)


def test_dora_merged_rows_have_the_magnitudes_as_norms():
    layer = LoRALinear(nn.Linear(16, 8, bias=False), AdapterSpec(method="dora", rank=2))
    randomize_adapters(layer)
    torch.testing.assert_close(layer.merged_weight().norm(dim=1), layer.magnitude.detach())


def test_dora_on_an_all_zero_row_stays_finite():
    base = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        base.weight[1] = 0.0  # a pruned row, or a zero-initialised output projection
    layer = LoRALinear(base, AdapterSpec(method="dora", rank=2)).train()
    x = torch.randn(5, 8)
    out = layer(x)
    out.sum().backward()
    assert torch.equal(out[:, 1], torch.zeros(5))
    grads = [layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad]
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(layer.merged_weight()).all()


def test_merge_keeps_dtype_and_a_merged_layer_is_a_plain_linear():
    model = adapted(AdapterSpec(method="dora")).to(torch.bfloat16)
    merge_adapters(model)
    fc = model.get_submodule("blocks.1.mlp.fc")
    assert type(fc) is nn.Linear and fc.weight.dtype == torch.bfloat16 and fc.bias is None


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_only_adapters_get_gradients(method):
    model = adapted(AdapterSpec(method=method, dropout=0.1)).train()
    randomize_adapters(model)
    model(ids()).square().mean().backward()
    adapters = set(adapter_tensors(model))
    for name, param in model.named_parameters():
        if name in adapters:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_dora_treats_the_weight_norm_as_a_constant():
    """DoRA section 4.3: gradients flow as if ||W + s B A|| were a fixed number."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 6, bias=False), AdapterSpec(method="dora", rank=3))
    randomize_adapters(layer)
    x, upstream = torch.randn(4, 12), torch.randn(4, 6)
    (layer(x) * upstream).sum().backward()
    ours = [layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad]
    A, B, m = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B,
                                                             layer.magnitude))
    W, s = layer.weight, layer.scale
    norm = (W + s * B @ A).norm(dim=1).detach()
    ((m / norm) * (x @ W.T + s * (x @ A.T) @ B.T) * upstream).sum().backward()
    for mine, reference in zip(ours, (A.grad, B.grad, m.grad), strict=True):
        torch.testing.assert_close(mine, reference)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_dropout_acts_in_train_mode_only(method):
    model = adapted(AdapterSpec(method=method, dropout=0.5))
    plain = adapted(AdapterSpec(method=method))
    randomize_adapters(model)
    randomize_adapters(plain)
    with torch.no_grad():
        evaluated = model.eval()(ids())
        assert torch.equal(evaluated, plain.eval()(ids()))
        first, second = model.train()(ids()), model(ids())
    assert not torch.allclose(first, evaluated) and not torch.allclose(first, second)


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        model = adapted(AdapterSpec(method="dora", dropout=0.2)).train()
        randomize_adapters(model)
        model.activation_checkpointing = recompute
        torch.manual_seed(3)  # the same dropout masks, recomputed or not
        model(ids()).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() == set(adapter_tensors(model))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


# ------------------------------------------------------------------ names, shapes, loading


@settings(max_examples=30)
@given(n_layer=st.integers(1, 3), kv_heads=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([2, 4, 8]), mlp=st.sampled_from(["swiglu", "gelu"]),
       mlp_hidden=st.one_of(st.none(), st.integers(1, 40)),
       targets=st.sets(st.sampled_from(list(TARGETS)), min_size=1),
       method=st.sampled_from(["lora", "dora"]), rank=st.integers(1, 6))
def test_expected_shapes_are_the_attached_models(n_layer, kv_heads, head_dim, mlp, mlp_hidden,
                                                 targets, method, rank):
    config = ModelConfig(vocab_size=V, n_layer=n_layer, n_head=4, n_kv_head=kv_heads,
                         n_embd=4 * head_dim, block_size=8, mlp=mlp, mlp_hidden=mlp_hidden)
    spec = AdapterSpec(method=method, rank=rank, targets=tuple(sorted(targets)))
    model = GPT(config)
    attach_adapters(model, spec)
    expected = expected_adapter_shapes(config, spec)
    assert list(expected.items()) == [(n, tuple(t.shape)) for n, t in
                                      adapter_tensors(model).items()]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_loading_adapter_tensors_reproduces_the_adapted_model(method):
    trained = adapted(AdapterSpec(method=method), seed=0)
    randomize_adapters(trained)
    fresh = adapted(AdapterSpec(method=method), seed=1)
    saved = {name: tensor.clone() for name, tensor in adapter_tensors(trained).items()}
    load_adapter_tensors(fresh, saved)
    with torch.no_grad():
        assert torch.equal(fresh(ids()), trained(ids()))


def broken(tensors: dict, how: str) -> tuple[dict, str]:
    """`tensors` with one thing wrong, and the name the refusal must give."""
    name = "blocks.1.mlp.fc.lora_B"
    tensors = dict(tensors)
    if how == "missing":
        del tensors[name]
    elif how == "unexpected":
        name = "blocks.1.mlp.gate.lora_A"
        tensors[name] = torch.zeros(4, 32)
    elif how == "shape":
        tensors[name] = torch.zeros(tensors[name].shape[0], 5)
    elif how == "dtype":
        tensors[name] = tensors[name].double()
    else:
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = {"nan": math.nan, "inf": math.inf}[how]
    return tensors, name


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape", "dtype", "nan", "inf"])
def test_loading_refuses_wrong_tensors_by_name_and_copies_nothing(how):
    model = adapted(AdapterSpec(rank=4))
    before = {n: t.clone() for n, t in adapter_tensors(model).items()}
    good = {n: torch.ones_like(t) for n, t in before.items()}
    tensors, name = broken(good, how)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_adapter_tensors(model, tensors)
    assert all(torch.equal(t, before[n]) for n, t in adapter_tensors(model).items())
