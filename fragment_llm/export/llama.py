"""Our GPT as a Llama: which checkpoints have one, and its tensors under Llama's names.

A GPT built from RoPE + RMSNorm + SwiGLU (the default components) computes exactly what
`LlamaForCausalLM` computes, with three differences of layout, none of arithmetic:

- q, k and v are one fused matrix here (`qkv`, rows: n_head q heads, then n_kv_head k
  heads, then n_kv_head v heads); Llama has three. SwiGLU's gate and up are one matrix
  (`fc`, rows [gate | up]); Llama has `gate_proj` and `up_proj`.
- RoPE rotates channel pairs (2i, 2i+1) here, as Meta's original Llama and llama.cpp
  do; transformers rotates (i, i + hs/2) (`rotate_half`). So for Hugging Face each q and
  k head's rows are permuted, evens first then odds: the dot products q·k are unchanged,
  because the same permutation is applied to both. GGUF keeps our order (llama.cpp's
  `convert_hf_to_gguf.py` undoes the same permutation on its way in).
- Tied embeddings have no `lm_head` tensor: `tie_word_embeddings` says so.

Any other component (learned or sinusoidal positions, LayerNorm, a GELU MLP) has no
Llama equivalent, and `refuse_unfaithful` names it. This module reads weights and
returns tensors; it writes no file.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from fragment_llm.config import ModelConfig
from fragment_llm.errors import ModelError

# The component values a Llama reproduces, and what to call each other value in a refusal.
FAITHFUL = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
UNFAITHFUL_NAMES = {"learned": "learned position embeddings (GPT-2's wpe)",
                    "sinusoidal": "sinusoidal position encodings",
                    "layernorm": "LayerNorm (Llama has RMSNorm only)",
                    "gelu": "a GELU MLP (Llama has SwiGLU only)",
                    "relu2": "a ReLU² MLP (Llama has SwiGLU only)"}
# The issue-19 options (ModelConfig.candidate_options) a Llama has no place for.
UNFAITHFUL_OPTIONS = {"qk_norm": "RMSNorm on q and k",
                      "logit_softcap": "a tanh cap on the logits",
                      "x0_mix": "the embedding mixed into every block's input"}


def refuse_unfaithful(config: ModelConfig) -> None:
    """One line naming the first component a Llama cannot reproduce, if any."""
    hint = f"export supports {', '.join(FAITHFUL.values())} models (the default components)"
    for field, supported in FAITHFUL.items():
        value = getattr(config, field)
        if value != supported:
            raise ModelError(f"cannot export model.{field} = {value!r}: "
                             f"{UNFAITHFUL_NAMES.get(value, value)} has no faithful Llama "
                             "equivalent", hint=hint)
    for option in config.candidate_options:
        if option in UNFAITHFUL_OPTIONS:
            raise ModelError(f"cannot export model.{option} = {getattr(config, option)!r}: "
                             f"{UNFAITHFUL_OPTIONS[option]} has no faithful Llama equivalent",
                             hint=hint)


def hf_config(config: ModelConfig, bos_id: int, eos_ids: list[int]) -> dict[str, object]:
    """transformers' `config.json` for the LlamaForCausalLM `config` describes."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd,
        "intermediate_size": config.hidden_dim, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps, "hidden_act": "silu",
        # Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": 0.02,
        "bos_token_id": bos_id, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "torch_dtype": "float32", "use_cache": True,
    }


def rotate_half_order(weight: Tensor, heads: int) -> Tensor:
    """Rows of each head reordered evens then odds: pairs (2i, 2i+1) become (i, i + hs/2).

    For one head of 4 rows [r0, r1, r2, r3] -> [r0, r2, r1, r3].
    """
    rows, cols = weight.shape
    hs = rows // heads
    return weight.view(heads, hs // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _layer_matrices(state: dict[str, Tensor], config: ModelConfig, layer: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Layer `layer`'s q, k, v (our RoPE order), gate and up matrices."""
    q_rows, kv_rows = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    qkv = state[f"blocks.{layer}.attn.qkv.weight"]  # (q_rows + 2 kv_rows, C)
    q, k, v = qkv.split((q_rows, kv_rows, kv_rows), dim=0)
    gate, up = state[f"blocks.{layer}.mlp.fc.weight"].chunk(2, dim=0)  # (hidden, C) each
    return q, k, v, gate, up


def _named(state: dict[str, Tensor], config: ModelConfig, names: dict[str, str],
           rotate_half: bool) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the Llama, in model order, under the names `names` gives."""
    yield names["embed"], state["wte.weight"]
    for i in range(config.n_layer):
        q, k, v, gate, up = _layer_matrices(state, config, i)
        if rotate_half:
            q, k = rotate_half_order(q, config.n_head), rotate_half_order(k, config.kv_heads)
        block = names["block"].format(i=i)
        for part, tensor in (("attn_norm", state[f"blocks.{i}.attn_norm.weight"]),
                             ("q", q), ("k", k), ("v", v),
                             ("o", state[f"blocks.{i}.attn.proj.weight"]),
                             ("mlp_norm", state[f"blocks.{i}.mlp_norm.weight"]),
                             ("gate", gate), ("up", up),
                             ("down", state[f"blocks.{i}.mlp.proj.weight"])):
            yield block + names[part], tensor
    yield names["norm"], state["norm_f.weight"]
    if not config.tie_embeddings:
        yield names["head"], state["lm_head.weight"]


# Ours -> transformers' LlamaForCausalLM (docs/export.md has the table).
HF_NAMES = {"embed": "model.embed_tokens.weight", "block": "model.layers.{i}.",
            "attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
            "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
            "o": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
            "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
            "down": "mlp.down_proj.weight", "norm": "model.norm.weight",
            "head": "lm_head.weight"}
# Ours -> llama.cpp's GGUF tensor names.
GGUF_NAMES = {"embed": "token_embd.weight", "block": "blk.{i}.",
              "attn_norm": "attn_norm.weight", "q": "attn_q.weight", "k": "attn_k.weight",
              "v": "attn_v.weight", "o": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
              "gate": "ffn_gate.weight", "up": "ffn_up.weight", "down": "ffn_down.weight",
              "norm": "output_norm.weight", "head": "output.weight"}


def model_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's tensors in fp32 on the CPU, detached."""
    return {name: tensor.detach().to("cpu", torch.float32)
            for name, tensor in model.state_dict().items()}


def hf_tensors(model: torch.nn.Module, config: ModelConfig) -> dict[str, Tensor]:
    """The model as LlamaForCausalLM's state dict: contiguous fp32 tensors, one per name."""
    return {name: tensor.contiguous() for name, tensor in
            _named(model_state(model), config, HF_NAMES, rotate_half=True)}


def gguf_tensors(model: torch.nn.Module, config: ModelConfig) -> dict[str, Tensor]:
    """The model under llama.cpp's names, q and k in our (llama.cpp's) RoPE order."""
    return {name: tensor.contiguous() for name, tensor in
            _named(model_state(model), config, GGUF_NAMES, rotate_half=False)}
