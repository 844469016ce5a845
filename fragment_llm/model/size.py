"""What a model costs, read off its config: parameters, training FLOPs, peak memory.

Nothing here builds a model. `count_parameters(config)` sums the counts each part of the
GPT states for itself (model/gpt.py, model/components.py), rather than building the
model on the `meta` device: that imports torch's meta kernels, 77 MiB of RSS in a chat
process, and a hostile checkpoint's config is sized here before anything is built.

The memory estimate is deliberately simple and a little pessimistic: fp32 weights, gradients
and two AdamW moments, plus activations per layer as in Korthikanti et al. 2022
("Reducing Activation Recomputation in Large Transformer Models", eq. 2), and the
logits, which dominate for small models with large vocabularies. On a CPU the process
itself counts too: the interpreter and libraries, and the freed blocks the allocator
keeps for reuse (`train.keep_freed_memory`). Planned against peak RSS measured on 2
cores at vocab 16384 (docs/training.md): tiny 1,209 MiB planned for 1,139 measured,
small 1,518 for 1,235-1,500 (a short run, the 10-minute run), base 5,357 for 4,179.

`plan_inference` is the same estimate for `generate`, `chat` and `eval`: what the
`config.json` of a checkpoint implies before any of it is built (a hostile one can ask
for a 131,072-token context, whose KV cache and attention need gigabytes while the
weights are a few MB).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fragment_llm.config import ModelConfig, TrainConfig
from fragment_llm.errors import CheckpointError
from fragment_llm.model.gpt import GPT, vocab_size_of
from fragment_llm.safety.workers import SAFE_FRACTION
from fragment_llm.safety.workers import available_memory as host_available_memory

MiB = 1 << 20

# Python, torch, pyarrow and our modules take ~270 MiB of RSS before any tensor (measured);
# the rest is headroom for the data pipeline, the display and the evaluations.
CPU_RUNTIME = 480 << 20


def count_parameters(model: GPT | ModelConfig, exclude_embeddings: bool = False) -> int:
    """Trainable parameters of a model, or of the model a config describes.

    `exclude_embeddings` leaves out the token and learned-position tables and an untied
    lm_head, so the count is the same tied or untied: Kaplan et al.'s non-embedding N.
    """
    if isinstance(model, ModelConfig):
        return GPT.parameter_count(model, exclude_embeddings)
    skip = set()
    if exclude_embeddings:  # the same tables GPT.parameter_count leaves out
        skip = {"wte.weight", "lm_head.weight"}
        skip |= {f"positions.{name}" for name, _ in model.positions.named_parameters()}
    return sum(p.numel() for name, p in model.named_parameters() if name not in skip)


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), PaLM appendix B: 6 N' + 12 L C T.

    N' = non-embedding parameters + vocab * n_embd (the output matmul, tied or not; the
    input lookup is free). 6 = 2 per multiply-add times 3 (forward, two backward matmuls).
    12 L C T counts attention scores and weighted sums (2 matmuls of T x C per token per
    layer, forward 4 L C T, times 3), with T = seq_len (default block_size), ignoring
    the causal half saved, as PaLM does (Chowdhery et al. 2022). Norms and activations
    are left out.
    """
    T = config.block_size if seq_len is None else seq_len
    matmul_params = count_parameters(config, exclude_embeddings=True)
    matmul_params += vocab_size_of(config) * config.n_embd
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * T


@dataclass(frozen=True)
class MemoryPlan:
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    runtime: int = 0  # the process and the allocator's kept blocks (host RAM only)
    cache: int = 0  # inference: the KV cache and the position tables

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.activations
                + self.logits + self.runtime + self.cache)


def layer_activation_bytes(model: ModelConfig, batch: int, bytes_per_value: int) -> int:
    """Activations of one block over `batch` full blocks of tokens (Korthikanti eq. 2)."""
    tokens = batch * model.block_size
    per_layer = tokens * model.n_embd * 17 + 2.5 * batch * model.n_head * model.block_size ** 2
    return int(per_layer * bytes_per_value)


