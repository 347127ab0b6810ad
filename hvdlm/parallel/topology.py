"""Where each rank sits in the 3D pipeline x data-parallel x tensor-parallel grid, and its groups' communicators.

world = pp x dp x tp, in Megatron's order: TP ranks are adjacent (innermost), then data parallel, then pipeline
stages. Global rank = (stage * dp + dp_rank) * tp + tp_rank. So a TP group (which talks in every layer) stays
inside a node, and stage boundaries (one activation per micro-batch) cross nodes. The DP group of a rank gathers
the ranks holding the same shard of the same stage in every replica; the pipeline group gathers the stages of one
(dp, tp) column; its first and last stage form the embedding group, which keeps the tied embedding/head weight
identical (Megatron's embedding group).

    world 4, tp 2:   TP groups  {0, 1} {2, 3}     (one replica each)
                     DP groups  {0, 2} {1, 3}     (one shard each; Horovod averages their gradients)

    world 8, pp 2, dp 2, tp 2:   stage 0 holds ranks 0-3, stage 1 ranks 4-7
                     TP groups  {0, 1} {2, 3} {4, 5} {6, 7}
                     DP groups  {0, 2} {1, 3} {4, 6} {5, 7}   (per stage and TP rank)
                     pipelines  {0, 4} {1, 5} {2, 6} {3, 7}   (per DP and TP rank; neighbours send activations)

The first half of this module is pure rank arithmetic (tested on its own); `init_topology` then builds the
communicators: mpi4py `Split` for the TP and pipeline groups, and Horovod process sets for the DP groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from hvdlm.errors import InputError

# ------------------------------------------------------------------------------------------------------------
# Pure rank arithmetic
# ------------------------------------------------------------------------------------------------------------


def check_layout(world: int, tp: int, pp: int = 1) -> None:
    """Refuse TP and pipeline sizes that do not split the world into whole replicas of whole stages."""
    if tp < 1 or world % tp:
        choices = [k for k in range(1, world + 1) if world % k == 0]
        raise InputError(
            f"parallel.tp = {tp} does not divide the number of ranks ({world}): every replica needs tp ranks. "
            f"Use a tp among {choices}, or start a multiple of {tp} ranks."
        )
    if pp < 1 or world % (tp * pp):
        raise InputError(
            f"parallel.pp x parallel.tp = {pp} x {tp} = {pp * tp} does not divide the number of ranks ({world}): "
            f"a job is pp x dp x tp ranks, every pipeline stage of every replica on tp ranks. Start a multiple of "
            f"{pp * tp} ranks, or change parallel.pp."
        )


def tp_rank_of(rank: int, tp: int) -> int:
    """Index of a rank's shard within its replica's stage."""
    return rank % tp


def dp_rank_of(rank: int, tp: int, dp: int | None = None) -> int:
    """Index of a rank's replica (`dp` is needed only with pipeline stages: ranks of later stages wrap)."""
    return rank // tp if dp is None else rank // tp % dp


def pp_rank_of(rank: int, tp: int, dp: int) -> int:
    """Index of a rank's pipeline stage."""
    return rank // (tp * dp)


def global_rank(pp_rank: int, dp_rank: int, tp_rank: int, dp: int, tp: int) -> int:
    """The global rank at these coordinates (inverse of the three functions above)."""
    return (pp_rank * dp + dp_rank) * tp + tp_rank


def tp_group_ranks(rank: int, tp: int) -> list[int]:
    """The global ranks holding the shards of `rank`'s replica stage (adjacent ranks)."""
    first = rank // tp * tp
    return list(range(first, first + tp))


def dp_group_ranks(rank: int, world: int, tp: int, pp: int = 1) -> list[int]:
    """The global ranks holding the same shard of the same stage as `rank`, one per replica."""
    dp = world // (tp * pp)
    stage = pp_rank_of(rank, tp, dp)
    return [global_rank(stage, d, tp_rank_of(rank, tp), dp, tp) for d in range(dp)]


def pp_group_ranks(rank: int, world: int, tp: int, pp: int) -> list[int]:
    """The global ranks holding the stages of `rank`'s (replica, shard) column, in stage order."""
    dp = world // (tp * pp)
    return [global_rank(s, dp_rank_of(rank, tp, dp), tp_rank_of(rank, tp), dp, tp) for s in range(pp)]


def embedding_group_ranks(rank: int, world: int, tp: int, pp: int) -> list[int]:
    """The first and last stage of `rank`'s pipeline: the two holders of the tied embedding/head weight."""
    column = pp_group_ranks(rank, world, tp, pp)
    return [column[0], column[-1]] if pp > 1 else column


