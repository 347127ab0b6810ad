"""A GPT decoder, shaped after nanoGPT: token embeddings (+ learned positions for gpt2), pre-norm blocks of causal
self-attention and an MLP, a final norm, and an output head (tied to the token embedding, or its own for llama).

The arch (model.arch) picks the norm, the positions and the MLP from hvdlm.model.parts; the rest is shared.

Built from the tensor-parallel layers of layers.py: given a TP group of size p, each rank holds 1/p of the
heads, MLP units and vocabulary; without one (p = 1) every layer is the plain one and no collective runs.

Classes come in reading order. Shapes: B batch, T time (tokens), C channels (d_model), H query heads, K key/value
heads, D = C / H a head's width, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.nn import functional as F

from hvdlm.config import ModelConfig
from hvdlm.model.parts import NORMS, PARTS, RESIDUAL_OUTPUTS, Rotary, rotary_of
from hvdlm.model.recompute import recomputed
from hvdlm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    full_shape,
    shard,
    vocab_parallel_cross_entropy,
    vocab_parallel_head,
)
from hvdlm.parallel.mappings import gather_from_tp
from hvdlm.parallel.topology import Group


def initial_value(module: nn.Module, module_name: str, name: str, shape: tuple[int, ...], n_layer: int) -> torch.Tensor:
    """The full initial tensor of parameter `name` of `module` (GPT-2's init; see GPT._init_weights), drawn from
    torch's global generator. Pipeline stages (hvdlm.model.stage) draw through the same order with it."""
    full = torch.empty(shape)
    if isinstance(module, NORMS):
        return full.fill_(1.0 if name == "weight" else 0.0)
    if name == "bias":
        return full.zero_()
    std = 0.02 / math.sqrt(2 * n_layer) if module_name.endswith(RESIDUAL_OUTPUTS) else 0.02
    return full.normal_(mean=0.0, std=std)


def initial_values(cfg: ModelConfig, tp_group: Group) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter's initial value (this TP rank's shard of it) under its whole-GPT name, one at a time, drawn
    from torch's global generator as a GPT built now would draw them (its position table's own init first, which
    GPT._init_weights then overwrites). A tied head is the embedding: its value comes once, as `tok_emb.weight`.
    Nothing but the one tensor is held, so a model too large for a rank can be initialised piece by piece
    (ZeRO-3 keeps each rank's part only: hvdlm.optim.zero3)."""
    with torch.device("meta"):  # the whole GPT's parameter order and shapes, without memory or random draws
        whole = GPT(cfg, tp_group, init=False)
    if whole.pos_emb is not None:  # nn.Embedding's own init in the GPT's constructor
        torch.empty(cfg.seq_len, cfg.d_model).normal_()
    for name, _, value in _drawn(whole):
        yield name, value


def _drawn(model: GPT) -> Iterator[tuple[str, nn.Parameter, torch.Tensor]]:
    """Each parameter of `model` (a tied one once) by name, with this TP rank's shard of its initial value: every
    full tensor drawn in module order, the same for every TP size."""
    g, seen = model.tp_group, set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # the tied head weight is the embedding's
                continue
            seen.add(id(p))
            full = initial_value(module, module_name, name, full_shape(p), model.cfg.n_layer)
            spec = getattr(p, "tp_shard", None)
            yield f"{module_name}.{name}", p, shard(full, spec, g.rank, g.size) if spec is not None else full


class CausalSelfAttention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): H query heads share K key/value heads, H / K queries each
    (K = H: multi-head attention, GPT-2's). Heads are split across the TP group: rank i owns query heads
    [i H/p, (i+1) H/p) and key/value heads [i K/p, (i+1) K/p) (p divides K: the key/value heads are not
    replicated), their q, k, v columns (column parallel) and the matching rows of the output projection (row
    parallel); attention itself is local, and query head h reads key/value head h / (H/K) on every layout."""

    def __init__(self, cfg: ModelConfig, group: Group, rotary: Rotary | None = None):
        super().__init__()
        self.n_head = cfg.n_head // group.size  # query heads on this rank
        self.n_kv_head = cfg.kv_heads // group.size  # key/value heads on this rank
        self.head_dim = cfg.d_model // cfg.n_head
        self.dropout = cfg.dropout
        self.recompute_core = cfg.recompute == "selective"
        self.rotary = rotary  # llama: RoPE on q and k; None: the positions came in with the embeddings
        # q, k and v for all (local) heads in one matmul; the three blocks of columns are split on their own, so
        # that every rank gets its q heads and its key/value heads.
        q_width, kv_width = cfg.d_model, cfg.kv_heads * self.head_dim
        widths = (q_width, kv_width, kv_width)
        self.qkv = ColumnParallelLinear(cfg.d_model, sum(widths), group, bias=cfg.bias, chunks=widths)
        self.proj = RowParallelLinear(cfg.d_model, cfg.d_model, group, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q_width, kv_width = self.n_head * self.head_dim, self.n_kv_head * self.head_dim  # C / p, K D / p
        q, k, v = self.qkv(x).split((q_width, kv_width, kv_width), dim=2)  # (B, T, C / p), 2 x (B, T, K D / p)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H / p, T, D)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))  # (B, K / p, T, D)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        # model.recompute = "selective": the core keeps only q, k, v for backward (hvdlm.model.recompute).
        y = recomputed(self._core, q, k, v) if self.recompute_core else self._core(q, k, v)  # (B, H / p, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, q_width)
        return self.resid_dropout(self.proj(y))  # (B, T, C), summed over the TP group

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # Fused kernel (flash / memory-efficient where available); is_causal masks the future. enable_gqa lets
        # query head h read key/value head h / (H/K) without copying k and v H/K times.
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
            enable_gqa=self.n_kv_head != self.n_head,
        )


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). The norms are replicated; which norm
    and which MLP is the arch's (hvdlm.model.parts)."""

    def __init__(self, cfg: ModelConfig, group: Group, rotary: Rotary | None = None):
        super().__init__()
        parts = PARTS[cfg.arch]
        self.ln_1 = parts.norm(cfg)
        self.attn = CausalSelfAttention(cfg, group, rotary)
        self.ln_2 = parts.norm(cfg)
        self.mlp = parts.mlp(cfg, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def check_tp_size(cfg: ModelConfig, tp: int) -> None:
    if cfg.n_head % tp or cfg.kv_heads % tp or cfg.d_model % tp:
        raise ValueError(
            f"TP size {tp} must divide n_head ({cfg.n_head}), the key/value heads ({cfg.kv_heads}) and d_model "
            f"({cfg.d_model})"
        )


def learned_positions(cfg: ModelConfig) -> nn.Embedding | None:
    """GPT-2's position table (replicated on every TP rank); None for an arch with rotary positions."""
    return nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.traits.learned_positions else None


def embed(tok_emb: nn.Module, pos_emb: nn.Module | None, idx: torch.Tensor) -> torch.Tensor:
    """idx (B, T) -> the token embeddings (B, T, C), plus the positions' where they are a table."""
    x = tok_emb(idx)
    if pos_emb is not None:
        x = x + pos_emb(torch.arange(idx.size(1), device=idx.device))
    return x


def output_head(cfg: ModelConfig, g: Group, tok_emb: VocabParallelEmbedding | None) -> ColumnParallelLinear:
    """The output head, column parallel over the vocabulary: each rank computes the logits of its vocabulary shard.

    Tied (model.tie_embeddings; Press & Wolf, 2017): it reuses the token embedding matrix, both split by vocabulary
    rows the same way, so each rank ties its own shard. With pipeline stages the last stage has no embedding
    (tok_emb None): it holds a copy, marked `pipeline_tied_copy` (hvdlm.model.stage). Untied: a matrix of its own,
    split and padded as the embedding is.
    """
    if not cfg.tie_embeddings:
        return vocab_parallel_head(cfg.d_model, cfg.vocab_size, g)
    if tok_emb is None:
        head = vocab_parallel_head(cfg.d_model, cfg.vocab_size, g)
        head.weight.pipeline_tied_copy = True  # counted once in the gradient norm (the first stage's)
        return head
    head = ColumnParallelLinear(cfg.d_model, cfg.vocab_size, g, bias=False)
    head.weight = tok_emb.weight
    return head


class GPT(nn.Module):
    """The GPT; with a TP group of size p, this rank's shard of it. No group (or size 1): the plain model.

    The residual stream (B, T, C) is replicated on every rank of the group; the vocabulary, the heads and the MLP's
    hidden units are split. Initialisation draws every full tensor from torch's global generator, in one fixed
    order, and keeps this rank's slice: a TP=k model built after torch.manual_seed(s) holds exactly the slices
    of the TP=1 model built after torch.manual_seed(s).
    """

    def __init__(self, cfg: ModelConfig, tp_group: Group | None = None, init: bool = True):
        super().__init__()
        self.cfg = cfg
        self.tp_group = g = tp_group or Group.single()
        check_tp_size(cfg, g.size)
        self.tok_emb = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, g)
        self.pos_emb = learned_positions(cfg)  # gpt2's table; None where RoPE places the tokens (llama)
        self.drop = nn.Dropout(cfg.dropout)
        rotary = rotary_of(cfg)  # one RoPE table for every block
        self.blocks = nn.ModuleList(Block(cfg, g, rotary) for _ in range(cfg.n_layer))
        self.ln_f = PARTS[cfg.arch].norm(cfg)
        self.head = output_head(cfg, g, self.tok_emb)
        if init:  # (init=False: the tensors as allocated, for a caller that places `initial_values` itself)
            self._init_weights()

    def initial_values(self) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
        """Each parameter with the value a GPT built now would give it (see `initial_values` of the module)."""
        params = dict(self.named_parameters())
        for name, value in initial_values(self.cfg, self.tp_group):
            yield params[name], value

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2's init, layout-independent: each full tensor is drawn, then sliced to this rank's shard.

        Linear weights and embeddings ~ N(0, 0.02); the projections that write into the residual stream get
        std 0.02 / sqrt(2 L) (GPT-2's scaled init, so the stream's variance does not grow with depth); biases 0;
        LayerNorm gains 1. The draws follow the module order, the same for every TP size.
        """
        for _, p, value in _drawn(self):
            p.copy_(value)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the tables that are only looked up (no matmul), as in the 6N
        FLOPs-per-token rule: the position table, and the token table where the head is its own (tied, the token
        table is the head's matmul and counts)."""
        n = sum(math.prod(full_shape(p)) for p in self.parameters())  # of the whole model, not this shard
        if not non_embedding:
            return n
        lookups = [self.pos_emb] + ([] if self.cfg.tie_embeddings else [self.tok_emb])
        return n - sum(math.prod(full_shape(m.weight)) for m in lookups if m is not None)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) token ids -> logits and, when targets (B, T) are given, the mean cross-entropy.

        Without targets the logits are the full (B, T, V). With targets and TP they are this rank's vocabulary
        shard (B, T, V / p): the loss is computed shard-wise and the full logits are never gathered.
        """
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than the model's seq_len {self.cfg.seq_len}")
        x = self.drop(embed(self.tok_emb, self.pos_emb, idx))  # (B, T, C)
        for block in self.blocks:
            # model.recompute = "full": only each block's input is kept for backward (hvdlm.model.recompute).
            x = recomputed(block, x) if self.cfg.recompute == "full" else block(x)
        if targets is None:
            logits = self.head(self.ln_f(x))  # (B, T, V / p)
            full = gather_from_tp(logits, self.tp_group, dim=-1)  # (B, T, V padded to a multiple of p)
            return full[..., : self.cfg.vocab_size], None
        return self.head_and_loss(x, targets)

    def head_and_loss(self, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm, the head and the cross-entropy: (logits (B, T, V / p), mean loss). One method, so that
        compile_parts can compile it as one region."""
        logits = self.head(self.ln_f(x))
        return logits, vocab_parallel_cross_entropy(logits, targets, self.tp_group, self.cfg.vocab_size)

    def compile_parts(self) -> None:
        """torch.compile each block in place, and the head with the loss (parameter names, and so checkpoints,
        unchanged).

        Per block, not the whole model: Horovod's gradient hooks fire as each block's backward ends, so the
        allreduce of the later blocks' gradients still overlaps the backward of the earlier ones (a whole-model
        graph would deliver every gradient at once, at the end). The head and the loss are the largest eager
        cost left otherwise: at GPT-2's shape (16 x 1024 tokens, 50304 columns) eager cross-entropy under bf16
        autocast writes fp32 copies of the logits (3.3 GB each) forward and backward, which the compiled
        region fuses into a few passes over the bf16 logits.
        """
        for block in self.blocks:
            block.compile()
        self.head_and_loss = torch.compile(self.head_and_loss)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.8,
        top_k: int | None = 40,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens, feeding back at most seq_len of context."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.cfg.seq_len :]
            logits, _ = self(context)
            logits = logits[:, -1, :] / max(temperature, 1e-6)  # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, 1, generator=generator)), dim=1)
        return idx
