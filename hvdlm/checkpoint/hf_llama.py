"""The llama arch in and out of transformers: `LlamaForCausalLM`'s config.json and tensor names.

hvdlm's llama computes what LlamaForCausalLM computes from the same weights: RMSNorm in fp32, RoPE over the two
halves of each head (transformers' rotate_half; its conversion script permutes Meta's interleaved q/k rows into
that order, so no permutation is needed here), SwiGLU, grouped-query attention. The names map one to one, except
hvdlm's fused q, k, v matrix, which is transformers' q_proj, k_proj and v_proj stacked (q: n_head heads, k and v:
n_kv_head heads each). transformers stores Linear weights as torch does, (out, in): nothing is transposed.

hvdlm.checkpoint.hf calls these for model_type "llama" (and GPT-2's for "gpt2"); what is common to both (the
files, the tokenizer, the directory written whole) is there.
"""

from __future__ import annotations

from typing import Any

import torch

from hvdlm.config import ModelConfig
from hvdlm.errors import InputError

# hvdlm name -> transformers LlamaForCausalLM name; {i} is a block's index. Biases only where model.bias is on
# (transformers' attention_bias covers q, k, v and o; mlp_bias the three MLP matrices).
LLAMA_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "blocks.{i}.ln_1.weight": "model.layers.{i}.input_layernorm.weight",
    "blocks.{i}.attn.proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blocks.{i}.ln_2.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blocks.{i}.mlp.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blocks.{i}.mlp.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blocks.{i}.mlp.down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "ln_f.weight": "model.norm.weight",
}
LLAMA_BIASES = {
    "blocks.{i}.attn.proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blocks.{i}.mlp.gate.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "blocks.{i}.mlp.up.bias": "model.layers.{i}.mlp.up_proj.bias",
    "blocks.{i}.mlp.down.bias": "model.layers.{i}.mlp.down_proj.bias",
}
QKV = "blocks.{i}.attn.qkv.{kind}"  # <-> model.layers.{i}.self_attn.{q,k,v}_proj.{kind}
HEAD = ("head.weight", "lm_head.weight")
# Buffers older transformers saved with the weights; they hold no weights (RoPE's frequencies are recomputed).
BUFFERS = ("rotary_emb.inv_freq",)

# What transformers assumes for a key a config.json leaves out (LlamaConfig's defaults).
LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # num_attention_heads
    "head_dim": None,  # hidden_size / num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "rope_theta": 10000.0,
}
# Keys of models that are Llama-shaped but compute otherwise: rotary scaling, windowed attention, experts.
UNREPRESENTABLE = (
    "rope_scaling",
    "sliding_window",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "n_routed_experts",
    "moe_intermediate_size",
)


def _names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(hvdlm name, transformers name) of every tensor mapped one to one."""
    table = {**LLAMA_NAMES, **(LLAMA_BIASES if cfg.bias else {})}
    out = []
    for ours, theirs in table.items():
        for i in range(cfg.n_layer) if "{i}" in ours else [0]:
            out.append((ours.format(i=i), theirs.format(i=i)))
    if not cfg.tie_embeddings:
        out.append(HEAD)
    return out


def _qkv_widths(cfg: ModelConfig) -> tuple[int, int, int]:
    kv = cfg.kv_heads * (cfg.d_model // cfg.n_head)
    return cfg.d_model, kv, kv


def _qkv_names(cfg: ModelConfig, i: int) -> list[tuple[str, list[str]]]:
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    return [
        (QKV.format(i=i, kind=kind), [f"model.layers.{i}.self_attn.{x}_proj.{kind}" for x in "qkv"]) for kind in kinds
    ]


# ------------------------------------------------------------------------------------------------------------
# The weights, both ways
# ------------------------------------------------------------------------------------------------------------


def to_llama(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's tensors from hvdlm's unsharded model state (a tied head is not stored: transformers
    ties lm_head to embed_tokens when tie_word_embeddings is set)."""
    out = {theirs: state[ours].float().contiguous() for ours, theirs in _names(cfg)}
    for i in range(cfg.n_layer):
        for ours, theirs in _qkv_names(cfg, i):
            for name, part in zip(theirs, state[ours].float().split(_qkv_widths(cfg))):
                out[name] = part.contiguous()
    # The real vocabulary only: rows beyond it are padding (a merged checkpoint has none, this makes sure).
    for name in ("model.embed_tokens.weight", HEAD[1]):
        if name in out:
            out[name] = out[name][: cfg.vocab_size].clone()
    return out


