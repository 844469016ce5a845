"""Low-rank adapters on the GPT's linear layers: LoRA and DoRA, attach, load, merge.

This module owns the adapter math and how adapters sit in a model: which projections
can carry one (`TARGETS`), the `LoRALinear` layer that replaces a targeted `nn.Linear`,
the names and shapes of the adapter tensors, and folding an adapter back into plain
weights. It does no I/O and knows nothing of files or artifacts: the adapter artifact
(its manifest, hashes, caps) lives with the fine-tuning run, which hands tensors in and
out through `adapter_tensors` and `load_adapter_tensors`.

LoRA (Hu et al. 2021): y = x W^T + s (x A^T) B^T, W frozen, A (rank, in) Kaiming-uniform,
B (out, rank) zeros, so an adapter starts as the identity edit; s = alpha / rank, or
alpha / sqrt(rank) with rsLoRA (Kalajdzievski 2023).
DoRA (Liu et al. 2024): y = m / ||W + s B A||_row * (x W^T + s (x A^T) B^T), with a trained
magnitude m (out,) initialised to the row norms of W, and the norm treated as a constant
(no gradient through it, the paper's section 4.3). Both follow Hugging Face PEFT's
`peft/tuners/lora` (layer.py, dora.py, variants.py) so that the same A, B, m and scaling
give the same outputs and merged weights (tests/finetune/test_peft_equivalence.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragment_llm.config import ModelConfig

Method = Literal["lora", "dora"]
METHODS: tuple[str, ...] = get_args(Method)

# The name a user passes -> the suffix of the module path it adapts in every block.
TARGETS: dict[str, str] = {"qkv": "attn.qkv", "attn_proj": "attn.proj",
                           "mlp_fc": "mlp.fc", "mlp_proj": "mlp.proj"}
MAX_RANK = 256  # an adapter is small by definition; the artifact loader caps ranks here
ADAPTER_TENSOR_NAMES = ("lora_A", "lora_B", "magnitude")  # per adapted layer; magnitude: DoRA


@dataclass(frozen=True)
class AdapterSpec:
    """Which layers get an adapter, and its shape and scaling."""

    method: Method = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, in train mode only
    targets: tuple[str, ...] = tuple(TARGETS)
    rslora: bool = False  # scale by alpha / sqrt(rank): updates keep their size as rank grows

    def __post_init__(self) -> None:
        # The user-facing ranges are checked (with hints) by the config; these are the
        # invariants the math needs, whoever builds a spec.
        if self.method not in METHODS:
            raise ValueError(f"adapter method {self.method!r} is not one of {METHODS}")
        if not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"adapter rank {self.rank} is outside 1..{MAX_RANK}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"adapter alpha {self.alpha} must be a positive finite number")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout {self.dropout} is outside [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"adapter targets {list(self.targets)} must be distinct names "
                             f"among {list(TARGETS)}, at least one")

    @property
    def scale(self) -> float:
        """The factor s on the low-rank update s B A."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRALinear(nn.Linear):
    """A frozen bias-free Linear plus a trainable low-rank update (and, for DoRA, a magnitude).

    `weight` is the wrapped layer's own Parameter, so the base keeps its state_dict name
    (`...qkv.weight`) and no copy of it is made. Adapter parameters: `lora_A` (rank, in),
    `lora_B` (out, rank) and, for DoRA, `magnitude` (out,); they take the base weight's
    device and dtype. Training never forms W + s B A for LoRA: the update is two thin
    matmuls. DoRA forms it once per forward, without gradient, for its row norms.
    """

    magnitude: nn.Parameter | None

    def __init__(self, base: nn.Linear, spec: AdapterSpec) -> None:
        if base.bias is not None:
            raise ValueError("adapters wrap bias-free Linear layers; this one has a bias")
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        self.method, self.rank, self.scale = spec.method, spec.rank, spec.scale
        self.dropout = spec.dropout
        like = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(spec.rank, self.in_features, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear, LoRA and PEFT
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, spec.rank, **like))
        self.register_parameter("magnitude", None)
        if spec.method == "dora":  # with B = 0 these are the row norms of W
            norms = torch.linalg.vector_norm(self._updated_weight(), dim=1)
            self.magnitude = nn.Parameter(norms.to(base.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        base = F.linear(x, self.weight)  # (..., out)
        dropping = self.training and self.dropout > 0
        dropped = F.dropout(x, self.dropout) if dropping else x
        update = self.scale * F.linear(F.linear(dropped, self.lora_A), self.lora_B)  # (..., out)
        if self.magnitude is None:
            return base + update
        norm = torch.linalg.vector_norm(self._updated_weight(), dim=1)  # detached, section 4.3
        magnitude_scale = self._magnitude_scale(norm).to(base.dtype)  # (out,)
        if not dropping:
            return magnitude_scale * (base + update)
        # As PEFT (variants.py, DoraLinearVariant.forward): the base output keeps the whole
        # input; only the DoRA correction (m/||.|| - 1) x W^T and the update see dropout.
        correction = (magnitude_scale - 1) * F.linear(dropped, self.weight)
        return base + correction + magnitude_scale * update

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The plain weight equal to this layer: W + s B A for LoRA; for DoRA that matrix's
        rows rescaled to the magnitudes, m / ||W + s B A||_row * (W + s B A). In W's dtype."""
        updated = self._updated_weight()  # (out, in), fp32
        if self.magnitude is not None:
            norm = torch.linalg.vector_norm(updated, dim=1)
            updated = self._magnitude_scale(norm).float()[:, None] * updated
        return updated.to(self.weight.dtype)

    @torch.no_grad()
    def _updated_weight(self) -> Tensor:
        """W + s B A (out, in) in fp32, outside autocast and without gradient: the norms
        DoRA divides by are exact even when the layer runs in bf16."""
        with torch.autocast(self.weight.device.type, enabled=False):
            delta = self.lora_B.float() @ self.lora_A.float()  # (out, in)
            return self.weight.float() + self.scale * delta

    def _magnitude_scale(self, norm: Tensor) -> Tensor:
        """m / norm per output row (out,). A row of W + s B A that is all zeros has no
        direction and gives zero output whatever its magnitude, so it is scaled by 0
        instead of 0/0; the inner `where` keeps that row's gradient finite too."""
        nonzero = norm > 0
        safe_norm = torch.where(nonzero, norm, torch.ones_like(norm))
        scale = self.magnitude / safe_norm.to(self.magnitude.dtype)
        return torch.where(nonzero, scale, torch.zeros_like(scale))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"method={self.method}, rank={self.rank}, scale={self.scale:g}, "
                f"dropout={self.dropout:g}")


# ----------------------------------------------------------------------------------------
# A model's adapters: attach, list, load, merge.


def attach_adapters(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Freeze every parameter of `model` and replace each targeted Linear by a LoRALinear
    wrapping its weight, in place; returns the adapted module paths in model order.

    The adapters are initialised from torch's global RNG: seed it for a repeatable run.
    """
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise ValueError("the model already carries adapters; attach to a fresh base model")
    suffixes = tuple(TARGETS[name] for name in spec.targets)
    paths = [path for path, module in model.named_modules()
             if isinstance(module, nn.Linear) and _ends_with_any(path, suffixes)]
    if not paths:
        raise ValueError(f"the model has no layer named like {list(suffixes)} to adapt")
    for param in model.parameters():
        param.requires_grad_(False)
    for path in paths:
        _replace(model, path, LoRALinear(model.get_submodule(path), spec))
    return paths


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The adapter parameters only, detached, by state_dict name in model order:
    {"blocks.0.attn.qkv.lora_A": ..., "blocks.0.attn.qkv.lora_B": ..., ...}."""
    tensors = {}
    for path, layer in _adapted_layers(model):
        for name in ADAPTER_TENSOR_NAMES:
            param = getattr(layer, name)
            if param is not None:
                tensors[f"{path}.{name}"] = param.detach()
    return tensors


def expected_adapter_shapes(config: ModelConfig, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
    """What `adapter_tensors` gives for a GPT of `config` adapted by `spec`, from the config
    alone, so an adapter file is checked before anything is allocated."""
    widths = _target_widths(config)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(config.n_layer):
        for name in (n for n in TARGETS if n in spec.targets):  # model order
            fan_in, fan_out = widths[name]
            path = f"blocks.{layer}.{TARGETS[name]}"
            shapes[f"{path}.lora_A"] = (spec.rank, fan_in)
            shapes[f"{path}.lora_B"] = (fan_out, spec.rank)
            if spec.method == "dora":
                shapes[f"{path}.magnitude"] = (fan_out,)
    return shapes


def load_adapter_tensors(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy `tensors` into the model's adapters in place. The names must be exactly the
    model's adapter names, each with the same shape and dtype and finite values; the first
    one that is not raises ValueError naming it, before anything is copied."""
    own = adapter_tensors(model)
    missing, unexpected = own.keys() - tensors.keys(), tensors.keys() - own.keys()
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise ValueError(f"adapter tensor {name!r} is "
                         f"{'missing' if missing else 'not one this model has'}")
    for name, target in own.items():
        given = tensors[name]
        if given.shape != target.shape or given.dtype != target.dtype:
            raise ValueError(f"adapter tensor {name!r} is {given.dtype} {tuple(given.shape)}, "
                             f"the model needs {target.dtype} {tuple(target.shape)}")
        if not torch.isfinite(given).all():
            raise ValueError(f"adapter tensor {name!r} holds non-finite values")
    with torch.no_grad():
        for name, target in own.items():
            target.copy_(tensors[name])


def merge_adapters(model: nn.Module) -> None:
    """Replace each LoRALinear by a plain bias-free Linear holding its `merged_weight()`, in
    place, and make every parameter trainable again: the result is an ordinary model with
    the base's state_dict names."""
    for path, layer in _adapted_layers(model):
        merged = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        merged.weight = nn.Parameter(layer.merged_weight())  # meta: no random init to discard
        merged.train(layer.training)
        _replace(model, path, merged)
    for param in model.parameters():
        param.requires_grad_(True)


def trainable_parameter_count(model: nn.Module) -> int:
    """Parameters the optimizer will update: the adapters' after attaching, all after merging."""
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


# ----------------------------------------------------------------------------------------
# Helpers.


def _target_widths(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target, as model/gpt.py and model/components.py build
    them: qkv yields n_head query heads then kv_heads key and value heads; SwiGLU's fc is
    the fused gate and up projection, twice the hidden width."""
    qkv_width = (config.n_head + 2 * config.kv_heads) * config.head_dim
    fc_width = (2 if config.mlp == "swiglu" else 1) * config.hidden_dim
    return {"qkv": (config.n_embd, qkv_width), "attn_proj": (config.n_embd, config.n_embd),
            "mlp_fc": (config.n_embd, fc_width), "mlp_proj": (config.hidden_dim, config.n_embd)}


def _adapted_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(path, module) for path, module in model.named_modules()
            if isinstance(module, LoRALinear)]


def _ends_with_any(path: str, suffixes: tuple[str, ...]) -> bool:
    return any(path == suffix or path.endswith("." + suffix) for suffix in suffixes)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)
