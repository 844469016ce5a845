"""Our LoRA and DoRA layers against Hugging Face PEFT's: outputs, gradients, merged weights.

PEFT is a reference only (the `bench` extra); the module is skipped where it is absent.
Both sides get the same base weights, A, B, magnitude and scaling; PEFT's LoRA Linear
(peft/tuners/lora/layer.py, dora.py, variants.py) is the definition we match.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from fragment_llm.finetune.adapters import AdapterSpec, LoRALinear

peft = pytest.importorskip("peft")

IN, OUT = 24, 40
# (method, rank, alpha, rslora): LoRA and DoRA, plain and rank-stabilised scaling.
CASES = [(m, r, a, rs) for m, (r, a, rs) in itertools.product(
    ("lora", "dora"), ((4, 8.0, False), (8, 3.0, True), (1, 16.0, False)))]


class Tiny(nn.Module):
    """Two bias-free projections with the names PEFT is told to target."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(IN, OUT, bias=False)
        self.proj = nn.Linear(OUT, IN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.qkv(x)))


def pair(method: str, rank: int, alpha: float, rslora: bool, dropout: float = 0.0):
    """(ours, the model PEFT adapted, its PeftModel) on the same base weights, with PEFT's
    A, B and magnitude made ours."""
    torch.manual_seed(0)
    base = Tiny()
    spec = AdapterSpec(method=method, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
                       targets=("qkv",))
    ours = copy.deepcopy(base)
    ours.qkv = LoRALinear(ours.qkv, spec)
    ours.proj.requires_grad_(False)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["qkv"],
                             lora_dropout=dropout, use_dora=method == "dora",
                             use_rslora=rslora, init_lora_weights=True)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    theirs = peft_model.base_model.model  # the Tiny inside, its qkv now PEFT's LoRA Linear
    randomize(ours.qkv)
    with torch.no_grad():
        layer = theirs.qkv
        layer.lora_A["default"].weight.copy_(ours.qkv.lora_A)
        layer.lora_B["default"].weight.copy_(ours.qkv.lora_B)
        if method == "dora":
            layer.lora_magnitude_vector["default"].weight.copy_(ours.qkv.magnitude)
    return ours, theirs, peft_model


def randomize(layer: LoRALinear) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator))
        layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=generator))
        if layer.magnitude is not None:
            layer.magnitude.mul_(1.5 + torch.rand(layer.magnitude.shape, generator=generator))


def inputs() -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fresh_adapters_match_peft_init(method):
    """B = 0 and, for DoRA, magnitudes equal to the base's row norms, as PEFT makes them."""
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=False)
    ours = LoRALinear(copy.deepcopy(base), AdapterSpec(method=method, rank=4))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"],
                             use_dora=method == "dora")
    theirs = peft.get_peft_model(nn.ModuleDict({"qkv": base}), config).base_model.model.qkv
    assert torch.equal(ours.lora_B, theirs.lora_B["default"].weight)
    assert ours.lora_A.shape == theirs.lora_A["default"].weight.shape
    if method == "dora":
        torch.testing.assert_close(ours.magnitude, theirs.lora_magnitude_vector["default"].weight,
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,rank,alpha,rslora", CASES)
def test_outputs_and_gradients_match_peft(method, rank, alpha, rslora):
    ours, theirs, _ = pair(method, rank, alpha, rslora)
    assert ours.qkv.scale == theirs.qkv.scaling["default"]
    x, upstream = inputs(), torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(2))
    mine, reference = ours(x), theirs(x)
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)
    assert (mine - ours.proj(torch.tanh(x @ ours.qkv.weight.T))).abs().max() > 1e-2  # it acts
    (mine * upstream).sum().backward()
    (reference * upstream).sum().backward()
    grads = {"lora_A": theirs.qkv.lora_A["default"].weight.grad,
             "lora_B": theirs.qkv.lora_B["default"].weight.grad}
    if method == "dora":
        grads["magnitude"] = theirs.qkv.lora_magnitude_vector["default"].weight.grad
    for name, grad in grads.items():
        torch.testing.assert_close(getattr(ours.qkv, name).grad, grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_train_mode_dropout_matches_peft(method):
    """With the same dropout mask (same seed), including PEFT's DoRA form in which the
    base output sees the whole input and only the DoRA terms see the dropped one."""
    ours, theirs, _ = pair(method, 4, 8.0, False, dropout=0.4)
    ours.train(), theirs.train()
    torch.manual_seed(11)
    mine = ours(inputs())
    torch.manual_seed(11)
    torch.testing.assert_close(mine, theirs(inputs()), rtol=0, atol=1e-5)
    assert not torch.allclose(mine, ours.eval()(inputs()))  # the mask dropped something


@pytest.mark.parametrize("method,rank,alpha,rslora", CASES)
def test_merged_weights_match_peft_merge_and_unload(method, rank, alpha, rslora):
    ours, _, peft_model = pair(method, rank, alpha, rslora)
    merged = peft_model.merge_and_unload()
    assert type(merged.qkv) is nn.Linear
    torch.testing.assert_close(ours.qkv.merged_weight(), merged.qkv.weight, rtol=0, atol=1e-5)
    assert not torch.allclose(merged.qkv.weight, ours.qkv.weight, atol=1e-3)  # it merged
