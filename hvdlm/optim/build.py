"""Which optimizer a run trains with: `build(model, config, topology)` picks the kind from the config."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from hvdlm.config import JobConfig
from hvdlm.optim.interface import TrainingOptimizer
from hvdlm.optim.local_sgd import LocalSGD
from hvdlm.optim.replicated import Replicated, broadcast_initial_state, horovod_optimizer
from hvdlm.optim.torch_optimizers import make_optimizer
from hvdlm.optim.zero import ZeroOptimizer
from hvdlm.optim.zero2 import Zero2Optimizer
from hvdlm.optim.zero3 import Zero3Optimizer
from hvdlm.parallel.topology import Topology, elastic_job


def build(
    model: torch.nn.Module,
    cfg: JobConfig,
    topology: Topology,
    initial: Iterable[tuple[torch.nn.Parameter, torch.Tensor]] | None = None,
    device: torch.device | None = None,
    adopt: dict | None = None,
) -> TrainingOptimizer:
    """The run's optimizer, with every replica starting from its DP group's root state. ZeRO-3 only: `initial`, the
    parameters' initial values where the model's tensors were never filled (each rank draws the same values, so
    nothing is broadcast; see Zero3Optimizer), and the `device` of its shard. ZeRO: `adopt`, this rank's own slice
    file of the save to resume, whose tensors become the state where they fit (see ZeroOptimizer).

    ZeRO-1/2/3 shard the state (ZeRO-2 the gradients too, ZeRO-3 the weights too) over the DP group; local SGD steps
    each replica on its own gradients and averages the weights every train.local_sgd_interval steps; otherwise Horovod
    averages the gradients of train.accumulation_steps x parallel.microbatches backward passes per step (every
    micro-batch of a pipeline stage is one), or a single replica steps alone.
    """
    t = cfg.train
    if t.zero == 3 and initial is not None:
        return Zero3Optimizer(model, t, topology, initial, device, adopt)
    optimizer = make_optimizer(model, t)
    # Horovod: the weights (and a loaded state) of each DP group's root; a fresh optimizer has no state yet.
    broadcast_initial_state(model, optimizer, topology)
    if t.zero == 3:
        return Zero3Optimizer(model, t, topology, adopt=adopt)  # the weights sharded too, gathered module by module
    if t.zero == 2:
        return Zero2Optimizer(model, t, topology, adopt=adopt)  # gradients sharded too, reduced in backward
    if t.zero:
        return ZeroOptimizer(model, t, topology, adopt=adopt)  # its own slice of the state; reduce-scatter, all-gather
    if t.local_sgd_interval:
        return LocalSGD(optimizer, model, topology, t)
    if topology.dp == 1 and not elastic_job():
        # One replica (tensor-parallel or pipeline ranks only): nothing to average. Horovod would still register a
        # hook on every gradient (it looks at the job's size, not the process set's) and send each one through its
        # background thread, whose cycles the step would then wait for.
        return Replicated(optimizer, model, topology, synchronous=False)
    backward_passes = t.accumulation_steps * cfg.parallel.microbatches
    wrapped = horovod_optimizer(optimizer, model, t, topology, backward_passes)
    return Replicated(wrapped, model, topology, synchronous=True)
