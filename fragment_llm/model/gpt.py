"""The GPT decoder: token ids in, next-token logits out.

This module owns how the parts are wired, and nothing else: no text, no files, no
printing, no device choice. `GPT(config).forward(idx)` maps ids (B, T) to logits
(B, T, vocab); the loss is model/loss.py's `lm_loss`, kept separate. Generation passes a
`KVCache` to `forward` so each new token costs one position of work instead of the whole
prefix (sampling lives in inference/engine.py). The interchangeable parts (positions,
norms, MLPs) and their registries are in model/components.py; sizes and costs in
model/size.py.

The block is pre-norm (GPT-2): x + attn(norm(x)), then x + mlp(norm(x)). Each module
that creates parameters states how many, `parameter_count(config)`, next to the code
that creates them; `GPT.parameter_count` sums them, so a config is sized without
building a model.

Papers: GPT-2 (Radford et al. 2019), grouped-query attention (Ainslie et al. 2023),
activation checkpointing (Chen et al. 2016).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fragment_llm.config import ModelConfig
from fragment_llm.errors import ModelError
from fragment_llm.model.components import (
    MLPS,
    NORMS,
    POSITIONS,
    apply_rotary,
    dropout,
    softcap,
)

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

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        qkv_width = (config.n_head + 2 * config.kv_heads) * config.head_dim
        return config.n_embd * qkv_width + config.n_embd * config.n_embd  # qkv, proj

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # which slot of a KVCache is ours
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        # One matmul yields q (n_head heads), then k and v (n_kv_head heads each).
        qkv_width = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_width, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout
        # QK-norm: unit-RMS q and k per head bound the attention logits, so a larger
        # learning rate cannot blow them up (Dehghani et al. 2023; modded-nanogpt).
        self.qk_norm_eps = config.norm_eps if config.qk_norm else None

    def forward(self, x: Tensor, rotation: Tensor | None, mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        B, T, C = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, self.head_dim)  # (B, T, nh + 2 nkv, hs)
        qk, v = qkv.split((nh + nkv, nkv), dim=2)
        if self.qk_norm_eps is not None:  # q and k together: one pass, no gain
            qk = F.rms_norm(qk, (self.head_dim,), eps=self.qk_norm_eps)
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

    @staticmethod
    def parameter_count(config: ModelConfig) -> int:
        return (2 * NORMS[config.norm].parameter_count(config)
                + CausalSelfAttention.parameter_count(config)
                + MLPS[config.mlp].parameter_count(config))

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

    @staticmethod
    def parameter_count(config: ModelConfig, exclude_embeddings: bool = False) -> int:
        """Parameters of the model `config` describes, summed from its parts' own counts.

        `exclude_embeddings` leaves out the token table, the position parts' tables and an
        untied lm_head, so the count is the same tied or untied: Kaplan et al.'s
        non-embedding N.
        """
        body = (config.n_layer * Block.parameter_count(config)
                + NORMS[config.norm].parameter_count(config)  # + norm_f
                + (config.n_layer if config.x0_mix else 0))  # x0_scales
        if exclude_embeddings:
            return body
        tables = (1 if config.tie_embeddings else 2) * vocab_size_of(config) * config.n_embd
        return body + tables + POSITIONS[config.positions].parameter_count(config)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(vocab_size_of(config), config.n_embd)
        self.positions = POSITIONS[config.positions](config)
        self.drop = dropout(config)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # x0 mix (modded-nanogpt): block i reads x + x0_scales[i] * x0, x0 the embedded
        # input, so every layer can see the tokens themselves however deep it sits.
        # Zero at init: the model starts as the one without the option.
        self.x0_scales = nn.Parameter(torch.zeros(config.n_layer)) if config.x0_mix else None
        self.norm_f = NORMS[config.norm](config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(
            config.n_embd, vocab_size_of(config), bias=False)
        # Trade compute for memory in training: keep only each block's input and redo
        # the block's forward during backward (the trainer's --activation-checkpointing).
        self.activation_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2: N(0, 0.02) for matrices and embeddings; norms at gain 1, bias 0.

        The projections that write into the residual stream (attn.proj, mlp.proj) get
        0.02 / sqrt(2 n_layer), so the stream's variance does not grow with depth. With
        `zero_init_proj` they start at zero instead (modded-nanogpt): each block starts
        as the identity. They are drawn first all the same, so every other tensor gets
        the values it has without the option.
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if param.dim() >= 2:
                residual = name.endswith("proj.weight")
                nn.init.normal_(param, mean=0.0, std=residual_std if residual else 0.02)
                if residual and self.config.zero_init_proj:
                    nn.init.zeros_(param)

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
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.x0_scales is not None:
                x = x + self.x0_scales[i] * x0
            if recompute and cache is None:
                x = checkpoint(block, x, rotation, mask, None, use_reentrant=False)
            else:
                x = block(x, rotation, mask, cache)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.norm_f(x), weight)  # (B, T, vocab)
        if self.config.logit_softcap is not None:  # training, evaluation and generation alike
            logits = softcap(logits, self.config.logit_softcap)
        return logits

    def _check_fits(self, B: int, end: int, cache: KVCache | None) -> None:
        limit = self.config.block_size if cache is None else cache.max_len
        if end > limit:
            raise ModelError(f"sequence reaches position {end}, past the "
                             f"{'block_size' if cache is None else 'KV cache length'} {limit}",
                             hint="crop the context to its most recent tokens")
        if cache is not None and cache.batch_size != B:
            raise ModelError(f"batch of {B} sequences does not match the KV cache's "
                             f"{cache.batch_size}")


def vocab_size_of(config: ModelConfig) -> int:
    """The config's vocab_size, which a model cannot do without. None in a [model] table
    means "the tokenizer's": training fills it in before anything is built or sized."""
    if config.vocab_size is None:
        raise ModelError("the model config has no vocab_size",
                         hint="set it from the tokenizer: vocab_size=tokenizer.vocab_size")
    return config.vocab_size
