"""The GPT's size from its configuration alone: arithmetic, no torch (the trainer checks that a model fits
before it allocates one; the planner sizes models it never builds)."""

from __future__ import annotations

from hvdlm.config import ModelConfig


def block_parameters(cfg: ModelConfig) -> int:
    """One block's parameters (every TP shard together): its matrices, with biases the column-parallel layers' and
    the row-parallel layers', and two norms."""
    biases = column_biases(cfg) + row_biases(cfg) if cfg.bias else 0
    return matrix_parameters(cfg) + biases + 2 * norm_parameters(cfg)


def matrix_parameters(cfg: ModelConfig) -> int:
    """One block's matrix entries, each a multiply-add per token: attention's q and output projection d x d each,
    k and v d x K D each (K key/value heads of D = d / H; d x d without grouped-query attention), and the MLP's
    2 (GELU) or 3 (SwiGLU) matrices of d x d_ff. GPT-2: 12 d^2."""
    d = cfg.d_model
    kv = cfg.kv_heads * (d // cfg.n_head)
    return 2 * d * d + 2 * d * kv + cfg.traits.mlp_matrices * d * cfg.ffn_width


def column_biases(cfg: ModelConfig) -> int:
    """One block's biases of its column-parallel layers (split over TP ranks): q, k and v's d + 2 K D, and d_ff
    per MLP matrix but the row-parallel one (GELU's fc; SwiGLU's gate and up)."""
    d = cfg.d_model
    return d + 2 * cfg.kv_heads * (d // cfg.n_head) + (cfg.traits.mlp_matrices - 1) * cfg.ffn_width


def row_biases(cfg: ModelConfig) -> int:
    """One block's biases of its row-parallel layers (replicated): the attention output's and the MLP's, d each."""
    return 2 * cfg.d_model


def norm_parameters(cfg: ModelConfig) -> int:
    """One norm's: the gain, and a LayerNorm's shift where biases are on."""
    return 2 * cfg.d_model if cfg.bias and cfg.traits.norm_shift else cfg.d_model


def parameter_count(cfg: ModelConfig, vocab_rows: int | None = None) -> int:
    """Parameters of the whole model (every TP shard together): the blocks, the final norm, the token table, the
    position table where the arch has one (gpt2), and the output head where it is not tied to the token table.

    `vocab_rows`: rows of the token table (the vocabulary with its padding); default cfg.vocab_size. An untied
    head is padded alike. GPT-2 (d_ff 4d, biases): 12 d^2 + 13 d per block. Meta's Llama 3 8B (d 4096, 32 layers,
    32 heads, 8 key/value heads, d_ff 14336, vocabulary 128256, untied): 8,030,261,248.
    """
    d = cfg.d_model
    table = (vocab_rows or cfg.vocab_size) * d
    positions = cfg.seq_len * d if cfg.traits.learned_positions else 0
    head = 0 if cfg.tie_embeddings else table
    return table + positions + head + cfg.n_layer * block_parameters(cfg) + norm_parameters(cfg)


def state_bytes_per_parameter(optimizer: str, ema: bool) -> int:
    """fp32 bytes a parameter costs while training: weight and gradient (4 + 4), AdamW's two moments (8) or
    SGD's momentum (4), and the EMA's copy (4). Muon counts as AdamW: an upper bound (its matrices keep one
    moment, the embeddings AdamW's two)."""
    return 8 + (4 if optimizer == "sgd" else 8) + (4 if ema else 0)
