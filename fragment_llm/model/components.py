"""The GPT's interchangeable parts: positions, norms, MLPs, dropout, and their registries.

Each part is picked by name from a registry, POSITIONS, NORMS or MLPS, whose keys are
exactly the values ModelConfig accepts (a test keeps them equal). Each part also states
how many parameters it creates, `parameter_count(config)`, beside the code that creates
them: model sizes are read off a config without building anything (model/size.py), and a
test holds every stated count equal to the built module's. A new part goes here: its
class, its count, and one registry entry.

This module owns the parts, not how they are wired together (model/gpt.py) or the loss
(model/loss.py). Papers: RoPE (Su et al. 2021), RMSNorm (Zhang & Sennrich 2019), SwiGLU
(Shazeer 2020), sinusoidal positions (Vaswani et al. 2017), ReLU^2 (So et al. 2021,
"Primer"), the logit softcap (Gemma 2, Team et al. 2024).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fragment_llm.config import ModelConfig


class Component(Protocol):
    """A registry entry: a module class built from the config, sized without building."""

    def __call__(self, config: ModelConfig) -> nn.Module: ...

    def parameter_count(self, config: ModelConfig) -> int: ...


# ----------------------------------------------------------------------------------------
# Positions: absolute schemes add a vector to each token embedding; RoPE instead rotates
# queries and keys inside attention, so the same interface offers both hooks. Their
# parameters, if any, are lookup tables: embeddings in Kaplan et al.'s sense.


class Positions(nn.Module):
    """Base: adds nothing and rotates nothing. `start` is the absolute position of idx[:, 0]."""

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        return 0

    def embed(self, x: Tensor, start: int) -> Tensor:
        return x

    def rotation(self, start: int, T: int) -> Tensor | None:
        return None


class RotaryPositions(Positions):
    """RoPE: rotate each channel pair (2i, 2i+1) of q and k by angle pos * theta^(-2i/hs)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hs = config.head_dim
        freq = config.rope_theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
        angle = torch.outer(torch.arange(config.block_size, dtype=torch.float64), freq)
        # Real cos/sin, not one complex buffer: module.to(bfloat16) would drop its imaginary
        # part. Non-persistent: derived from the config, so checkpoints neither carry nor
        # trust them.
        self.register_buffer("cos", angle.cos().float()[:, None, :], persistent=False)
        self.register_buffer("sin", angle.sin().float()[:, None, :], persistent=False)
        self._table: Tensor | None = None  # complex cos + i sin, built on first use

    def rotation(self, start: int, T: int) -> Tensor:
        # Slicing a prebuilt complex table is one op; building it per call was four, and
        # at T = 1 (decoding) per-op overhead is what a token costs. Rebuilt lazily so
        # `.to(device)` after construction still works.
        table = self._table
        if table is None or table.device != self.cos.device:
            table = self._table = torch.complex(self.cos.float(), self.sin.float())
        return table[start:start + T]  # (T, 1, hs/2)


class LearnedPositions(Positions):
    """GPT-2: one trained vector per position."""

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        return config.block_size * config.n_embd  # wpe

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wpe = nn.Embedding(config.block_size, config.n_embd)

    def embed(self, x: Tensor, start: int) -> Tensor:
        return x + self.wpe.weight[start:start + x.size(1)]  # (B, T, C) + (T, C)


class SinusoidalPositions(Positions):
    """Vaswani et al. 2017: sin on even channels, cos on odd ones, wavelengths up to 10000."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C = config.n_embd
        freq = 10000.0 ** (-torch.arange(0, C, 2, dtype=torch.float64) / C)
        angle = torch.outer(torch.arange(config.block_size, dtype=torch.float64), freq)
        table = torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(1)[:, :C]  # (block, C)
        self.register_buffer("table", table.float(), persistent=False)

    def embed(self, x: Tensor, start: int) -> Tensor:
        return x + self.table[start:start + x.size(1)]  # (B, T, C) + (T, C)


def apply_rotary(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate x (B, T, H, hs) by unit complex numbers (T, 1, hs/2), one per channel pair.

    One complex multiply forward and one backward: on CPU 2.5x faster than the
    rotate-half form (cat of four products). fp32 inside, so bf16 keeps its angles.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, hs/2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)  # (B, T, H, hs)


# ----------------------------------------------------------------------------------------
# Norms.


class RMSNorm(nn.Module):
    """x / rms(x) * gain: LayerNorm without the mean and the bias (Zhang & Sennrich 2019).

    Training goes through _RMSNormFunction, whose hand-written backward makes a forward +
    backward ~1.4x faster on CPU than autograd through the formula (and ~1.7x faster than
    F.rms_norm, a composite of pow, mean, add, rsqrt and muls there).
    """

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        return config.n_embd  # the gain

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.n_embd))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            # No backward to pay for: the fused kernel is ~2x faster at T = 1.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return _RMSNormFunction.apply(x, self.weight, self.eps)  # (B, T, C)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps), with a fused backward.

    Autograd through the formula saves x * rstd for the gain's gradient and runs a mul
    per node; this saves only x and rstd (B, T, 1) and forms dx in four passes:
    dx = rstd * (g - x_hat * mean(g * x_hat)), g = dy * w.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_() / x.size(-1)
        rstd = mean_square.add_(eps).rsqrt_()  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat).flatten(0, -2).sum(0)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None
        g = grad * weight
        mean_dot = torch.linalg.vecdot(g, x_hat).unsqueeze(-1).div_(x.size(-1))
        return g.sub_(x_hat.mul_(mean_dot)).mul_(rstd), grad_weight, None


class LayerNorm(nn.LayerNorm):
    """GPT-2's LayerNorm, with bias; a single fused kernel forward and backward."""

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        return 2 * config.n_embd  # gain and bias

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.n_embd, eps=config.norm_eps)


