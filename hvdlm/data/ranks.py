"""The MPI world of a preparation started under mpirun or srun: which rank this is, how many there are, and the
few collectives prepare needs (broadcast, gather, and a decision taken on rank 0 that every rank then follows).

mpi4py is imported only when a launcher's variables say that several ranks were started (Open MPI's
OMPI_COMM_WORLD_SIZE, PMI's PMI_SIZE, PMIx's PMIX_RANK, Slurm's SLURM_STEP_NUM_TASKS in an srun step), so a plain
`hvdlm data prepare` never initialises MPI, and `hvdlm train`, which may prepare the built-in corpus inside its
own MPI job, calls prepare without a world.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hvdlm.errors import InputError

_WAIT_POLL_S = 0.005  # how often a waiting rank looks whether the others have arrived


@dataclass
class World:
    rank: int = 0
    size: int = 1
    comm: Any = None  # mpi4py's COMM_WORLD when size > 1
    local_size: int = 1  # the ranks on this machine (this one included)

    def bcast(self, value: Any) -> Any:
        if self.comm is None:
            return value
        self.barrier()
        return self.comm.bcast(value, root=0)

    def allgather(self, value: Any) -> list:
        if self.comm is None:
            return [value]
        self.barrier()
        return self.comm.allgather(value)

    def barrier(self) -> None:
        """Wait for every rank, asleep: MPI's own blocking calls poll a core at full speed, and the ranks wait here
        for long (while rank 0 trains the tokenizer or assembles the shards), on cores the others need."""
        if self.comm is None:
            return
        request = self.comm.Ibarrier()
        while not request.Test():
            time.sleep(_WAIT_POLL_S)

    def on_root(self, work: Callable[[], Any]) -> Any:
        """Run `work` on rank 0 and give every rank its result. What goes wrong there is raised on every rank, so
        that all of them stop (a rank left waiting in a collective would hang the job): bad input (InputError) and
        a failed write (OSError) as they are, anything else as a RuntimeError on the other ranks."""
        if self.comm is None:
            return work()
        outcome: tuple[str, Any] = ("ok", None)
        if self.rank == 0:
            try:
                outcome = ("ok", work())
            except InputError as e:
                outcome = ("input", str(e))
            except OSError as e:
                outcome = ("os", (e.errno, e.strerror, e.filename))
            except Exception as e:
                self.bcast(("crash", f"{type(e).__name__}: {e}"))
                raise
        kind, value = self.bcast(outcome)
        if kind == "input":
            raise InputError(value)
        if kind == "os":
            raise OSError(*value)
        if kind == "crash":
            raise RuntimeError(f"rank 0 failed ({value}); see its traceback")
        return value


def _launched_ranks(env: dict[str, str]) -> int:
    """How many ranks the launcher's variables say were started (1: none, or just one)."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 0 if "PMIX_RANK" in env else 1  # PMIx alone does not say how many: ask MPI


def detect_world(env: dict[str, str] | None = None) -> World:
    """This process's rank in the job a launcher started; World() (one rank) outside a launcher."""
    env = dict(os.environ if env is None else env)
    launched = _launched_ranks(env)
    if launched == 1:
        return World()
    from mpi4py import MPI  # here: only a preparation under a launcher needs it

    comm = MPI.COMM_WORLD
    if launched > 1 and comm.Get_size() != launched:
        raise InputError(
            f"the launcher started {launched} tasks, but MPI sees {comm.Get_size()} rank(s): each task would "
            "prepare the whole dataset alone. Under srun pass --mpi=pmix (or the plugin your MPI needs); under "
            "mpirun use the mpirun of the MPI that mpi4py was built with."
        )
    if comm.Get_size() == 1:
        return World()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    return World(comm.Get_rank(), comm.Get_size(), comm, local.Get_size())


def default_workers(world: World) -> int:
    """--workers when not given: the cores this process may use. Ranks bound to cores of their own (srun's
    --cpus-per-task, mpirun's --bind-to core) use theirs; ranks that may each use every core of the machine share
    them out, so that N ranks on a node do not start N times its cores."""
    cores = len(os.sched_getaffinity(0))
    if cores >= (os.cpu_count() or cores) and world.local_size > 1:
        return max(1, cores // world.local_size)
    return max(1, cores)


def my_units(sizes: list[int], world: World) -> list[int]:
    """The units rank `world.rank` encodes: the largest first, each to the rank with the least bytes so far (ties to
    the lower rank), so every rank computes the same share-out."""
    load = [0] * world.size
    mine = []
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world.size), key=lambda r: (load[r], r))
        load[rank] += max(sizes[index], 1)
        if rank == world.rank:
            mine.append(index)
    return sorted(mine)
