"""The GPT's size from its configuration alone: arithmetic, no torch (the trainer checks that a model fits
before it allocates one; the planner sizes models it never builds)."""

from __future__ import annotations

from hvdlm.config import ModelConfig


def parameter_count(cfg: ModelConfig, vocab_rows: int | None = None) -> int:
    """Parameters of the whole model (every TP shard together), position table and tied head included.

    `vocab_rows`: rows of the token table (the vocabulary with its padding); default cfg.vocab_size.
    Per block: attention q, k, v and output (4 d^2), the MLP's two 4d-wide matrices (8 d^2); with biases, 13 d of
    biases and LayerNorm shifts (3d + d + 4d + d, and 2 x d), plus the two LayerNorm gains (2 d).
    """
    d, layers = cfg.d_model, cfg.n_layer
    per_block = 12 * d * d + (13 * d if cfg.bias else 2 * d)
    final_norm = 2 * d if cfg.bias else d
    return (vocab_rows or cfg.vocab_size) * d + cfg.seq_len * d + layers * per_block + final_norm


def state_bytes_per_parameter(optimizer: str, ema: bool) -> int:
    """fp32 bytes a parameter costs while training: weight and gradient (4 + 4), AdamW's two moments (8) or
    SGD's momentum (4), and the EMA's copy (4). Muon counts as AdamW: an upper bound (its matrices keep one
    moment, the embeddings AdamW's two)."""
    return 8 + (4 if optimizer == "sgd" else 8) + (4 if ema else 0)
