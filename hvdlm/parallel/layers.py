"""Tensor-parallel layers: each rank of a TP group of size p holds 1/p of a weight and computes 1/p of the work.

A linear layer computes Y = X A + b (torch stores W = A^T, shape (out, in)).

ColumnParallelLinear splits A by columns, A = [A_1 ... A_p], b = [b_1 ... b_p]:
    Y_i = X A_i + b_i on rank i. X is replicated (copy_to_tp: its gradient is summed backward); Y comes out
    split by columns, which is what the next RowParallelLinear (or per-head attention) wants.

RowParallelLinear splits A by rows, A = [A_1; ...; A_p], and takes X split by columns, X = [X_1 ... X_p]:
    Y = X A + b = sum_i X_i A_i + b: each rank computes X_i A_i, reduce_from_tp sums them, and the
    replicated b is added once, after the sum.

VocabParallelEmbedding splits the embedding table by rows (vocabulary ranges): rank i looks up the tokens in its
range, writes zeros for the others, and reduce_from_tp sums the p partial lookups into the full embedding.

vocab_parallel_cross_entropy takes logits split by vocabulary (the output of a column-parallel head) and computes
the loss with three numbers per token crossing the group (max, sum of exponentials, target logit), never the
(B, T, V) logits.

Vocabularies (and any split size) that do not divide by p are padded with zero rows up to a multiple of p; the
padding never reaches a result (lookups cannot hit it, the loss masks it).

`Sharding`, `shard` and `merge` describe how a full tensor maps to its p shards; the model's initialisation and
the checkpoints use them, so that a TP=k model holds exactly the slices of the TP=1 model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from hvdlm.parallel.collectives import allreduce
from hvdlm.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp
from hvdlm.parallel.topology import Group

# Rows of the vocabulary each rank's share is padded to a multiple of (tensor-core friendly shapes).
VOCAB_MULTIPLE = 64

# ------------------------------------------------------------------------------------------------------------
# How a full tensor is cut into shards
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sharding:
    """A tensor split along `dim`; its full (unpadded) size there is `full`.

    `chunks` > 1 says the full tensor is `chunks` independent blocks along dim (q, k and v stacked in one
    weight: chunks = 3), each split on its own, so that every rank gets its q, its k and its v. The blocks are
    equal unless `parts` gives their sizes (grouped-query attention: q is n_head heads wide, k and v n_kv_head).
    """

    dim: int
    full: int
    chunks: int = 1
    multiple: int = 1  # each rank's rows padded to a multiple of this (the vocabulary: 64, see VocabParallelEmbedding)
    parts: tuple[int, ...] = ()  # the blocks' sizes along dim, where they differ; () for chunks equal blocks

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))  # a checkpoint records them as a list

    def blocks(self) -> list[int]:
        """The full sizes of the independent blocks along dim."""
        return list(self.parts) or [self.full // self.chunks] * self.chunks

    def local_blocks(self, tp: int) -> list[int]:
        """Each block's size on one rank, padded."""
        return [math.ceil(b / (tp * self.multiple)) * self.multiple for b in self.blocks()]

    def local_size(self, tp: int) -> int:
        return sum(self.local_blocks(tp))

    def padded(self, tp: int) -> int:
        return self.local_size(tp) * tp

    def recorded(self) -> list:
        """As a checkpoint records it (plain lists, read back by Sharding(*recorded)): [dim, full, chunks], and
        the multiple and the parts only where there are parts (so the records of equal blocks stay as they were)."""
        head = [self.dim, self.full, self.chunks]
        return [*head, self.multiple, list(self.parts)] if self.parts else head


