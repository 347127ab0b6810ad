"""Pipeline schedules: the order in which one stage runs the forward and backward passes of a step's micro-batches,
and what it sends and receives between them (after Megatron-LM's core/pipeline_parallel/schedules.py).

GPipe (Huang et al., 2019): all m forwards, then all m backwards. Simple; every stage keeps the saved
activations of all m micro-batches until its backwards begin.

1F1B (PipeDream-Flush, Narayanan et al., 2021): stage s of p runs w = min(p - s - 1, m) warm-up forwards, then
alternates one forward and one backward (steady state), then runs the w remaining backwards (cool-down). A stage
holds at most w + 1 <= p micro-batches' activations instead of m: the same bubble as GPipe, less memory.

    p = 2, m = 4    stage 0:  F0 F1 B0 F2 B1 F3 B2 B3
                    stage 1:  F0 B0 F1 B1 F2 B2 F3 B3

Both run the backwards in micro-batch order (0, 1, ..., m - 1), so every parameter's gradient adds up its m
contributions in the same order as in gradient accumulation on one rank, and the two schedules give the same
numbers. The idle fraction of either (the bubble) is (p - 1) / (m + p - 1).

The stage computes; this module only orders the work. `StageWork` is what a stage does with one micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hvdlm.parallel.p2p import StageLink


@dataclass
class StageWork:
    """One stage's part of a step. `forward(i, inp)` runs micro-batch i (inp: the received activation, None on
    the first stage) and returns what to send on (or, on the last stage, the scaled loss to backpropagate);
    the schedule backpropagates through it and sends the input's gradient back."""

    forward: Callable[[int, torch.Tensor | None], torch.Tensor]
    is_first: bool
    is_last: bool
    # Counts the bytes each micro-batch's forward saves for backward, and their peak over the step: an
    # hvdlm.training.memory_account.ActivationMeter (counting(i) around forward i, release(i) after backward i).
    meter: Any = None


def run_schedule(name: str, work: StageWork, link: StageLink, microbatches: int) -> None:
    """Forward and backward of `microbatches` micro-batches on this stage in schedule `name` ("1f1b" | "gpipe")."""
    (one_f_one_b if name == "1f1b" else gpipe)(work, link, microbatches)


def gpipe(work: StageWork, link: StageLink, m: int) -> None:
    """All forwards, then all backwards (in micro-batch order)."""
    saved = []
    for i in range(m):
        inp, _ = link.exchange(recv_prev=not work.is_first)
        out = _forward(work, i, inp)
        link.exchange(send_next=None if work.is_last else out)
        saved.append((i, inp, out))
    for i, inp, out in saved:
        _, grad = link.exchange(recv_next=not work.is_last)
        link.exchange(send_prev=_backward(work, i, inp, out, grad))


def one_f_one_b(work: StageWork, link: StageLink, m: int) -> None:
    """Warm-up forwards, steady one-forward-one-backward, cool-down backwards (Megatron's non-interleaved 1F1B).

    In the steady state a stage sends its activation and waits for a gradient in one exchange, and sends a
    gradient and waits for the next activation in another: both directions in flight at once, as the neighbour
    does the mirror image (see hvdlm.parallel.p2p on why this cannot deadlock).
    """
    stage, stages = link.group.rank, link.group.size
    warmup = min(stages - stage - 1, m)
    steady = m - warmup
    first, last = work.is_first, work.is_last
    saved: list[tuple[int, torch.Tensor | None, torch.Tensor]] = []
    for i in range(warmup):
        inp, _ = link.exchange(recv_prev=not first)
        out = _forward(work, i, inp)
        link.exchange(send_next=None if last else out)
        saved.append((i, inp, out))
    inp = link.exchange(recv_prev=not first)[0] if steady else None
    for k in range(steady):
        i = warmup + k
        out = _forward(work, i, inp)
        _, grad = link.exchange(send_next=None if last else out, recv_next=not last)
        saved.append((i, inp, out))
        j, inp_j, out_j = saved.pop(0)
        grad_in = _backward(work, j, inp_j, out_j, grad)
        more = k < steady - 1
        inp = link.exchange(send_prev=grad_in, recv_prev=more and not first)[0]
    for _ in range(warmup):
        _, grad = link.exchange(recv_next=not last)
        j, inp_j, out_j = saved.pop(0)
        link.exchange(send_prev=_backward(work, j, inp_j, out_j, grad))


def forward_only(work: StageWork, link: StageLink, m: int) -> None:
    """Forwards of m micro-batches, without gradients (evaluation)."""
    with torch.no_grad():
        for i in range(m):
            inp, _ = link.exchange(recv_prev=not work.is_first)
            out = work.forward(i, inp)
            link.exchange(send_next=None if work.is_last else out)


def _forward(work: StageWork, i: int, inp: torch.Tensor | None) -> torch.Tensor:
    if inp is not None:
        inp.requires_grad_()  # its gradient is what the previous stage waits for
    with work.meter.counting(i) if work.meter is not None else contextlib.nullcontext():
        return work.forward(i, inp)


def _backward(
    work: StageWork, i: int, inp: torch.Tensor | None, out: torch.Tensor, grad: torch.Tensor | None
) -> torch.Tensor | None:
    """Backpropagate micro-batch i through this stage; the gradient to send back (None on the first stage)."""
    torch.autograd.backward(out, grad_tensors=grad)  # the last stage's out is its loss: grad None means 1
    if work.meter is not None:
        work.meter.release(i)
    return None if work.is_first else inp.grad
