"""Where each rank sits in the 2D tensor-parallel x data-parallel grid, and the communicators of its groups.

world = tp x dp. TP ranks are adjacent: global ranks 0..tp-1 hold the shards of the first replica, tp..2tp-1
the second, and so on, so that a TP group (which talks in every layer) stays inside a node. The DP group of a
rank gathers the ranks that hold the same shard in every replica: {tp_rank, tp_rank + tp, tp_rank + 2 tp, ...}.

    world 4, tp 2:   TP groups  {0, 1} {2, 3}     (one replica each)
                     DP groups  {0, 2} {1, 3}     (one shard each; Horovod averages their gradients)

The first half of this module is pure rank arithmetic (tested on its own); `init_topology` then builds the
communicators: mpi4py `Split` for the TP groups, and Horovod process sets for the DP groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from hvdlm.errors import InputError

# ------------------------------------------------------------------------------------------------------------
# Pure rank arithmetic
# ------------------------------------------------------------------------------------------------------------


def check_layout(world: int, tp: int) -> None:
    """Refuse a TP size that does not split the world into whole replicas."""
    if tp < 1 or world % tp:
        choices = [k for k in range(1, world + 1) if world % k == 0]
        raise InputError(
            f"parallel.tp = {tp} does not divide the number of ranks ({world}): every replica needs tp ranks. "
            f"Use a tp among {choices}, or start a multiple of {tp} ranks."
        )


def tp_rank_of(rank: int, tp: int) -> int:
    """Index of a rank's shard within its replica."""
    return rank % tp


def dp_rank_of(rank: int, tp: int) -> int:
    """Index of a rank's replica."""
    return rank // tp


def tp_group_ranks(rank: int, tp: int) -> list[int]:
    """The global ranks holding the shards of `rank`'s replica (adjacent ranks)."""
    first = dp_rank_of(rank, tp) * tp
    return list(range(first, first + tp))


def dp_group_ranks(rank: int, world: int, tp: int) -> list[int]:
    """The global ranks holding the same shard as `rank`, one per replica."""
    return list(range(tp_rank_of(rank, tp), world, tp))


def all_dp_groups(world: int, tp: int) -> list[list[int]]:
    """Every DP group, in TP-rank order: the process sets Horovod must know about on every rank."""
    return [dp_group_ranks(t, world, tp) for t in range(tp)]


@dataclass(frozen=True)
class Layout:
    """One rank's coordinates in the grid; pure data, no communicators."""

    rank: int
    world: int
    tp: int

    def __post_init__(self) -> None:
        check_layout(self.world, self.tp)

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def tp_rank(self) -> int:
        return tp_rank_of(self.rank, self.tp)

    @property
    def dp_rank(self) -> int:
        return dp_rank_of(self.rank, self.tp)

    @property
    def tp_ranks(self) -> list[int]:
        return tp_group_ranks(self.rank, self.tp)

    @property
    def dp_ranks(self) -> list[int]:
        return dp_group_ranks(self.rank, self.world, self.tp)


# ------------------------------------------------------------------------------------------------------------
# Communicators
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One communication group as the collectives see it: its size, this rank's index in it, and the handles.

    `comm` is an mpi4py communicator (None for a group of one, which never communicates). `process_set` is the
    Horovod process set over the same ranks, used for CUDA tensors when MPI is not CUDA-aware (None: none).
    `bytes_moved` counts the payload bytes of every collective issued on this group, for the benchmark.
    """

    size: int = 1
    rank: int = 0
    comm: Any = None
    process_set: Any = None
    bytes_moved: int = 0

    @classmethod
    def single(cls) -> Group:
        """A group of one rank: every collective returns its input at once."""
        return cls()


@dataclass
class Topology:
    """The layout plus the groups; passed explicitly to everything that communicates (no global state)."""

    layout: Layout
    tp_group: Group
    dp_group: Group
    dp_process_set: Any  # Horovod: the process set the DistributedOptimizer averages over

    # The layout's coordinates, read through the topology by everything that holds one.
    tp = property(lambda self: self.layout.tp)
    dp = property(lambda self: self.layout.dp)
    tp_rank = property(lambda self: self.layout.tp_rank)
    dp_rank = property(lambda self: self.layout.dp_rank)

    @property
    def dp_root(self) -> int:
        """Global rank of this DP group's DP-rank-0 member, the source of the initial state."""
        return self.layout.dp_ranks[0]