def shard(full: torch.Tensor, spec: Sharding, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s shard of the full tensor, padded with zeros where the size does not divide by tp."""
    # Equal blocks are cut evenly, whatever the full tensor's own padding (a padded vocabulary table reshards).
    blocks = full.split(spec.blocks(), dim=spec.dim) if spec.parts else full.chunk(spec.chunks, dim=spec.dim)
    pieces = []
    for block, local in zip(blocks, spec.local_blocks(tp)):
        pad = local * tp - block.size(spec.dim)
        if pad:
            shape = list(block.shape)
            shape[spec.dim] = pad
            block = torch.cat([block, block.new_zeros(shape)], dim=spec.dim)
        pieces.append(block.chunk(tp, dim=spec.dim)[rank])
    return torch.cat(pieces, dim=spec.dim).contiguous()


def merge(shards: list[torch.Tensor], spec: Sharding) -> torch.Tensor:
    """The full tensor from all ranks' shards (in rank order), padding removed. Inverse of `shard`."""
    tp, size = len(shards), shards[0].size(spec.dim)
    # Equal blocks split the shard evenly, whatever padding it has (records of the vocabulary carry no multiple).
    local = spec.local_blocks(tp) if spec.parts else [size // spec.chunks] * spec.chunks
    per_rank = [s.split(local, dim=spec.dim) for s in shards]
    blocks = []
    for j, full in enumerate(spec.blocks()):
        blocks.append(torch.cat([pieces[j] for pieces in per_rank], dim=spec.dim).narrow(spec.dim, 0, full))
    return torch.cat(blocks, dim=spec.dim).contiguous()


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of the unsharded tensor a parameter is a shard of (its own shape if replicated)."""
    spec: Sharding | None = getattr(p, "tp_shard", None)
    if spec is None:
        return tuple(p.shape)
    shape = list(p.shape)
    shape[spec.dim] = spec.full
    return tuple(shape)


def _sharded_parameter(shape: tuple[int, ...], spec: Sharding) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape))
    p.tp_shard = spec  # read by the initialisation, the gradient norm and the checkpoints
    return p


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by columns; see the module docstring. Weight shard: (out / p, in).

    `chunks`: the columns are that many equal independent blocks, each split on its own (q, k, v: 3); or a tuple
    of the blocks' widths where they differ (q, k, v with grouped-query attention).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: Group,
        bias: bool = True,
        chunks: int | tuple[int, ...] = 1,
        gather_output: bool = False,
    ):
        super().__init__()
        self.group, self.gather_output = group, gather_output
        self.in_features, self.out_features = in_features, out_features
        widths = (out_features // chunks,) * chunks if isinstance(chunks, int) else tuple(chunks)
        if sum(widths) != out_features:
            raise ValueError(f"blocks {widths} do not add up to {out_features} columns")
        # Equal widths are recorded as a count, as they always were.
        spec = Sharding(dim=0, full=out_features, chunks=len(widths), parts=widths if len(set(widths)) > 1 else ())
        self.out_local = spec.local_size(group.size)
        self.weight = _sharded_parameter((self.out_local, in_features), spec)
        self.bias = _sharded_parameter((self.out_local,), spec) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)  # (..., out / p)
        return gather_from_tp(y, self.group, dim=-1) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """Y = sum_i X_i A_i + b with A split by rows; see the module docstring. Weight shard: (out, in / p)."""

    def __init__(
        self, in_features: int, out_features: int, group: Group, bias: bool = True, input_is_parallel: bool = True
    ):
        super().__init__()
        if in_features % group.size:
            raise ValueError(f"in_features {in_features} does not divide among {group.size} TP ranks")
        self.group, self.input_is_parallel = group, input_is_parallel
        self.in_features, self.out_features = in_features, out_features
        self.weight = _sharded_parameter((out_features, in_features // group.size), Sharding(dim=1, full=in_features))
        # The bias is replicated: added once, after the sum, with the same value on every rank.
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group, dim=-1)
        y = reduce_from_tp(F.linear(x, self.weight), self.group)  # (..., out), summed over the ranks
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; rank i holds rows [i V'/p, (i+1) V'/p) of the padded table.

    The table is padded with zero rows so that each rank's share is a multiple of VOCAB_MULTIPLE: GPU matmul
    kernels run much faster on such shapes (GPT-2's 50257 -> 50304, as in nanoGPT). The padded rows are never
    looked up, and the cross-entropy leaves their logits out, so the loss is that of the real vocabulary.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Group):
        super().__init__()
        self.group = group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        spec = Sharding(dim=0, full=num_embeddings, multiple=VOCAB_MULTIPLE)
        self.rows = spec.local_size(group.size)
        self.vocab_start = group.rank * self.rows
        self.weight = _sharded_parameter((self.rows, embedding_dim), spec)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return F.embedding(idx, self.weight)
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)  # (..., C)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)  # other ranks' tokens: this rank adds nothing
        return reduce_from_tp(out, self.group)


def vocab_parallel_head(embedding_dim: int, num_embeddings: int, group: Group) -> ColumnParallelLinear:
    """An output head of its own (an untied head, or a pipeline's copy of the tied one): a column-parallel linear
    whose weight is split and padded by vocabulary rows exactly as VocabParallelEmbedding's table, so that its
    logit shards line up with the tied head's (and vocab_parallel_cross_entropy's ranges)."""
    head = ColumnParallelLinear(embedding_dim, num_embeddings, group, bias=False)
    head.weight = VocabParallelEmbedding(num_embeddings, embedding_dim, group).weight
    return head


# ------------------------------------------------------------------------------------------------------------
# Cross-entropy over vocabulary-split logits
# ------------------------------------------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss -log softmax(z)[t] from vocab shards z_i of the logits z = [z_1 ... z_p].

    log softmax(z)[t] = z[t] - m - log sum_v exp(z[v] - m), with m = max_v z[v]. Each rank contributes its
    shard's max (allreduce max), then its shard's sum of exponentials and, on the rank that owns t, z[t]
    (one allreduce sum of both). Backward is local: dL/dz_i = softmax(z)_i - onehot(t)_i, scaled by dL/dloss.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: Group, vocab_size: int) -> torch.Tensor:
        n, v_local = logits.shape
        vocab_start = group.rank * v_local
        padded_from = max(0, min(v_local, vocab_size - vocab_start))  # local columns from here on are padding

        if padded_from:
            m = logits[:, :padded_from].max(dim=-1).values
        else:  # a shard of padding only (tiny vocabularies): it takes no part in the max
            m = logits.new_full((n,), float("-inf"))
        m = allreduce(m, group, op="max")  # (N,)
        exp = (logits - m.unsqueeze(-1)).exp_()  # (N, V / p), shifted so the largest is exp(0) = 1
        exp[:, padded_from:] = 0.0
        local_t = targets - vocab_start
        mine = (local_t >= 0) & (local_t < v_local)
        local_t = local_t.masked_fill(~mine, 0)
        target_logit = logits.gather(1, local_t.unsqueeze(1)).squeeze(1) - m
        target_logit = target_logit.masked_fill(~mine, 0.0)
        sums = allreduce(torch.stack([exp.sum(dim=-1), target_logit]), group)  # (2, N): both in one call
        sum_exp, target_logit = sums[0], sums[1]
        loss = sum_exp.log() - target_logit

        exp.div_(sum_exp.unsqueeze(-1))  # softmax, kept for backward
        ctx.save_for_backward(exp, local_t, mine)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, local_t, mine = ctx.saved_tensors
        grad = softmax.clone()
        rows = torch.arange(grad.size(0), device=grad.device)
        grad[rows, local_t] -= mine.to(grad.dtype)
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group: Group, vocab_size: int
) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V / p), this rank's vocabulary shard, against targets (...).

    `vocab_size` is the real vocabulary: columns beyond it are padding and take no part.
    """
    flat, flat_t = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
    if group.size == 1:  # the padding columns left out
        return F.cross_entropy(flat[:, :vocab_size], flat_t)
    return _VocabParallelCrossEntropy.apply(flat.float(), flat_t, group, vocab_size).mean()