# ----------------------------------------------------------------------------------------
# MLPs. No biases: the hidden width is the config's (ModelConfig.hidden_dim).


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), then W_down. Gate and up share one matmul."""

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        return 3 * config.n_embd * config.hidden_dim  # fc (gate and up), proj

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.hidden_dim, bias=False)
        self.proj = nn.Linear(config.hidden_dim, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(_SwiGLUFunction.apply(self.fc(x)))


class _SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up from the fused (..., 2 hidden) projection [gate | up].

    Autograd through chunk() would build the two halves' gradients apart and then cat
    them, a copy of the widest activation per layer; this backward writes both halves
    of one tensor in place (silu_backward's out= form for the gate).
    """

    @staticmethod
    def forward(ctx, fused: Tensor) -> Tensor:
        gate, up = fused.chunk(2, dim=-1)  # (B, T, hidden) each, views
        activated = F.silu(gate)
        ctx.save_for_backward(fused, activated)
        return activated * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        fused, activated = ctx.saved_tensors
        gate, up = fused.chunk(2, dim=-1)
        grad_fused = torch.empty_like(fused)
        grad_gate, grad_up = grad_fused.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_fused


class GeluMLP(nn.Module):
    """GPT-2's MLP: W_down gelu(x W_up), tanh-approximated GELU as in GPT-2."""

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        return 2 * config.n_embd * config.hidden_dim  # fc, proj

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.proj = nn.Linear(config.hidden_dim, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class ReLU2MLP(GeluMLP):
    """Primer's MLP: W_down relu(x W_up)^2. GELU's two matrices (and count), at 3/2
    SwiGLU's hidden width (ModelConfig.hidden_dim): SwiGLU's parameters and FLOPs."""

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(_ReLUSquaredFunction.apply(self.fc(x)))


class _ReLUSquaredFunction(torch.autograd.Function):
    """relu(h)^2, keeping only r = relu(h) for backward: d/dh = 2 r (r is 0 where h < 0).
    Autograd through relu then square would keep both h's relu mask and r."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        r = F.relu(h)  # (B, T, hidden)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (r,) = ctx.saved_tensors
        return (grad * r).mul_(2.0)


def softcap(logits: Tensor, cap: float) -> Tensor:
    """cap * tanh(logits / cap): logits squashed smoothly into (-cap, cap) (Gemma 2).

    Without a gradient to keep, in place; with one, an autograd Function that keeps only
    its output (the logits are the widest activation: autograd through the formula
    would keep tanh's output and allocate a third logits-sized tensor)."""
    if not torch.is_grad_enabled() or not logits.requires_grad:
        return logits.div(cap).tanh_().mul_(cap)
    return _SoftcapFunction.apply(logits, cap)


class _SoftcapFunction(torch.autograd.Function):
    """y = cap tanh(x / cap); dy/dx = 1 - tanh^2 = 1 - (y / cap)^2."""

    @staticmethod
    def forward(ctx, x: Tensor, cap: float) -> Tensor:
        y = x.div(cap).tanh_().mul_(cap)
        ctx.save_for_backward(y)
        ctx.cap = cap
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (y,) = ctx.saved_tensors
        slope = (y / ctx.cap).square_().neg_().add_(1.0)
        return slope.mul_(grad), None


def dropout(config: ModelConfig) -> nn.Module:
    """Dropout, or Identity when p = 0: a no-op module call still costs time per token."""
    return nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()


# ----------------------------------------------------------------------------------------
# The registries: config value -> part.

POSITIONS: dict[str, type[Positions]] = {
    "rope": RotaryPositions, "learned": LearnedPositions, "sinusoidal": SinusoidalPositions}
NORMS: dict[str, Component] = {"rmsnorm": RMSNorm, "layernorm": LayerNorm}
MLPS: dict[str, Component] = {"swiglu": SwiGLU, "gelu": GeluMLP, "relu2": ReLU2MLP}
