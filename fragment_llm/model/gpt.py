"""The GPT decoder: token ids in, next-token logits out.

This module owns the network and nothing else: no text, no files, no printing, no device
choice. `GPT(config).forward(idx)` maps ids (B, T) to logits (B, T, vocab); the loss is
`lm_loss`, kept separate. Generation passes a `KVCache` to `forward` so each new token
costs one position of work instead of the whole prefix (sampling lives in generate.py).

The block is pre-norm (GPT-2): x + attn(norm(x)), then x + mlp(norm(x)). Components are
picked by name from three small registries, POSITIONS, NORMS and MLPS, whose keys are
exactly the values ModelConfig accepts.

Papers: GPT-2 (Radford et al. 2019), RoPE (Su et al. 2021), RMSNorm (Zhang & Sennrich
2019), SwiGLU (Shazeer 2020), grouped-query attention (Ainslie et al. 2023), FLOPs
accounting (PaLM, Chowdhery et al. 2022, appendix B).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fragment_llm.config import ModelConfig
from fragment_llm.errors import ModelError

# ----------------------------------------------------------------------------------------
# Positions: absolute schemes add a vector to each token embedding; RoPE instead rotates
# queries and keys inside attention, so the same interface offers both hooks.


class Positions(nn.Module):
    """Base: adds nothing and rotates nothing. `start` is the absolute position of idx[:, 0]."""

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
# Norms and MLPs. Each registry maps a config value to a constructor taking the config.


class RMSNorm(nn.Module):
    """x / rms(x) * gain: LayerNorm without the mean and the bias (Zhang & Sennrich 2019).

    Training goes through _RMSNormFunction, whose hand-written backward makes a forward +
    backward ~1.4x faster on CPU than autograd through the formula (and ~1.7x faster than
    F.rms_norm, a composite of pow, mean, add, rsqrt and muls there).
    """

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


def layer_norm(config: ModelConfig) -> nn.Module:
    """GPT-2's LayerNorm, with bias; a single fused kernel forward and backward."""
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up), then W_down. Gate and up share one matmul."""

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

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.proj = nn.Linear(config.hidden_dim, config.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def dropout(config: ModelConfig) -> nn.Module:
    """Dropout, or Identity when p = 0: a no-op module call still costs time per token."""
    return nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()


POSITIONS: dict[str, Callable[[ModelConfig], Positions]] = {
    "rope": RotaryPositions, "learned": LearnedPositions, "sinusoidal": SinusoidalPositions}
NORMS: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "rmsnorm": RMSNorm, "layernorm": layer_norm}
MLPS: dict[str, Callable[[ModelConfig], nn.Module]] = {"swiglu": SwiGLU, "gelu": GeluMLP}


# ----------------------------------------------------------------------------------------
# The KV cache: what generation keeps between forward calls.


class KVCache:
    """Keys and values of every past position, for every layer, allocated once.

    `k` and `v` are (n_layer, B, n_kv_head, max_len, head_dim); `pos` counts the positions
    filled. `GPT.forward(idx, cache)` treats idx (B, T) as positions pos..pos+T-1, writes
    their keys/values in each layer, and advances `pos` by T. Prefill the prompt in one
    call (or several chunks), then decode one token per call.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int | None = None, *,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        max_len = config.block_size if max_len is None else max_len
        if not 1 <= max_len <= config.block_size:
            raise ModelError(f"KV cache length {max_len} is outside 1..block_size "
                             f"({config.block_size})")
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache on the model's device, in its dtype."""
        weight = model.wte.weight
        return cls(model.config, batch_size, max_len, device=weight.device, dtype=weight.dtype)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def reset(self) -> None:
        """Forget every position (the buffers are reused, not cleared)."""
        self.pos = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, nkv, T, hs) at pos..pos+T; return all keys/values so far."""
        T, end = k.size(2), self.pos + k.size(2)
        self.k[layer].narrow(2, self.pos, T).copy_(k)
        self.v[layer].narrow(2, self.pos, T).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)  # (B, nkv, end, hs)

    def causal_mask(self, T: int) -> Tensor | None:
        """Mask for T new queries against pos cached + T new keys (True = may attend).

        None where SDPA needs none: a single query sees everything cached, and with an
        empty cache `is_causal` is exact. Example, pos=2, T=2 -> [[1,1,1,0], [1,1,1,1]].
        """
        if T == 1 or self.pos == 0:
            return None
        mask = torch.ones(T, self.pos + T, dtype=torch.bool, device=self.k.device)
        return mask.tril(diagonal=self.pos)  # (T, pos + T)


# ----------------------------------------------------------------------------------------
# The transformer.


class CausalSelfAttention(nn.Module):
    """Multi-head attention; grouped-query when n_kv_head < n_head (heads share k/v)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # which slot of a KVCache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # One matmul yields q (n_head heads), then k and v (n_kv_head heads each).
        qkv_width = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_width, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x: Tensor, rotation: Tensor | None, mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        B, T, C = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, self.head_dim)  # (B, T, nh + 2 nkv, hs)
        qk, v = qkv.split((nh + nkv, nkv), dim=2)
        if rotation is not None:
            qk = apply_rotary(qk, rotation)  # rotate q and k together: one pass, not two
        q, k = qk.split((nh, nkv), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh|nkv, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nkv, pos + T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1, enable_gqa=nkv != nh)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = NORMS[config.norm](config)
        self.attn = CausalSelfAttention(config, layer)
        self.mlp_norm = NORMS[config.norm](config)
        self.mlp = MLPS[config.mlp](config)
        self.drop = dropout(config)

    def forward(self, x: Tensor, rotation: Tensor | None, mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rotation, mask, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))  # (B, T, C)


