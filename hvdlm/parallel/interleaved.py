"""The interleaved 1F1B schedule (virtual stages; Narayanan et al. 2021, section 2.2.2): each of the p pipeline
ranks holds v chunks of layers, rank r chunks r, r + p, ..., r + (v - 1) p of the model's p x v, so a
micro-batch goes round the ring of ranks v times. A rank's fill and drain then last one chunk's work instead of one
stage's, and the bubble shrinks from (p - 1) / (m + p - 1) to (p - 1) / (v m + p - 1) of the step, for v times
the point-to-point messages (every chunk boundary is a send).

The order is Megatron-LM's (forward_backward_pipelining_with_interleaving): the step's m x v chunk passes are
numbered k = 0 .. m v - 1 alike on every rank, in groups of p micro-batches per chunk,

    k:        0  1 | 2  3 | 4  5 | 6  7          (p = 2, v = 2, m = 4)
    forward   chunk 0, micro-batches 0 1 | chunk 1, 0 1 | chunk 0, 2 3 | chunk 1, 2 3
    backward  chunk 1, micro-batches 0 1 | chunk 0, 0 1 | chunk 1, 2 3 | chunk 0, 2 3

(so m must be a multiple of p). Rank r runs 2 (p - r - 1) + (v - 1) p forwards of warm-up (all of them when
m = p), then one forward and one backward per turn, then the remaining backwards, with one exchange of
activations and gradients per turn (hvdlm.parallel.p2p, on a ring: the last rank sends its chunks' outputs on to
the first); a turn's forward output starts on its way before the turn's backward, as Megatron's overlapped
variant sends it, and the exchange completes it. Which turns send and receive follows Megatron's;
`Interleaving.ticks` writes them down and tests/test_interleaved.py plays every rank's turns against each other
for many (p, v, m), checking that each message arrives where it is needed and that no rank waits for ever,
whatever the MPI library's eager limit.

Messages between two ranks keep their order within a tag, and every rank runs the chunks in the same k order, so a
rank keeps what it receives in two queues (activations, gradients) and takes from their fronts. Each chunk's
backwards run in micro-batch order, so every parameter adds up its m gradient contributions in the order of
gradient accumulation on one rank.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from hvdlm.parallel.p2p import StageLink


@dataclass(frozen=True)
class Tick:
    """One turn of a rank: at most one forward and one backward (their k), then one exchange: the forward's output
    sent on and/or the backward's input gradient sent back, an activation and/or a gradient received."""

    forward: int | None = None
    backward: int | None = None
    send_next: bool = False
    send_prev: bool = False
    recv_prev: bool = False
    recv_next: bool = False