def make_tp_group(layout: Layout, comm: Any) -> Group:
    """The TP group of `layout.rank`, split from `comm` (COMM_WORLD); a group of one needs no communicator."""
    if layout.tp == 1:
        return Group.single()
    tp_comm = comm.Split(color=layout.dp_rank, key=layout.tp_rank)
    assert tp_comm.Get_size() == layout.tp and tp_comm.Get_rank() == layout.tp_rank
    return Group(size=layout.tp, rank=layout.tp_rank, comm=tp_comm)


def init_topology(tp: int) -> Topology:
    """Initialise Horovod for a tp x dp grid and build this rank's groups. Call once, on every rank.

    tp = 1 initialises Horovod exactly as plain data parallelism does (`hvd.init()`), so any launcher works,
    Gloo included. tp > 1 needs MPI: the TP groups are mpi4py communicators.
    """
    import horovod.torch as hvd

    if tp == 1:
        # Horovod: one replica per rank; the DP group is the whole job, i.e. Horovod's global process set.
        hvd.init()
        layout = Layout(hvd.rank(), hvd.size(), 1)
        # No mpi4py communicator: without TP all traffic is Horovod's, and any launcher (Gloo too) must work.
        dp_group = Group(size=hvd.size(), rank=hvd.rank(), process_set=hvd.global_process_set)
        return Topology(layout, Group.single(), dp_group, hvd.global_process_set)

    _refuse_non_mpi_launch(tp)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    layout = Layout(world.Get_rank(), world.Get_size(), tp)
    # Horovod: every rank declares every DP group as a process set (Horovod requires the same list everywhere).
    # A DP group spanning the whole job (tp = 1) is Horovod's global set already; tp > 1 never has one.
    # The TP groups become process sets too, for the CUDA fallback of the TP collectives (NCCL via Horovod);
    # with dp = 1 the TP group is the whole job, i.e. the global set.
    dp_sets = [hvd.ProcessSet(ranks) for ranks in all_dp_groups(layout.world, tp)]
    tp_sets = [] if layout.dp == 1 else [hvd.ProcessSet(list(range(d * tp, (d + 1) * tp))) for d in range(layout.dp)]
    hvd.init(comm=world, process_sets=dp_sets + tp_sets)
    dp_set = dp_sets[layout.tp_rank]
    tp_set = hvd.global_process_set if layout.dp == 1 else tp_sets[layout.dp_rank]

    tp_group = make_tp_group(layout, world)
    tp_group.process_set = tp_set
    dp_comm = world.Split(color=layout.tp_rank, key=layout.dp_rank)
    dp_group = Group(size=layout.dp, rank=layout.dp_rank, comm=dp_comm, process_set=dp_set)
    return Topology(layout, tp_group, dp_group, dp_set)


def _refuse_non_mpi_launch(tp: int) -> None:
    """horovodrun --gloo starts ranks without MPI: mpi4py would see a world of one. Say so instead of hanging."""
    horovod_size = int(os.environ.get("HOROVOD_SIZE", "0"))
    controller = os.environ.get("HOROVOD_CONTROLLER", "")
    if horovod_size > 1 and controller == "gloo":
        raise InputError(
            f"parallel.tp = {tp} needs an MPI launcher, but these {horovod_size} ranks were started by horovodrun "
            "with the Gloo controller, which gives mpi4py no communicator for the tensor-parallel groups. "
            'Use mpirun, srun --mpi=pmix, or horovodrun --mpi (launch.controller = "mpi").'
        )