def activation_bytes(model: ModelConfig, batch: int, bytes_per_value: int,
                     checkpointing: bool) -> int:
    """Saved activations for one micro-batch; with checkpointing only block inputs
    plus one block's worth are alive at once."""
    per_layer = layer_activation_bytes(model, batch, bytes_per_value)
    if checkpointing:
        tokens = batch * model.block_size
        return model.n_layer * tokens * model.n_embd * bytes_per_value + per_layer
    return model.n_layer * per_layer


def plan_memory(model: ModelConfig, train: TrainConfig, precision: str,
                device_type: str = "cpu", trainable: int | None = None) -> MemoryPlan:
    """Peak memory of training `model`: weights, and gradients plus AdamW's two moments
    for the `trainable` parameters (all of them unless said: LoRA trains few)."""
    params = count_parameters(model)
    trainable = params if trainable is None else trainable
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    logits = 3 * train.batch_size * model.block_size * vocab_size_of(model) * 4
    # The allocator keeps freed logits-sized blocks that later, differently sized
    # requests cannot reuse: half a copy of the logits covers what was measured.
    # On CUDA the limit is VRAM, where the process does not live; on a CPU or MPS
    # (unified memory) the limit is host RAM, which holds the process too.
    runtime = CPU_RUNTIME + logits // 2 if device_type != "cuda" else 0
    return MemoryPlan(
        parameters=params, weights=4 * params, gradients=4 * trainable,
        optimizer=8 * trainable, activations=activation_bytes(model, train.batch_size, act_bytes,
                                     train.activation_checkpointing),
        logits=logits, runtime=runtime)


def plan_inference(model: ModelConfig, device_type: str = "cpu",
                   eval_batch: int | None = None) -> MemoryPlan:
    """Peak memory to load a checkpoint of `model` and run it in fp32, without gradients.

    `generate`/`chat` (no `eval_batch`): a KV cache over the whole context (batch 1),
    one block's activations and the causal mask of a full-window prefill, the last
    position's logits. `eval`: `eval_batch` full blocks at once, no cache, every
    position's logits and their log-softmax. Either way the weights count twice: the
    verified file's bytes are held while they are copied into the model.
    """
    T, C, V = model.block_size, model.n_embd, vocab_size_of(model)
    params = count_parameters(model)
    tables = {"rope": T * model.head_dim * 8,  # cos, sin (fp32) and their complex table
              "sinusoidal": T * C * 4}.get(model.positions, 0)
    if eval_batch is None:
        kv = 2 * model.n_layer * model.kv_heads * T * model.head_dim * 4
        activations = layer_activation_bytes(model, 1, 4) + T * T  # + the bool mask
        cache, logits = tables + kv, 2 * V * 4
    else:
        activations = layer_activation_bytes(model, eval_batch, 4)
        cache, logits = tables, 2 * eval_batch * T * V * 4
    return MemoryPlan(parameters=params, weights=8 * params, gradients=0, optimizer=0,
                      activations=activations, logits=logits,
                      runtime=CPU_RUNTIME if device_type != "cuda" else 0, cache=cache)


def available_memory(device: torch.device) -> int:
    """Free memory on the device: VRAM for CUDA, MemAvailable for CPU (and MPS)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_memory()


def default_memory_limit(device: torch.device) -> int:
    return int(available_memory(device) * SAFE_FRACTION)


def check_inference_memory(config: ModelConfig, folder: Path, device: torch.device,
                           eval_batch: int | None = None) -> MemoryPlan:
    """Refuse a config whose planned peak memory (`memplan.plan_inference`) is past the
    limit `train` uses by default (80% of the memory available now), before any of it is
    allocated: the parameter count does not bound the KV cache or the attention."""
    plan = plan_inference(config, device.type, eval_batch)
    limit = default_memory_limit(device)
    if plan.total > limit:
        use = "generate" if eval_batch is None else f"evaluate {eval_batch} blocks at once"
        raise CheckpointError(
            f"config.json plans {plan.total / MiB:,.0f} MiB to {use} ({config.n_layer} "
            f"layers, a {config.block_size:,}-token context), over the limit of "
            f"{limit / MiB:,.0f} MiB ({SAFE_FRACTION:.0%} of the memory available), in "
            f"{folder / 'config.json'}",
            hint="run it where more memory is free; a config.json that asks for a huge "
                 "context or depth with few weights is a sign that it was edited")
    return plan
