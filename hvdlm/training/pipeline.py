"""The training step's work on a pipeline stage (parallel.pp > 1): the step's micro-batches through the schedule,
the loss on every rank, the tied embedding/head gradient, and the validation loss.

The trainer calls `forward_backward` where a one-stage run accumulates gradients over its micro-batches; what
follows is the same for both (Horovod's DistributedOptimizer averages each stage's gradients over its DP
process set, then clipping, the non-finite check, the update). Between the average and the clipping the trainer
calls `sum_tied_gradients`: the first stage's embedding and the last stage's head copy of the tied weight get
the sum of both gradients (Megatron's embedding group), so both copies take the same update.

With virtual stages (the model's `virtual` > 1 chunks per stage) the step runs the interleaved schedule
(hvdlm.parallel.interleaved) over a ring of stages; the rest is the same.
"""

from __future__ import annotations

import torch

from hvdlm.data.sampler import WindowSampler
from hvdlm.model.stage import GPTStage, tied_parameters
from hvdlm.parallel.collectives import allreduce, broadcast_
from hvdlm.parallel.interleaved import ChunkWork, Interleaving, run_forward_only, run_interleaved
from hvdlm.parallel.p2p import StageLink
from hvdlm.parallel.schedules import StageWork, forward_only, run_schedule
from hvdlm.parallel.topology import Topology
from hvdlm.training.device import to_device
from hvdlm.training.memory_account import ActivationMeter
from hvdlm.training.precision import Precision


class PipelineRunner:
    def __init__(
        self, model: GPTStage, topo: Topology, precision: Precision, batch_size: int, microbatches: int, schedule: str
    ):
        cfg = model.cfg
        self.model, self.topo, self.precision = model, topo, precision
        self.microbatches, self.schedule = microbatches, schedule
        self.device = precision.device
        # What crosses a stage boundary: the residual stream (B, T, C), in bf16 when training in bf16 (half the
        # bytes; Megatron sends in the parameters' dtype too), else fp32.
        self.wire_dtype = torch.bfloat16 if precision.name == "bf16" else torch.float32
        shape = (batch_size, cfg.seq_len, cfg.d_model)
        self.virtual = model.virtual
        self.link = StageLink(topo.pp_group, shape, self.wire_dtype, self.device, ring=self.virtual > 1)

    def forward_backward(self, batches: WindowSampler, meter: ActivationMeter | None = None) -> torch.Tensor:
        """One step's micro-batches through the schedule, gradients accumulated in .grad; returns the replica's
        mean loss over them, on every stage. `meter` counts the saved activations of the micro-batches in flight."""
        m = self.microbatches
        data = [to_device(batches.next_batch(), self.device) for _ in range(m)]  # every stage reads
        loss = torch.zeros((), device=self.device)

        def forward(c: int, i: int, inp: torch.Tensor | None) -> torch.Tensor:
            nonlocal loss
            x, y = data[i]
            with self.precision.autocast():
                out = self.model(x if inp is None else inp, y, chunk=c)
            if not self._ends(c):
                return out.to(self.wire_dtype)
            # As the one-stage step does: a non-finite loss makes the gradients NaN, so every replica skips.
            out = out * torch.where(torch.isfinite(out), 1.0, float("nan"))
            loss = loss + out.detach() / m
            return out / m

        if self.virtual > 1:
            plan = Interleaving(self.topo.pp, self.topo.pp_rank, self.virtual, m)
            run_interleaved(ChunkWork(forward, meter=meter), self.link, plan)
        else:
            work = StageWork(lambda i, inp: forward(0, i, inp), self.model.is_first, self.model.is_last, meter=meter)
            run_schedule(self.schedule, work, self.link, m)
        return self._from_last_stage(loss)

    @torch.no_grad()
    def sum_tied_gradients(self) -> None:
        """First and last stage: both copies of the tied weight get the sum of their gradients."""
        if self.topo.embedding_group.size == 1:
            return
        for p in tied_parameters(self.model):
            p.grad.copy_(allreduce(p.grad, self.topo.embedding_group))

    @torch.no_grad()
    def validation_loss(self, batches: WindowSampler, n_batches: int) -> torch.Tensor:
        """The mean loss over n_batches evaluation batches of this replica, on every stage."""
        self.model.eval()
        data = [to_device(batches.eval_batch(i), self.device) for i in range(n_batches)]
        total = torch.zeros((), device=self.device)

        def forward(c: int, i: int, inp: torch.Tensor | None) -> torch.Tensor:
            nonlocal total
            x, y = data[i]
            with self.precision.autocast():
                out = self.model(x if inp is None else inp, y, chunk=c)
            if self._ends(c):
                total = total + out.float()
                return out
            return out.to(self.wire_dtype)

        if self.virtual > 1:
            run_forward_only(forward, self.link, n_batches, self.virtual)
        else:
            work = StageWork(lambda i, inp: forward(0, i, inp), self.model.is_first, self.model.is_last)
            forward_only(work, self.link, n_batches)
        return self._from_last_stage(total / n_batches)

    def _ends(self, chunk: int) -> bool:
        """Whether this stage's chunk is the model's last (the head and the loss)."""
        return self.model.is_last and chunk == self.virtual - 1

    def _from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        """The last stage's value on every stage of the pipeline."""
        return broadcast_(value.float().reshape(1).contiguous(), self.topo.pp_group, root=self.topo.pp - 1)[0]