class GPT(nn.Module):
    """A decoder-only transformer over token ids 0..vocab_size-1.

    With tied embeddings (the default) there is no `lm_head` module: the output layer is
    `F.linear(x, wte.weight)`. The state dict therefore holds every tensor once, no two
    names share storage, and `safetensors.torch.save_file(model.state_dict(), ...)` works
    as is; loading is `load_state_dict(strict=True)` with the same names.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.positions = POSITIONS[config.positions](config)
        self.drop = dropout(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = NORMS[config.norm](config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(
            config.n_embd, config.vocab_size, bias=False)
        # Trade compute for memory in training: keep only each block's input and redo
        # the block's forward during backward (the trainer's --activation-checkpointing).
        self.activation_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2: N(0, 0.02) for matrices and embeddings; norms at gain 1, bias 0.

        The projections that write into the residual stream (attn.proj, mlp.proj) get
        0.02 / sqrt(2 n_layer), so the stream's variance does not grow with depth.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if param.dim() >= 2:
                std = residual_std if name.endswith("proj.weight") else 0.02
                nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, idx: Tensor, cache: KVCache | None = None, *,
                last_only: bool = False) -> Tensor:
        """Logits (B, T, vocab) for ids (B, T); with a cache, for positions cache.pos onward.

        `last_only` returns (B, 1, vocab) for the last position only: a prefill needs
        nothing else, and the output layer is the widest matmul of the model.
        """
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        self._check_fits(B, start + T, cache)
        x = self.drop(self.positions.embed(self.wte(idx), start))  # (B, T, C)
        rotation = self.positions.rotation(start, T)
        mask = None if cache is None else cache.causal_mask(T)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute and cache is None:
                x = checkpoint(block, x, rotation, mask, None, use_reentrant=False)
            else:
                x = block(x, rotation, mask, cache)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(self.norm_f(x), weight)  # (B, T, vocab)

    def _check_fits(self, B: int, end: int, cache: KVCache | None) -> None:
        limit = self.config.block_size if cache is None else cache.max_len
        if end > limit:
            raise ModelError(f"sequence reaches position {end}, past the "
                             f"{'block_size' if cache is None else 'KV cache length'} {limit}",
                             hint="crop the context to its most recent tokens")
        if cache is not None and cache.batch_size != B:
            raise ModelError(f"batch of {B} sequences does not match the KV cache's "
                             f"{cache.batch_size}")


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """Mean next-token cross-entropy in nats; logits (B, T, V), targets (B, T).

    Positions whose target is `ignore_index` do not count (all ignored -> 0, not NaN).
    Same value and gradient as F.cross_entropy, with less memory (see _CrossEntropy).
    """
    return _CrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index)


_UNDERFLOW = 1e-30  # far above fp32's smallest normal (1.2e-38): -log stays exact above it


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy that keeps the softmax and turns it into the gradient in place:
    softmax - one_hot, scaled. F.cross_entropy instead allocates a zero tensor and a
    gradient tensor the size of the logits (B*T x vocab, the largest activation), and
    keeping log-probabilities would cost an exp pass over them in backward: this saves
    both, ~35% of the loss's forward + backward on CPU (docs/model.md).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        # (N, V); at least fp32, so bf16 logits under autocast still get an exact softmax
        probs = torch.softmax(logits, dim=-1,
                              dtype=torch.promote_types(logits.dtype, torch.float32))
        keep = targets != ignore_index  # (N,)
        safe = targets.where(keep, 0)  # ignored rows pick class 0, then weigh 0
        count = keep.sum().clamp(min=1)
        picked = probs.gather(1, safe[:, None]).squeeze(1)  # (N,)
        nll = picked.log().neg_()
        # A probability that underflowed (a target more than ~69 nats below the best)
        # would read as an infinite loss: those rows, rare, get logsumexp - logit instead.
        rows = (picked < _UNDERFLOW).nonzero().squeeze(1)
        if rows.numel():
            row_logits = logits[rows].to(probs.dtype)
            nll[rows] = (torch.logsumexp(row_logits, dim=-1)
                         - row_logits.gather(1, safe[rows, None]).squeeze(1))
        ctx.save_for_backward(probs, safe, keep, count)
        return (nll * keep).sum() / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        probs, safe, keep, count = ctx.saved_tensors
        # in place: probs belongs to this node alone, and autograd's version counter
        # refuses a second backward through it (retain_graph) instead of lying
        grad = probs.scatter_add_(1, safe[:, None], torch.full_like(probs[:, :1], -1.0))
        return grad.mul_((keep * (grad_loss / count))[:, None]), None, None


# ----------------------------------------------------------------------------------------
# Size and cost.


def _embedding_names(model: GPT) -> set[str]:
    """Lookup tables (token, learned positions) and an untied output head (Kaplan's N)."""
    names = {"wte.weight", "lm_head.weight"}
    return names | {f"positions.{n}" for n, _ in model.positions.named_parameters()}


def count_parameters(model: GPT | ModelConfig, exclude_embeddings: bool = False) -> int:
    """Trainable parameters of a model, or of the model a config describes.

    `exclude_embeddings` leaves out the token and learned-position tables and an untied
    lm_head, so the count is the same tied or untied: Kaplan et al.'s non-embedding N.
    """
    if isinstance(model, ModelConfig):
        body, embeddings = _config_counts(model)
        return body if exclude_embeddings else body + embeddings
    skip = _embedding_names(model) if exclude_embeddings else set()
    return sum(p.numel() for name, p in model.named_parameters() if name not in skip)


def _config_counts(config: ModelConfig) -> tuple[int, int]:
    """(non-embedding, embedding) parameters, by arithmetic on the config.

    Not by building the model on the `meta` device: that imports torch's meta kernels,
    77 MiB of RSS in a chat process, and a hostile checkpoint's config is sized here
    before anything is built. Tests hold it equal to counting a real model.
    """
    C, H, hs = config.n_embd, config.hidden_dim, config.head_dim
    norm = 2 * C if config.norm == "layernorm" else C  # LayerNorm has a bias
    attention = C * (config.n_head + 2 * config.kv_heads) * hs + C * C  # qkv + proj
    mlp = (3 if config.mlp == "swiglu" else 2) * C * H
    body = config.n_layer * (attention + mlp + 2 * norm) + norm  # + the final norm
    embeddings = config.vocab_size * C * (1 if config.tie_embeddings else 2)
    if config.positions == "learned":
        embeddings += config.block_size * C
    return body, embeddings


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N' + 12 L C T.

    N' = non-embedding parameters + vocab * n_embd (the output matmul, tied or not; the
    input lookup is free). 6 = 2 per multiply-add times 3 (forward, two backward matmuls).
    12 L C T counts attention scores and weighted sums (2 matmuls of T x C per token per
    layer, forward 4 L C T, times 3), with T = seq_len (default block_size), ignoring
    the causal half saved, as PaLM does. Norms and activations are left out.
    """
    T = config.block_size if seq_len is None else seq_len
    matmul_params = count_parameters(config, exclude_embeddings=True)
    matmul_params += config.vocab_size * config.n_embd
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * T


def bits_per_byte(loss_nats: float, tokens: int, text_bytes: int) -> float:
    """Tokenizer-independent quality: nats/token x tokens/byte / ln 2."""
    if text_bytes <= 0:
        return float("nan")
    return loss_nats * tokens / text_bytes / math.log(2)
