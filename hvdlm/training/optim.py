"""Optimizer and learning-rate schedule: AdamW or SGD over decay / no-decay groups (or Muon with AdamW,
hvdlm.training.muon), warmup then cosine decay; the Horovod DistributedOptimizer over the data-parallel process
set, the initial broadcast within each DP group, and gradient clipping by the norm of the whole (possibly sharded)
model."""

from __future__ import annotations

import math

import torch

from hvdlm.config import TrainConfig
from hvdlm.parallel.collectives import allreduce
from hvdlm.parallel.topology import Group, Topology
from hvdlm.training.muon import Muon, muon_groups


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (Linear weights, embeddings); leave biases and LayerNorm gains alone, as in GPT-2/3."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW, SGD, or Muon with AdamW (hvdlm.training.muon, never fused). `fused` (one kernel updating every
    parameter, as nanoGPT and llm.c do) follows train.fused_optimizer, whose auto is on for GPU parameters. On
    CPUs the fused kernel rounds differently from the per-tensor one, enough to move a data-parallel run past
    1e-5 of the single-rank reference (tests/test_tp_training.py), for no measured gain."""
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "muon":
        return Muon(muon_groups(model, groups), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), momentum=cfg.muon_momentum)
    return optimizer_over(groups, cfg, fused)


def optimizer_over(groups: list[dict], cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """make_optimizer's AdamW or SGD over given parameter groups (ZeRO's are slices of flat buffers)."""
    if fused is None:
        fused = {"on": True, "off": False}.get(cfg.fused_optimizer)
    if fused is None:
        devices = {p.device.type for g in groups for p in g["params"]}
        fused = True if devices == {"cuda"} else None  # None: torch's default
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def lr_at(step: int, cfg: TrainConfig, replicas: int = 1) -> float:
    """Linear warmup over warmup_steps, then cosine decay from lr to min_lr at max_steps.

    With scale_lr both ends are multiplied by the number of replicas (the linear scaling rule of Goyal et al.,
    2017: the global batch grows with them, so the step may too); warmup is what makes the larger rate safe.
    """
    scale = replicas if cfg.scale_lr else 1
    peak, floor = cfg.lr * scale, cfg.min_lr * scale
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (peak - floor)


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


def clip_gradients(
    optimizer, model: torch.nn.Module, max_norm: float, tp_group: Group, pp_group: Group | None = None
) -> torch.Tensor:
    """clip_grad_norm over the model's gradients, or over the DP shards of them where the optimizer holds a slice
    (ZeRO: hvdlm.training.zero); returns the global norm either way."""
    if hasattr(optimizer, "clip_grad_norm"):
        return optimizer.clip_grad_norm(max_norm)
    return clip_grad_norm(list(model.parameters()), max_norm, tp_group, pp_group)


def distributed_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, topology: Topology, backward_passes: int | None = None
):
    """The optimizer, with every replica starting from its DP group's root state.

    `backward_passes`: backward passes per step (the micro-batches: accumulation_steps, or a pipeline stage's
    parallel.microbatches); Horovod allreduces after the last of them.

    Synchronous training wraps it to average gradients over the DP group; local SGD keeps it plain (replicas
    average their weights every local_sgd_interval steps instead, see hvdlm.training.local_sgd).
    """
    import horovod.torch as hvd

    from hvdlm.training.elastic import enabled as elastic_enabled
    from hvdlm.training.precision import compression

    optimizer = make_optimizer(model, cfg)
    broadcast_initial_state(model, optimizer, topology)
    if cfg.zero == 2:
        from hvdlm.training.zero2 import Zero2Optimizer

        return Zero2Optimizer(model, cfg, topology)  # gradients sharded too, reduced bucket by bucket in backward
    if cfg.zero:
        from hvdlm.training.zero import ZeroOptimizer

        return ZeroOptimizer(model, cfg, topology)  # its own slice of the state; reduce-scatter, then all-gather
    if cfg.local_sgd_interval:
        return optimizer
    if topology.dp == 1 and not elastic_enabled():
        # One replica (tensor-parallel or pipeline ranks only): nothing to average. Horovod would still register a
        # hook on every gradient (it looks at the job's size, not the process set's) and send each one through its
        # background thread, whose cycles the step would then wait for.
        return optimizer
    # Horovod: gradients are averaged across the replicas of this shard (the DP process set) by allreduce,
    # overlapped with the backward pass. Without TP the set is the whole job. With accumulation, the gradients
    # of backward_passes_per_step micro-batches add up locally and only the last backward pass allreduces.
    return hvd.DistributedOptimizer(
        optimizer,
        named_parameters=model.named_parameters(),
        op=hvd.Average,
        process_set=topology.dp_process_set,
        backward_passes_per_step=backward_passes or cfg.accumulation_steps,
        compression=compression(cfg),
    )


def broadcast_initial_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, topology: Topology) -> None:
    """Every rank takes the weights and optimizer state of its DP group's DP-rank-0 member.

    Not hvd.broadcast_optimizer_state: on a fresh optimizer it runs one step with zero gradients to create the
    state, which for AdamW applies weight decay once and advances the step count (so the bias correction of
    every later step is off by one). A fresh AdamW has no state to send; a loaded one sends its tensors.
    """
    import horovod.torch as hvd

    if topology.dp == 1:
        return  # one replica: nobody to agree with
    tensors: dict[str, torch.Tensor] = {}
    if topology.tp == 1 and topology.pp == 1:
        # Horovod: one replica per rank; all start from rank 0's weights.
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    else:
        # Horovod: broadcast_parameters takes no process set, and would copy rank 0's shard (or stage) over every
        # other. Broadcast each tensor inside the DP group instead (below).
        seen: set[int] = set()
        for name, t in model.state_dict().items():
            if t.data_ptr() not in seen:  # the tied weight once
                seen.add(t.data_ptr())
                tensors[f"param.{name}"] = t
    for i, state in enumerate(optimizer.state.values()):
        for key, t in state.items():
            if torch.is_tensor(t):
                tensors[f"optim.{i}.{key}"] = t
    # Horovod: the root is given as a global rank (Horovod's convention, also inside process sets).
    handles = [
        hvd.broadcast_async_(t, root_rank=topology.dp_root, name=f"init.{name}", process_set=topology.dp_process_set)
        for name, t in tensors.items()
    ]
    for h in handles:
        hvd.synchronize(h)
