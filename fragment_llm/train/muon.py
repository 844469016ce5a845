"""Muon for the blocks' matrices and AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) is SGD with Nesterov
momentum whose update is replaced by the nearest semi-orthogonal matrix, ~U V^T of its
SVD U S V^T, found by a few Newton-Schulz iterations. It suits the hidden matrices only:
embeddings, the output head, norms and scalars stay on AdamW (`train.optimizer = "muon"`,
docs/training.md).

torch 2.13's `torch.optim.Muon` computes the same update, but its Newton-Schulz runs in
bf16, which a CPU without AVX-512 BF16 emulates, and it would orthogonalise the fused qkv
(and SwiGLU's fused gate|up) as one matrix, where q, k and v are three. Here the
iteration runs in fp32 on each logical matrix (`split_rows`), batched when they have one
shape. One optimizer rather than a Muon and an AdamW side by side: the trainer, the grad
scaler, clipping and the checkpoint's optimizer file (checkpoint/optimizer.py) all see
one state dict, with AdamW's own state keys for the AdamW part.

This module owns the update rule; the schedule (lr, momentum warmup) is set on the
groups by the trainer each step, as it does for AdamW.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw  # the functional kernel behind torch.optim.AdamW

from fragment_llm.config import TrainConfig

# Keller Jordan's quintic coefficients: the steepest slope at 0 that still lands singular
# values in ~[0.7, 1.2] after 5 steps (not exactly 1, which does not hurt training).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def orthogonalize(update: Tensor, steps: int) -> Tensor:
    """~U V^T for each matrix of `update` (k, m, n) = U S V^T, in fp32.

    X <- a X + (b A + c A^2) X with A = X X^T, after scaling X to Frobenius norm 1 (so its
    spectral norm is at most 1); on the wide orientation, where X X^T is the smaller.
    """
    a, b, c = NS_COEFFICIENTS
    x = update.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
    for _ in range(steps):
        gram = x @ x.mT  # (k, m, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Groups whose `kind` is "muon" take Muon steps; the others are AdamW groups, stepped
    by torch's own AdamW kernel (fused on CPU and CUDA) with AdamW's state keys, so
    their arithmetic is exactly `torch.optim.AdamW`'s.

    A Muon group holds matrices that split by rows the same way, `split_rows`: a fused
    qkv (n_head + 2 n_kv_head) hs x C splits into q, k and v. Each part is orthogonalised
    alone and scaled by sqrt(max(1, rows / cols)), Keller Jordan's rule, so a tall
    matrix's update has the RMS of a square one's.
    """

    def __init__(self, groups: list[dict]) -> None:
        super().__init__(groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ANN001 - torch's signature
        if closure is not None:
            raise TypeError("MuonAdamW.step takes no closure")
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)

    def _muon_step(self, group: dict) -> None:
        momentum, lr = group["momentum"], group["lr"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param)
            buffer = state["momentum_buffer"].lerp_(param.grad, 1 - momentum)
            nesterov = param.grad.lerp(buffer, momentum)  # (rows, cols)
            update = torch.cat([_scaled_orthogonal(part, group["ns_steps"]).flatten(0, 1)
                                for part in _parts(nesterov, group["split_rows"])])
            param.mul_(1 - lr * group["weight_decay"])
            param.add_(update.to(param.dtype), alpha=-lr)

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        fused = params[0].device.type in ("cuda", "cpu")
        for p in params:
            state = self.state[p]
            if not state:  # as torch.optim.AdamW creates it, so checkpoints look alike
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        adamw(
            params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params], [],
            [self.state[p]["step"] for p in params], foreach=None if fused else True,
            fused=fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _parts(matrix: Tensor, split_rows: tuple[int, ...]) -> list[Tensor]:
    """The logical matrices of a fused one, stacked (k, rows, cols) where shapes agree:
    q, k, v of multi-head attention are one batch of 3; grouped-query's q stands apart."""
    pieces = matrix.split(list(split_rows))
    by_shape: dict[torch.Size, list[Tensor]] = defaultdict(list)
    for piece in pieces:
        by_shape[piece.shape].append(piece)
    if len(by_shape) == 1:
        return [torch.stack(pieces)]
    return [piece[None] for piece in pieces]


def split_rows(name: str, param: Tensor, model: nn.Module) -> tuple[int, ...]:
    """How a block matrix splits into logical ones: qkv into q, k, v; SwiGLU's fc into
    gate and up; any other is one matrix. Keyed by GPT's parameter names (model/gpt.py)."""
    config = getattr(model, "config", None)
    rows = param.size(0)
    if config is None:
        return (rows,)
    if name.endswith("attn.qkv.weight"):
        kv = config.kv_heads * config.head_dim
        if rows == config.n_embd + 2 * kv:
            return (config.n_embd, kv, kv)
    if name.endswith("mlp.fc.weight") and config.mlp == "swiglu" and rows == 2 * config.hidden_dim:
        return (config.hidden_dim, config.hidden_dim)
    return (rows,)


def _scaled_orthogonal(parts: Tensor, steps: int) -> Tensor:
    """`orthogonalize(parts)` (k, rows, cols) times sqrt(max(1, rows / cols))."""
    return orthogonalize(parts, steps).mul_(math.sqrt(max(1.0, parts.size(1) / parts.size(2))))


def build_muon(model: nn.Module, config: TrainConfig) -> MuonAdamW:
    """Muon over the 2-D matrices inside the transformer blocks; AdamW (decay on matrices
    only, as `build_optimizer`) over the embeddings, an untied head, norms and scalars."""
    muon: dict[tuple[int, ...], list[Tensor]] = defaultdict(list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("blocks.") and param.dim() == 2:
            muon[split_rows(name, param, model)].append(param)
        elif param.dim() >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    common = {"kind": "adamw", "lr": config.lr, "betas": (config.beta1, config.beta2), "eps": 1e-8}
    groups = [{**common, "params": decay, "weight_decay": config.weight_decay},
              {**common, "params": no_decay, "weight_decay": 0.0}]
    for split, params in muon.items():
        groups.append({"kind": "muon", "params": params, "lr": config.muon_lr,
                       "momentum": config.muon_momentum, "split_rows": split,
                       "weight_decay": config.muon_weight_decay, "ns_steps": config.muon_ns_steps})
    return MuonAdamW(groups)
