"""The four autograd mappings between replicated and tensor-parallel activations, in mirrored pairs.

Each is the adjoint of its partner: what one does forward, the other does backward.

    copy_to_tp       forward: identity          backward: allreduce (sum)
    reduce_from_tp   forward: allreduce (sum)   backward: identity
    scatter_to_tp    forward: split along dim   backward: allgather along dim
    gather_from_tp   forward: allgather         backward: split along dim

Why copy_to_tp sums backward: a replicated input x feeds a different shard of the weights on every rank, so
dL/dx is the sum of every rank's contribution. Why reduce_from_tp is the identity backward: its output is the
same on every rank, so each rank already holds the whole gradient. A group of one returns its input at once.
"""

from __future__ import annotations

import torch

from hvdlm.parallel import collectives
from hvdlm.parallel.topology import Group


class _CopyToTP(torch.autograd.Function):
    """forward: identity; backward: allreduce."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)  # a new autograd node over the same memory

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return collectives.allreduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """forward: allreduce; backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return collectives.allreduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """forward: keep this rank's chunk along dim; backward: allgather along dim."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return collectives.split(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return collectives.allgather(grad, ctx.group, ctx.dim), None, None


class _GatherFromTP(torch.autograd.Function):
    """forward: allgather along dim; backward: keep this rank's chunk along dim."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, dim: int) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        return collectives.allgather(x, group, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return collectives.split(grad, ctx.group, ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group.size == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    return x if group.size == 1 else _ScatterToTP.apply(x, group, dim)


def gather_from_tp(x: torch.Tensor, group: Group, dim: int = -1) -> torch.Tensor:
    return x if group.size == 1 else _GatherFromTP.apply(x, group, dim)
