"""Point-to-point between neighbouring pipeline stages, on the pipeline group's own mpi4py communicator.

Every exchange posts its receives first, then its sends (all non-blocking), then waits for all of them, as
Megatron's batched isend / irecv does:

- no deadlock at any message size. A blocking send above the MPI library's eager limit waits for the matching
  receive; two neighbours that both send first (stage s its activation forward, stage s + 1 its gradient back, as
  1F1B's steady state does) would each wait for the other. Here both have posted their receives before either
  waits, so both transfers proceed.
- no shape handshake: every message is one stage boundary's (B, T, C) tensor in the wire dtype, so receive
  buffers are allocated at the known shape before the message arrives.
- a send's tensor stays referenced until the send completes: MPI reads its memory after Isend returns, and
  torch must not free or reuse it meanwhile.
- sends complete inside the exchange, not later: a send left pending past its exchange while the stage computes
  its next micro-batch reached the neighbour one micro-batch late (bench/pipeline.py, m = 8 on 2 stages: completing
  them in the exchange took the idle share of 1F1B from 25% to 14%, GPipe's from 50% to 24%; the ideal bubble is
  11%). A send may start *before* its exchange (`post_send_next`: the interleaved schedule sends a forward's output
  before the backward of the same turn, as Megatron's overlapped interleaving does): posted, it announces itself to
  the neighbour, which takes the data when it next waits in MPI. Open MPI's shared-memory transport reads it then
  straight from this rank's memory (single copy, CMA) without this rank's help; measured on this project's
  machine, a 1 MB message posted before a 1 s sleep arrived within 4 ms. Where the single copy is off
  (hvdlm.launch.shared_memory: `hvdlm launch` turns it off only where the machine forbids it), the message waits
  for this rank's next MPI call, here the exchange: the early post then gains nothing, but costs nothing either.
- 16-bit floats travel as their raw 16-bit words (int16 views; numpy has no bfloat16): bit for bit, half the
  bytes of fp32.

Activations and gradients use different tags, so a gradient can never be taken for an activation; within a tag
MPI keeps the order of messages between two ranks, which is the micro-batch order. `bytes_sent` counts the
payload this rank sent (as the TP collectives count theirs) and `wait_seconds` the time spent waiting for
receives (the pipeline's idle time, read by the bubble benchmark).

With virtual stages (hvdlm.parallel.interleaved) the stages form a ring: the last rank's chunks send their
outputs on to the first rank's next chunks, and the first rank sends those chunks' input gradients back to the last
(`ring=True`). On 2 ranks the previous and the next neighbour are then the same rank; the tags keep its
activations and gradients apart.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hvdlm.parallel.collectives import _as_words, _buf, _mpi_is_cuda_aware
from hvdlm.parallel.topology import Group

ACTIVATION, GRADIENT = 0, 1  # message tags


class StageLink:
    """This stage's sends to and receives from its neighbours (none beyond the first and last stage)."""

    def __init__(
        self, group: Group, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, ring: bool = False
    ):
        self.group, self.shape, self.dtype, self.device = group, tuple(shape), dtype, device
        rank, size = group.rank, group.size
        self.prev = (rank - 1) % size if ring or rank > 0 else None
        self.next = (rank + 1) % size if ring or rank < size - 1 else None
        # MPI reads device memory only if it is CUDA-aware; otherwise messages go through host copies.
        self.host = device.type == "cuda" and not _mpi_is_cuda_aware()
        self.bytes_sent = 0
        self.wait_seconds = 0.0
        self._posted: list[tuple[Any, torch.Tensor]] = []  # sends started ahead of their exchange, which ends them

    def exchange(
        self,
        send_next: torch.Tensor | None = None,
        send_prev: torch.Tensor | None = None,
        recv_prev: bool = False,
        recv_next: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send an activation forward and/or a gradient back, receive an activation from the previous stage and/or a
        gradient from the next; returns (from_prev, from_next). Sends to a missing neighbour are not asked for."""
        from mpi4py import MPI

        comm = self.group.comm
        received, requests, sending = [], [], []
        for wanted, peer, tag in ((recv_prev, self.prev, ACTIVATION), (recv_next, self.next, GRADIENT)):
            if not wanted:
                received.append(None)
                continue
            buf = torch.empty(self.shape, dtype=self.dtype, device="cpu" if self.host else self.device)
            requests.append(comm.Irecv(_buf(_as_words(buf)), source=peer, tag=tag))
            received.append(buf)
        for t, peer, tag in ((send_next, self.next, ACTIVATION), (send_prev, self.prev, GRADIENT)):
            if t is not None:
                request, words = self._isend(t, peer, tag)
                requests.append(request)
                sending.append(words)  # alive until Waitall below
        requests += [request for request, _ in self._posted]
        start = time.perf_counter()
        MPI.Request.Waitall(requests)
        self.wait_seconds += time.perf_counter() - start
        self._posted = []
        if self.host:
            received = [None if b is None else b.to(self.device) for b in received]
        return received[0], received[1]

    def post_send_next(self, t: torch.Tensor) -> None:
        """Start sending an activation to the next stage now; the next `exchange` waits for it (and counts it in
        the order of this stage's activation sends: messages of one tag keep their order)."""
        self._posted.append(self._isend(t, self.next, ACTIVATION))

    def _isend(self, t: torch.Tensor, peer: int, tag: int) -> tuple[Any, torch.Tensor]:
        """A non-blocking send of `t` and the words it reads: MPI reads them after Isend returns, so they must stay
        referenced until it completes."""
        assert tuple(t.shape) == self.shape and t.dtype == self.dtype, (t.shape, t.dtype, self.shape, self.dtype)
        t = t.detach().contiguous()
        if self.host:
            t = t.cpu()
        words = _as_words(t)
        self.bytes_sent += t.numel() * t.element_size()
        self.group.bytes_moved += t.numel() * t.element_size()
        return self.group.comm.Isend(_buf(words), dest=peer, tag=tag), words
