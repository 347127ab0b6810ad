"""The job's own small collectives, over every rank: agreements, the stop vote, the logged means, digests.

They travel over the job's MPI communicator when the layout has one (tp > 1 or pp > 1, whose groups are mpi4py
communicators), and through Horovod otherwise: plain data parallelism builds no communicator, so that any
launcher starts it, horovodrun with Gloo included. A job of one process has nothing to exchange and sends nothing:
a Horovod collective, even over one rank, waits for the next cycle of Horovod's background thread, and the logged
loss did so every step (2.7 of a 30 ms step in bench/plan_check.py's one-rank run, which it also locked to whole
5 ms cycles).

Why not Horovod always: a Horovod collective waits for the next cycle of Horovod's background thread
(HOROVOD_CYCLE_TIME), and that thread coordinates the ranks over MPI every cycle, which delays the tensor-parallel
collectives of the main thread (bench/tp_horovod.py: a TP=2 step 42 ms without Horovod, 62 ms with the stop vote
through it at a 5 ms cycle). With these off Horovod, a job of one replica sends nothing through Horovod in a step,
and its cycle can be long (topology.init_topology): 44 ms.

Each function is a collective: every rank calls it, in the same order, with the same `name`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_world: Any = None  # the job's MPI communicator (its own duplicate of COMM_WORLD), or None: Horovod


def use_communicator(comm: Any) -> None:
    """From now on, the job-wide collectives go over `comm` (None: through Horovod)."""
    global _world
    _world = comm


def _alone() -> bool:
    """On the Horovod path (no communicator: tp = pp = 1), whether the job is one process. Asked at each call: an
    elastic job's size changes at its resets."""
    import horovod.torch as hvd

    return hvd.size() == 1


def allgather_object(obj: Any, name: str) -> list[Any]:
    """Every rank's `obj` (picklable), by global rank."""
    if _world is not None:
        return _world.allgather(obj)
    if _alone():
        return [obj]
    import horovod.torch as hvd

    return hvd.allgather_object(obj, name=name)


def broadcast_object(obj: Any, root: int, name: str) -> Any:
    """Global rank `root`'s `obj` on every rank."""
    if _world is not None:
        return _world.bcast(obj, root=root)
    if _alone():
        return obj
    import horovod.torch as hvd

    return hvd.broadcast_object(obj, root_rank=root, name=name)


def mean(x: torch.Tensor, name: str) -> float:
    """The mean over all ranks of a one-element tensor (a loss), read on the host."""
    if _world is not None:
        import numpy as np
        from mpi4py import MPI

        # A buffer Allreduce, not mpi4py's allreduce of Python objects: that one duplicates the communicator on its
        # first call (its private context, MPI_Comm_dup, a collective of every rank, run holding the GIL). Called
        # at the first step's log, it deadlocked a pipeline rank against its peers still waiting for Horovod in
        # their own step (py-spy stacks of a hung PP=2 x DP=2 ZeRO-2 run; 3 hangs in about 100 runs).
        total = np.array([float(x.item())])
        _world.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        return float(total[0]) / _world.Get_size()
    if _alone():
        return float(x.item())
    import horovod.torch as hvd

    return hvd.allreduce(x, op=hvd.Average, name=name).item()


class PendingMax:
    """The largest value of a one-element int32 CPU tensor over all ranks, in flight until `wait`, which writes it
    into the tensor. Started before a step's work, it travels with that work and adds no wait of its own."""

    def __init__(self, buffer: torch.Tensor, name: str):
        self._buffer = buffer
        if _world is not None:
            from mpi4py import MPI

            # Non-blocking: MPI moves it along inside the step's TP or pipeline collectives, or at the wait.
            self._finish = _world.Iallreduce(MPI.IN_PLACE, buffer.numpy(), op=MPI.MAX).Wait
        else:
            import horovod.torch as hvd

            # Horovod: in flight with the step's gradient traffic.
            handle = hvd.allreduce_async_(buffer, op=hvd.Max, name=name)
            self._finish = lambda: hvd.synchronize(handle)

    def wait(self) -> int:
        self._finish()
        return int(self._buffer.item())