def all_dp_groups(world: int, tp: int, pp: int = 1) -> list[list[int]]:
    """Every DP group, by stage then TP rank: the process sets Horovod must know about on every rank."""
    dp = world // (tp * pp)
    return [dp_group_ranks(global_rank(s, 0, t, dp, tp), world, tp, pp) for s in range(pp) for t in range(tp)]


@dataclass(frozen=True)
class GridPosition:
    """One rank's coordinates in the grid; pure data, no communicators."""

    rank: int
    world: int
    tp: int
    pp: int = 1

    def __post_init__(self) -> None:
        check_layout(self.world, self.tp, self.pp)

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def tp_rank(self) -> int:
        return tp_rank_of(self.rank, self.tp)

    @property
    def dp_rank(self) -> int:
        return dp_rank_of(self.rank, self.tp, self.dp)

    @property
    def pp_rank(self) -> int:
        return pp_rank_of(self.rank, self.tp, self.dp)

    @property
    def tp_ranks(self) -> list[int]:
        return tp_group_ranks(self.rank, self.tp)

    @property
    def dp_ranks(self) -> list[int]:
        return dp_group_ranks(self.rank, self.world, self.tp, self.pp)

    @property
    def pp_ranks(self) -> list[int]:
        return pp_group_ranks(self.rank, self.world, self.tp, self.pp)

    @property
    def embedding_ranks(self) -> list[int]:
        return embedding_group_ranks(self.rank, self.world, self.tp, self.pp)


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

    layout: GridPosition
    tp_group: Group
    dp_group: Group
    dp_process_set: Any  # Horovod: the process set the DistributedOptimizer averages over
    # Pipeline stages (pp > 1): this rank's column of stages (neighbours send activations and gradients on its
    # communicator, hvdlm.parallel.p2p), and the first and last stage of it (the tied embedding/head weight).
    pp_group: Group = field(default_factory=Group.single)
    embedding_group: Group = field(default_factory=Group.single)

    # The layout's coordinates, read through the topology by everything that holds one.
    tp = property(lambda self: self.layout.tp)
    dp = property(lambda self: self.layout.dp)
    pp = property(lambda self: self.layout.pp)
    tp_rank = property(lambda self: self.layout.tp_rank)
    dp_rank = property(lambda self: self.layout.dp_rank)
    pp_rank = property(lambda self: self.layout.pp_rank)

    @property
    def dp_root(self) -> int:
        """Global rank of this DP group's DP-rank-0 member, the source of the initial state."""
        return self.layout.dp_ranks[0]

    @classmethod
    def single(cls) -> Topology:
        """One process alone (no Horovod, no MPI): every group of one, nothing ever sent."""
        return cls(GridPosition(0, 1, 1), Group.single(), Group.single(), dp_process_set=None)


