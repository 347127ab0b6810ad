"""Local SGD: every replica steps on its own gradients, and every H steps the replicas average their weights.

Communication drops H-fold (one allreduce of the weights per H steps instead of one of the gradients per step).
The optimizer's moments are averaged with the weights, so at every averaging point all replicas hold the same
state: a checkpoint there is the whole job's state. For plain SGD (with momentum, without clipping) H = 1 is
synchronous training, since the average of the replicas' updates is the update of the averaged gradient.
"""

from __future__ import annotations

from typing import Any

import torch

from hvdlm.config import TrainConfig
from hvdlm.optim.replicated import Replicated
from hvdlm.parallel.topology import Topology


class LocalSGD(Replicated):
    """The replicated optimizer, plain (no gradient allreduce), whose replicas average every `interval` steps and
    after the last one. Each replica judges its own steps, so none skips on the device."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, topo: Topology, cfg: TrainConfig):
        super().__init__(optimizer, model, topo, synchronous=False)
        self.skips_on_device = False  # each replica judges its own steps, on the host
        self.interval, self.max_steps = cfg.local_sgd_interval, cfg.max_steps

    def after_step(self, done: int, ema: Any = None) -> None:
        if done % self.interval == 0 or done == self.max_steps:
            average_replicas(self.torch_optimizer, self.topo, ema)


@torch.no_grad()
def average_replicas(optimizer: torch.optim.Optimizer, topology: Topology, ema: Any = None) -> None:
    """Average weights, optimizer moments and the weights' moving average (hvdlm.training.ema, its `shadow`) over
    the DP group (the replicas of this rank's shard)."""
    import horovod.torch as hvd

    if topology.dp == 1:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = [
        [t for key, t in optimizer.state[p].items() if torch.is_tensor(t) and t.is_floating_point() and key != "step"]
        for p in params
    ]
    # The optimizer creates its moments at a parameter's first update: a replica whose first steps were skipped
    # (non-finite) has none yet. Every replica must send the same tensors, so the moments go only when all have
    # them (Horovod: a 1-number allreduce, min over the DP group).
    complete = torch.tensor([int(all(moments))], dtype=torch.int32)
    all_complete = hvd.allreduce(complete, op=hvd.Min, name="local_sgd.moments", process_set=topology.dp_process_set)
    tensors = [p.data for p in params]
    if all_complete.item():
        tensors += [t for ts in moments for t in ts]
    if ema is not None:
        tensors += [t for t in ema.shadow.values() if t.is_floating_point()]
    # Horovod: in-place, asynchronous, over the DP process set; Horovod fuses the small tensors into few messages.
    handles = [
        hvd.allreduce_async_(t, op=hvd.Average, name=f"local_sgd.{i}", process_set=topology.dp_process_set)
        for i, t in enumerate(tensors)
    ]
    for h in handles:
        hvd.synchronize(h)