def from_llama(weights: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """hvdlm's unsharded model state from LlamaForCausalLM's tensors (a save_pretrained file's)."""
    theirs = {k: v for k, v in weights.items() if not k.endswith(BUFFERS)}
    state, missing = {}, []
    for ours, name in _names(cfg):
        if name in theirs:
            state[ours] = theirs.pop(name).float().contiguous()
        else:
            missing.append(name)
    for i in range(cfg.n_layer):
        for ours, names in _qkv_names(cfg, i):
            missing += [n for n in names if n not in theirs]
            if all(n in theirs for n in names):
                state[ours] = torch.cat([theirs.pop(n).float() for n in names]).contiguous()
    head = theirs.pop(HEAD[1], None) if cfg.tie_embeddings else None
    if missing or theirs:
        unexpected = list(theirs)
        raise InputError(
            f"the weights in '{source}' are not those of the {cfg.n_layer}-layer Llama its config.json describes: "
            f"{len(missing)} missing (first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]}). "
            "Save the model again with transformers' save_pretrained."
        )
    if head is not None and not torch.equal(head.float(), state["tok_emb.weight"]):
        raise InputError(
            f"'{source}' says tie_word_embeddings but holds an output head (lm_head.weight) apart from its token "
            "embedding; save the model again with transformers' save_pretrained."
        )
    if cfg.tie_embeddings:
        state[HEAD[0]] = state["tok_emb.weight"]  # tied, as in hvdlm's model
    return state


# ------------------------------------------------------------------------------------------------------------
# config.json, both ways
# ------------------------------------------------------------------------------------------------------------


def llama_config(cfg: ModelConfig, eot_id: int | None) -> dict[str, Any]:
    """config.json of LlamaForCausalLM for hvdlm's llama."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_width,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.d_model // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: rope_theta for transformers 4.x, rope_parameters for 5.x (which reads either).
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": cfg.dropout,  # evaluation never drops
        "pretraining_tp": 1,
        "vocab_size": cfg.vocab_size,
        "initializer_range": 0.02,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "use_cache": True,
        "dtype": "float32",
    }


def llama_shape(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """hvdlm's [model] keys for a Llama config.json, and every difference hvdlm cannot compute exactly (empty
    when there is none)."""
    config = {**LLAMA_DEFAULTS, **raw}
    d, heads = config["hidden_size"], config["num_attention_heads"]
    kv = config["num_key_value_heads"] or heads
    differs = [f"{key} is {config[key]!r}" for key in UNREPRESENTABLE if config.get(key)]
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or set(rope) - {"rope_type", "rope_theta"}:
        differs.append(f"rope_parameters is {rope}, and hvdlm computes only the default RoPE (rope_type 'default')")
    if config["hidden_act"] != "silu":
        differs.append(f"hidden_act is {config['hidden_act']!r}, and hvdlm's SwiGLU gates with 'silu'")
    if config["head_dim"] not in (None, d // heads):
        differs.append(f"head_dim is {config['head_dim']}, and hvdlm's heads are hidden_size / heads = {d // heads}")
    if config["attention_bias"] != config["mlp_bias"]:
        differs.append(
            f"attention_bias is {config['attention_bias']} and mlp_bias {config['mlp_bias']}, and hvdlm's "
            "model.bias puts biases in both or in neither"
        )
    shape = {
        "arch": "llama",
        "n_layer": config["num_hidden_layers"],
        "n_head": heads,
        "n_kv_head": kv,
        "d_model": d,
        "d_ff": config["intermediate_size"],
        "seq_len": config["max_position_embeddings"],
        "vocab_size": config["vocab_size"],
        "bias": bool(config["attention_bias"]),
        "tie_embeddings": bool(config["tie_word_embeddings"]),
        "rope_theta": float(rope.get("rope_theta", config["rope_theta"])),
        "norm_eps": float(config["rms_norm_eps"]),
    }
    return shape, differs