def make_tp_group(layout: GridPosition, comm: Any) -> Group:
    """The TP group of `layout.rank`, split from `comm` (COMM_WORLD); a group of one needs no communicator."""
    if layout.tp == 1:
        return Group.single()
    tp_comm = comm.Split(color=layout.rank // layout.tp, key=layout.tp_rank)  # one color per (stage, replica)
    assert tp_comm.Get_size() == layout.tp and tp_comm.Get_rank() == layout.tp_rank
    return Group(size=layout.tp, rank=layout.tp_rank, comm=tp_comm)


# Horovod's cycle (HOROVOD_CYCLE_TIME, ms) in a job that sends it nothing in a step: see init_topology.
IDLE_CYCLE_MS = 100.0


def horovod_cycle_ms(current: str | None, dp: int, quiet_alone: bool) -> str | None:
    """HOROVOD_CYCLE_TIME for a layout of `dp` replicas, given its value now: at least IDLE_CYCLE_MS when one
    replica sends Horovod nothing in a step (`quiet_alone`); None leaves it as it is."""
    if dp > 1 or not quiet_alone:
        return None
    return f"{max(float(current or 0), IDLE_CYCLE_MS):g}"


def elastic_job() -> bool:
    """This rank runs under horovodrun's elastic mode (it sets HOROVOD_ELASTIC for its workers)."""
    return os.environ.get("HOROVOD_ELASTIC") == "1"


def init_topology(tp: int, pp: int = 1, quiet_alone: bool = False, share_gpu: bool = False) -> Topology:
    """Initialise Horovod for a pp x dp x tp grid and build this rank's groups. Call once, on every rank.

    tp = pp = 1 initialises Horovod exactly as plain data parallelism does (`hvd.init()`), so any launcher works,
    Gloo included. tp > 1 or pp > 1 needs MPI: the TP and pipeline groups are mpi4py communicators, and the job's
    own collectives (hvdlm.parallel.jobwide) go over MPI too.

    `quiet_alone`: the run sends Horovod nothing per step when it has one replica (CPU tensors, no ZeRO or local
    SGD, whose DP-group traffic goes through Horovod even over one rank). Such a layout then slows Horovod's cycle
    to IDLE_CYCLE_MS: its background thread coordinates the ranks over MPI every cycle, busy or not, and on CPU
    ranks that delays the main thread's TP and pipeline collectives (bench/tp_horovod.py: a TP=2 step 65 ms with
    Horovod idle at the 5 ms that hvdlm launch sets for CPU ranks, 44 ms at 100 ms, 43 ms without Horovod).

    `share_gpu` (train.share_gpu: ranks may share a GPU): the TP group gets no Horovod process set, so its CUDA
    collectives never build an NCCL communicator (which refuses two ranks on one GPU); they go over MPI, through
    host memory where MPI is not CUDA-aware (hvdlm.parallel.collectives).
    """
    import horovod.torch as hvd

    from hvdlm.parallel import jobwide

    if tp == 1 and pp == 1:
        # Horovod: one replica per rank; the DP group is the whole job, i.e. Horovod's global process set.
        jobwide.use_communicator(None)
        hvd.init()
        layout = GridPosition(hvd.rank(), hvd.size(), 1)
        # No mpi4py communicator: without TP all traffic is Horovod's, and any launcher (Gloo too) must work.
        dp_group = Group(size=hvd.size(), rank=hvd.rank(), process_set=hvd.global_process_set)
        return Topology(layout, Group.single(), dp_group, hvd.global_process_set)

    _refuse_non_mpi_launch(tp, pp)
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    layout = GridPosition(world.Get_rank(), world.Get_size(), tp, pp)
    if cycle := horovod_cycle_ms(os.environ.get("HOROVOD_CYCLE_TIME"), layout.dp, quiet_alone):
        os.environ["HOROVOD_CYCLE_TIME"] = cycle  # read by hvd.init
    jobwide.use_communicator(world.Dup())  # its own: no message of it can meet one of the groups'
    # Horovod: every rank declares every DP group as a process set (Horovod requires the same list everywhere).
    # A DP group spanning the whole job (tp = pp = 1) is Horovod's global set already; here none does.
    # The TP groups become process sets too, for the CUDA fallback of the TP collectives (NCCL via Horovod);
    # a TP group that is the whole job is the global set.
    all_dp = all_dp_groups(layout.world, tp, pp)
    dp_sets = [hvd.ProcessSet(ranks) for ranks in all_dp]
    replicas = layout.world // tp  # TP groups: one per (stage, replica)
    tp_sets = (
        [hvd.ProcessSet(list(range(g * tp, (g + 1) * tp))) for g in range(replicas)] if 1 < tp < layout.world else []
    )
    hvd.init(comm=world, process_sets=dp_sets + tp_sets)
    dp_set = dp_sets[all_dp.index(layout.dp_ranks)]
    tp_set = tp_sets[layout.rank // tp] if tp_sets else hvd.global_process_set

    tp_group = make_tp_group(layout, world)
    tp_group.process_set = None if share_gpu else tp_set
    dp_comm = world.Split(color=layout.rank // (tp * layout.dp) * tp + layout.tp_rank, key=layout.dp_rank)
    dp_group = Group(size=layout.dp, rank=layout.dp_rank, comm=dp_comm, process_set=dp_set)
    topo = Topology(layout, tp_group, dp_group, dp_set)
    if pp > 1:
        column = layout.dp_rank * tp + layout.tp_rank  # one pipeline per (replica, shard)
        topo.pp_group = Group(size=pp, rank=layout.pp_rank, comm=world.Split(color=column, key=layout.pp_rank))
        # The embedding group: first and last stage of the column; the middle stages split off on their own.
        ends = layout.pp_rank in (0, pp - 1)
        comm = world.Split(color=column if ends else MPI.UNDEFINED, key=layout.pp_rank)
        if ends:
            topo.embedding_group = Group(size=2, rank=int(layout.pp_rank > 0), comm=comm)
    return topo


def _refuse_non_mpi_launch(tp: int, pp: int = 1) -> None:
    """horovodrun --gloo starts ranks without MPI: mpi4py would see a world of one. Say so instead of hanging."""
    horovod_size = int(os.environ.get("HOROVOD_SIZE", "0"))
    controller = os.environ.get("HOROVOD_CONTROLLER", "")
    if horovod_size > 1 and controller == "gloo":
        raise InputError(
            f"{_needing_mpi(tp, pp)} needs an MPI launcher, but these {horovod_size} ranks were started by "
            "horovodrun with the Gloo controller, which gives mpi4py no communicator for the tensor-parallel "
            "and pipeline groups. "
            'Use mpirun, srun --mpi=pmix, or horovodrun --mpi (launch.controller = "mpi").'
        )


def _needing_mpi(tp: int, pp: int) -> str:
    return " with ".join(f"parallel.{k} = {v}" for k, v in (("tp", tp), ("pp", pp)) if v > 1)
