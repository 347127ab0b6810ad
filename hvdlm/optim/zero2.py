"""ZeRO-2 (Rajbhandari et al. 2020): the gradients sharded over the data-parallel group too, reduced during backward.

ZeRO-1 (hvdlm.optim.zero) keeps a whole flat gradient buffer and reduce-scatters it after backward. Here the
parameters are cut into buckets of about train.zero_bucket_mb (consecutive in the flat order, each padded to a
multiple of the DP size d), and no whole gradient buffer exists:

    bucket b   [ params ...... | pad ]  = d parts of S_b elements; rank r owns part r of every bucket
    shard      [ part r of bucket 0 | part r of bucket 1 | ... ]   (the optimizer's slice, S = sum of S_b)

Backward accumulates each parameter's gradient in a `.grad` of its own (autograd allocates it). A hook after the
accumulation (torch's `register_post_accumulate_grad_hook`) notes the parameter; when a bucket has all of its
gradients, they are copied into a bucket buffer, the `.grad`s dropped (the memory saving), and Horovod's
asynchronous reduce-scatter over the DP process set averages the buffer while backward goes on with earlier layers
(the overlap). Its result, this rank's part, is added into the rank's gradient slice. At most MAX_IN_FLIGHT buckets
are in flight: launching one more first waits for the oldest, and the last bucket of a backward waits for all, so
the transient memory is bounded by a few buckets whatever the speed of the network.

Buckets take the parameters in the reverse of the model's order, about the order in which backward completes their
gradients, so that each bucket fills soon after its first gradient (the embedding's last: its gradient is complete
only at the end). The flat buffer is laid out bucket after bucket; the checkpoint layout lists each bucket's
parameters, so the slices still assemble to the plain optimizer's state (hvdlm.checkpoint.slices).

With accumulation (k micro-batches, or a pipeline stage's microbatches) every micro-batch's backward
reduce-scatters every bucket and the slices add up: k times the traffic of ZeRO-1's one reduce-scatter per step,
the price of never holding the whole gradient (DeepSpeed's ZeRO-2 does the same). The average of sums and the sum
of averages differ only in rounding.

Pipeline stages: the tied embedding/head weight's two copies must have their gradients summed over the embedding
group before averaging, which reduce_gradients does first (the trainer passes it the pipeline's
sum_tied_gradients). Their buckets are deferred: no hook, a whole `.grad` as usual, reduce-scattered in
reduce_gradients.

Clipping, the update, the all-gather of the weights and the checkpoint slices are ZeRO-1's (one all-gather of the
shard, put back bucket by bucket).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import horovod.torch as hvd
import torch

from hvdlm.config import TrainConfig
from hvdlm.model.stage import tied_parameters
from hvdlm.optim.zero import ZeroOptimizer
from hvdlm.parallel.topology import Topology

MB = 1024**2
# Reduce-scatters in flight during backward: two keep the network busy while the next bucket fills; more would only
# hold more bucket buffers (bounded memory is the point of ZeRO-2).
MAX_IN_FLIGHT = 2


class Zero2Optimizer(ZeroOptimizer):
    """ZeRO-1's sharded optimizer with the gradients sharded too, reduced bucket by bucket during backward."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        topo: Topology,
        device: torch.device | None = None,
        adopt: dict | None = None,
    ):
        self._bucket_bytes = cfg.zero_bucket_mb * MB
        self._deferred_ids = {id(p) for p in tied_parameters(model)} if topo.pp > 1 else set()
        super().__init__(model, cfg, topo, device, adopt)
        self._bucket_of = {i: b for b, ids in enumerate(self.bucket_params) for i in ids}
        self._ready: list[set[int]] = [set() for _ in self.bucket_params]  # parameters whose gradient is complete
        self._in_flight: deque = deque()  # (bucket, Horovod handle, its buffer), oldest first
        self._active = False  # only between zero_grad and synchronize: other backward passes are not training's
        self._held = self._peak = 0  # bytes of gradients outside the slice: `.grad`s seen and buffers in flight
        self._hooked = sum(1 for ids in self.bucket_params if id(self.params[ids[0]]) not in self._deferred_ids)
        self._launched = 0  # hook-driven buckets launched in this backward
        for i, p in enumerate(self.params):
            if id(p) not in self._deferred_ids:
                p.register_post_accumulate_grad_hook(lambda _, i=i: self._on_gradient(i))

    def _buckets(self, model: torch.nn.Module, cfg: TrainConfig) -> list[list[int]]:
        """Parameters in the reverse of the model's order (about the order backward completes their gradients),
        up to zero_bucket_mb a bucket (a larger parameter alone); a bucket holds only deferred (tied, pipeline) or
        only hook-driven parameters."""
        index = {id(p): i for i, p in enumerate(self.params)}
        buckets: list[list[int]] = []
        size, deferred = 0, None
        for i in reversed([index[id(p)] for p in model.parameters() if id(p) in index]):
            p = self.params[i]
            nbytes, this = p.numel() * p.element_size(), id(p) in self._deferred_ids
            if not buckets or this != deferred or size + nbytes > self._bucket_bytes and size:
                buckets.append([])
                size, deferred = 0, this
            buckets[-1].append(i)
            size += nbytes
        return buckets

    def _gradient_buffers(self) -> torch.Tensor:
        """No whole gradient buffer: the `.grad`s are autograd's until their bucket is reduced; the slice."""
        for p in self.params:
            p.grad = None
        return torch.zeros(self.shard_numel, device=self.device)

    @property
    def buffer_bytes(self) -> int:
        """Gradient memory (after a step no `.grad` is left for the memory account to see): the rank's
        slice, and the most held at once by the `.grad`s of buckets not yet launched and the buffers in flight,
        as counted so far (the first step's backward when the account is taken)."""
        return self.grad_slice.numel() * self.grad_slice.element_size() + self._peak

    def _count(self, nbytes: int) -> None:
        self._held += nbytes
        self._peak = max(self._peak, self._held)

    def _on_gradient(self, i: int) -> None:
        """Hook: parameter i's gradient is complete for this backward; reduce its bucket once all of it is."""
        if not self._active:
            return
        b = self._bucket_of[i]
        if i not in self._ready[b]:
            self._count(_nbytes(self.params[i].grad))
        self._ready[b].add(i)
        if len(self._ready[b]) == len(self.bucket_params[b]):
            self._launch(b)
            self._launched += 1
            if self._launched == self._hooked:  # this backward's last bucket: no buffer outlives its backward
                self._launched = 0
                self._drain()

    @torch.no_grad()
    def _launch(self, b: int) -> None:
        """Copy bucket b's gradients into a buffer (padding zero), drop the `.grad`s, start its reduce-scatter."""
        while self._in_flight and (
            len(self._in_flight) >= MAX_IN_FLIGHT or any(pending == b for pending, _, _ in self._in_flight)
        ):
            self._finish_oldest()  # a bucket's previous reduction ends before its next (Horovod: unique names)
        d, (_, _, part) = self.topo.dp, self.parts[b]
        ids, start = self.bucket_params[b], self.bucket_starts[b]
        grads = [self.params[i].grad for i in ids]
        alone = len(ids) == 1 and grads[0] is not None and grads[0].numel() == d * part and grads[0].is_contiguous()
        if alone:
            buffer = grads[0].view(-1)  # a parameter alone in its bucket, no padding needed: its .grad as it is
        else:
            buffer = torch.zeros(d * part, device=self.device)
            for i, g in zip(ids, grads):
                if g is not None:  # a parameter this backward did not reach contributes zeros
                    at = self.param_offsets[i] - start
                    buffer[at : at + g.numel()].copy_(g.reshape(-1))
            self._count(_nbytes(buffer))  # the buffer and the .grads, for a moment
        self._count(-sum(_nbytes(g) for i, g in zip(ids, grads) if i in self._ready[b]))
        if alone:
            self._count(_nbytes(buffer))
        for i in ids:
            self.params[i].grad = None
        del grads
        self._ready[b].clear()
        if d == 1:
            self._add(b, buffer)
            self._count(-_nbytes(buffer))
            return
        # Horovod: asynchronous reduce-scatter over the DP process set (fp32: Horovod 0.28.1 has no bf16); each rank
        # gets S_b elements, its part (the padding makes the parts equal).
        handle = hvd.reducescatter_async(buffer, op=hvd.Average, name=f"zero2.bucket{b}", process_set=self._dp_set)
        self._in_flight.append((b, handle, buffer))

    def _drain(self) -> None:
        while self._in_flight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        b, handle, buffer = self._in_flight.popleft()
        self._add(b, hvd.synchronize(handle))  # Horovod: wait for the reduce-scatter; its output is our part
        self._count(-_nbytes(buffer))

    def _add(self, b: int, part: torch.Tensor) -> None:
        _, at, n = self.parts[b]
        self.grad_slice[at : at + n].add_(part)  # micro-batches' averages add up, as ZeRO-1's summed gradients

    # -- the optimizer interface (hvdlm.optim.interface) ---------------------------------------------------------

    def zero_grad(self) -> None:
        """Start a step: nothing pending, no `.grad`, a zero slice; the hooks reduce from now on."""
        self._drain()  # launched reductions must end on every rank alike (Horovod matches by name)
        self._launched = 0
        for p in self.params:
            p.grad = None
        for ready in self._ready:
            ready.clear()
        self._held = 0
        self.grad_slice.zero_()
        self._active = True

    def reduce_gradients(self, sum_tied: Callable[[], None] | None = None) -> None:
        """Reduce what backward left: the deferred buckets (the tied weight, summed over its copies first) and
        any bucket a parameter of which got no gradient; then wait for every reduction. The same buckets on every
        rank: the DP replicas run the same model."""
        self._active = False
        if sum_tied is not None:
            sum_tied()
        for b, ids in enumerate(self.bucket_params):
            present = [i for i in ids if self.params[i].grad is not None]
            if present:
                # Deferred gradients (no hook saw them) are counted now, their whole life being this step.
                self._count(sum(_nbytes(self.params[i].grad) for i in present if i not in self._ready[b]))
                self._ready[b].update(present)
                self._launch(b)
        self._drain()


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
