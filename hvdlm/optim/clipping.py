"""Gradient clipping by the norm of the whole model, whose shards and stages live on other ranks."""

from __future__ import annotations

import torch

from hvdlm.parallel.collectives import allreduce
from hvdlm.parallel.topology import Group


def clip_grad_norm(
    params: list[torch.nn.Parameter], max_norm: float, tp_group: Group, pp_group: Group | None = None
) -> torch.Tensor:
    """Clip to the global gradient norm of the whole model, whose shards live on the TP group's ranks and whose
    stages on the pipeline group's.

    A sharded parameter's squared norm is summed over the TP group (one 4-byte allreduce); a replicated one
    (LayerNorms, position table, row-parallel biases) is the same on every rank and counts once. The stages' sums
    add up over the pipeline group, where the last stage's copy of the tied embedding/head weight is left out
    (the first stage counts it). Without TP and stages this is torch's own clip_grad_norm_.
    """
    pp_group = pp_group or Group.single()
    if tp_group.size == 1 and pp_group.size == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [
        (p.grad, hasattr(p, "tp_shard"), getattr(p, "pipeline_tied_copy", False)) for p in params if p.grad is not None
    ]

    def sq(gs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) ** 2 for g in gs]).sum()

    sharded = [g for g, is_shard, copy in grads if is_shard and not copy]
    replicated = [g for g, is_shard, copy in grads if not is_shard and not copy]
    device = grads[0][0].device if grads else None
    total_sq = allreduce(sq(sharded).reshape(1), tp_group)[0] if sharded else torch.zeros((), device=device)
    if replicated:
        total_sq = total_sq + sq(replicated)
    total = allreduce(total_sq.reshape(1), pp_group)[0].sqrt()
    # As torch does: scale by max_norm / (norm + eps), capped at 1 (multiplying by 1 changes nothing).
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g, *_ in grads:
        g.mul_(coef.to(g.dtype))
    return total