@dataclass(frozen=True)
class Interleaving:
    """Rank `rank` of `stages`, with `virtual` chunks each, running `microbatches` micro-batches (a multiple of
    `stages`)."""

    stages: int
    rank: int
    virtual: int
    microbatches: int

    def chunk(self, k: int, forward: bool = True) -> int:
        """The chunk (0 .. v - 1, of this rank's) the k-th forward (or backward) runs; k may be negative (Megatron's
        look-back at what the ring's other end is doing)."""
        p, v = self.stages, self.virtual
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def microbatch(self, k: int) -> int:
        p, v = self.stages, self.virtual
        return (k // (p * v)) * p + k % p

    def first_virtual(self, chunk: int) -> bool:
        """Whether the chunk holds the embedding (takes token ids, sends no gradient back)."""
        return self.rank == 0 and chunk == 0

    def last_virtual(self, chunk: int) -> bool:
        """Whether the chunk holds the head and loss (sends nothing on, receives no gradient)."""
        return self.rank == self.stages - 1 and chunk == self.virtual - 1

    def warmup(self) -> int:
        p, r, v, total = self.stages, self.rank, self.virtual, self.microbatches * self.virtual
        if self.microbatches == p:  # Megatron: every forward first when there is one group of micro-batches
            return total
        return min(2 * (p - r - 1) + (v - 1) * p, total)

    def ticks(self) -> list[Tick]:
        """This rank's turns for one step, in order."""
        p, r, v = self.stages, self.rank, self.virtual
        total, warmup = self.microbatches * v, self.warmup()
        steady, all_warmup = total - warmup, warmup == total
        ticks = [Tick(recv_prev=True)] if r > 0 else []  # chunk 0's first input
        for k in range(warmup):
            recv_prev = not (r == 0 and self.chunk(k + 1) == 0) and k < total - 1
            recv_next = k == warmup - 1 and not all_warmup and r < p - 1  # the first backward's gradient
            ticks.append(Tick(k, None, not self.last_virtual(self.chunk(k)), False, recv_prev, recv_next))
        for k in range(steady):
            f = k + warmup
            # The first rank receives what the last one sent (it runs p - 1 passes ahead of it); the last rank
            # receives the first one's gradients likewise.
            recv_prev = self.chunk(f - (p - 1)) != v - 1 if r == 0 else True
            recv_next = self.chunk(k - (p - 1), forward=False) != 0 if r == p - 1 else True
            send_next = not self.last_virtual(self.chunk(f))
            send_prev = not self.first_virtual(self.chunk(k, forward=False))
            ticks.append(Tick(f, k, send_next, send_prev, recv_prev and k < steady - 1, recv_next))
        if all_warmup and r < p - 1:
            ticks.append(Tick(recv_next=True))  # the first backward's gradient
        for k in range(steady, total):
            recv_next = not (r == p - 1 and self.chunk(k + 1, forward=False) == v - 1) and k < total - 1
            ticks.append(Tick(None, k, False, not self.first_virtual(self.chunk(k, forward=False)), False, recv_next))
        return ticks


def forward_only_ticks(stages: int, rank: int, virtual: int, n: int) -> list[tuple[Tick, int, int]]:
    """Forwards of n micro-batches through every chunk, without backward (evaluation; n need not be a multiple of
    p): in groups of up to p micro-batches per chunk, as in training. Each turn: (tick, chunk, micro-batch)."""
    order = [
        (c, i) for start in range(0, n, stages) for c in range(virtual) for i in range(start, min(start + stages, n))
    ]
    plan = Interleaving(stages, rank, virtual, stages)
    turns = [(Tick(recv_prev=True), -1, -1)] if rank > 0 else []
    for j, (c, i) in enumerate(order):
        needs_input = j + 1 < len(order) and not plan.first_virtual(order[j + 1][0])
        turns.append((Tick(j, None, not plan.last_virtual(c), False, needs_input), c, i))
    return turns


@dataclass
class ChunkWork:
    """One rank's part of a step. `forward(chunk, i, inp)` runs micro-batch i through the rank's chunk (inp: the
    received activation, None on the first chunk of the first rank) and returns what to send on, or on the last
    rank's last chunk the scaled loss to backpropagate."""

    forward: Callable[[int, int, torch.Tensor | None], torch.Tensor]
    # An hvdlm.training.memory_account.ActivationMeter, counting each (chunk, micro-batch)'s saved tensors.
    meter: Any = None


def run_interleaved(work: ChunkWork, link: StageLink, plan: Interleaving) -> None:
    """The step's forwards and backwards on this rank, gradients accumulated in .grad."""
    activations: deque[torch.Tensor] = deque()
    gradients: deque[torch.Tensor] = deque()
    saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
    for tick in plan.ticks():
        out = grad_in = None
        if tick.forward is not None:
            c, i = plan.chunk(tick.forward), plan.microbatch(tick.forward)
            inp = None if plan.first_virtual(c) else activations.popleft()
            out = _forward(work, c, i, inp)
            saved[c, i] = (inp, out)
            if tick.send_next and tick.backward is not None:
                # Sent now, not after this turn's backward: the next rank can start on it meanwhile (see p2p).
                link.post_send_next(out)
                tick = replace(tick, send_next=False)
        if tick.backward is not None:
            c, i = plan.chunk(tick.backward, forward=False), plan.microbatch(tick.backward)
            grad = None if plan.last_virtual(c) else gradients.popleft()
            inp, done = saved.pop((c, i))
            torch.autograd.backward(done, grad_tensors=grad)  # the loss's gradient is 1 where grad is None
            if work.meter is not None:
                work.meter.release((c, i))
            grad_in = None if inp is None else inp.grad
        got_activation, got_gradient = link.exchange(
            send_next=out if tick.send_next else None,
            send_prev=grad_in if tick.send_prev else None,
            recv_prev=tick.recv_prev,
            recv_next=tick.recv_next,
        )
        if got_activation is not None:
            activations.append(got_activation)
        if got_gradient is not None:
            gradients.append(got_gradient)
    assert not saved and not activations and not gradients, "the interleaved schedule left work behind"


def run_forward_only(
    forward: Callable[[int, int, torch.Tensor | None], torch.Tensor], link: StageLink, n: int, virtual: int
) -> None:
    """Forwards of n micro-batches through this rank's chunks, without gradients (evaluation)."""
    stages, rank = link.group.size, link.group.rank
    plan = Interleaving(stages, rank, virtual, stages)
    activations: deque[torch.Tensor] = deque()
    with torch.no_grad():
        for tick, c, i in forward_only_ticks(stages, rank, virtual, n):
            out = None
            if tick.forward is not None:
                out = forward(c, i, None if plan.first_virtual(c) else activations.popleft())
            got, _ = link.exchange(send_next=out if tick.send_next else None, recv_prev=tick.recv_prev)
            if got is not None:
                activations.append(got)


def _forward(work: ChunkWork, c: int, i: int, inp: torch.Tensor | None) -> torch.Tensor:
    if inp is not None:
        inp.requires_grad_()  # its gradient is what the previous chunk waits for
    with work.meter.counting((c, i)) if work.meter is not None else contextlib.nullcontext():
        return work.forward(c, i, inp)
