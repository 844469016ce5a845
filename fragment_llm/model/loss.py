"""The training objective: next-token cross-entropy, and bits per byte to report it.

`lm_loss(logits, targets)` is the mean cross-entropy in nats, with the same value and
gradient as F.cross_entropy but a hand-written autograd function that keeps less memory
(the logits are the largest activation of a small model). `bits_per_byte` turns a loss
into a number that does not depend on the tokenizer. This module knows nothing about the
network that made the logits (model/gpt.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


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


def bits_per_byte(loss_nats: float, tokens: int, text_bytes: int) -> float:
    """Tokenizer-independent quality: nats/token x tokens/byte / ln 2."""
    if text_bytes <= 0:
        return float("nan")
    return loss_nats * tokens / text_bytes / math.log(2)
