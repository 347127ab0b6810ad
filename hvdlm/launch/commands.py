"""Launcher command lines as argv lists (shell-quoted only for display), and the environment they need."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hvdlm.config import LAUNCHERS
from hvdlm.errors import InputError
from hvdlm.launch.hosts import LOCALHOST, Host, local_cores, place_ranks

# Variables every rank needs to see; Open MPI forwards only the ones named with -x.
_FORWARDED = (
    "PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "OMP_NUM_THREADS", "HOROVOD_CYCLE_TIME", "HVDLM_PROGRESS", "HVDLM_CACHE",
)  # fmt: skip


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set on top of the caller's environment

    def display(self) -> str:
        """A copy-pasteable shell line: the added variables, then the command."""
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env.items()] + [shlex.join(self.argv)])


def threads_per_rank(ranks_on_busiest_host: int, cores: int | None = None) -> int:
    """Cores per rank on a node, so that CPU ranks do not oversubscribe it."""
    return max(1, (cores or local_cores()) // max(1, ranks_on_busiest_host))


def find_executable(name: str) -> str:
    """A launcher from beside this Python first (horovodrun must match the Horovod that hvdlm imports, even in a
    venv that is not activated), else from the PATH (mpirun)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise InputError(
            f"'{name}' is not on the PATH. Load your MPI (e.g. 'module load openmpi'), or run 'make setup' and use "
            "the hvdlm of .venv/bin."
        )
    return found


def plan_launch(
    launcher: str, np: int, hosts: list[Host] | None, hostfile: str | None, program: list[str],
    controller: str = "gloo", threads: int = 0, cycle_time_ms: float = 0.0, progress: bool = False,
) -> LaunchPlan:  # fmt: skip
    """The full command for `np` ranks of `program` under `launcher` ("mpirun" or "horovodrun").

    `hosts` is None for this machine alone; with `hostfile`, `hosts` holds what it lists (for the slot check) and
    the launcher is handed the file itself.
    """
    local = hosts is None
    effective = hosts or [Host(LOCALHOST, local_cores())]
    per_host = place_ranks(effective, np)
    env = {"OMP_NUM_THREADS": str(threads or threads_per_rank(max(per_host)))}
    # Each rank runs its compute threads plus Horovod's background thread, so CPU ranks share cores. Open MPI
    # busy-polls inside blocking calls unless told to yield, and Horovod's 1 ms default cycle makes that thread
    # negotiate (and spin) a thousand times a second; both steal the core from the math. Measured on 2 cores:
    # about 270 -> 195 ms per step of the demo model with 2 ranks (bench/RESULTS.md).
    env["OMPI_MCA_mpi_yield_when_idle"] = "1"
    if cycle_time_ms:
        env["HOROVOD_CYCLE_TIME"] = f"{cycle_time_ms:g}"
    if os.geteuid() == 0:
        # Open MPI refuses to start as root without both of these.
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if progress:
        env["HVDLM_PROGRESS"] = "1"

    if launcher not in LAUNCHERS:
        raise InputError(f"unknown launcher '{launcher}'. Use one of {', '.join(LAUNCHERS)}.")
    argv = [find_executable(launcher), "-np", str(np)]
    argv += ["--hostfile", hostfile] if hostfile else ["-H", _host_list(effective)]
    if launcher == "mpirun":
        # One rank per slot, no pinning: a rank's torch threads need the cores that OMP_NUM_THREADS promises.
        argv += ["-bind-to", "none", "-map-by", "slot"]
        for name in _FORWARDED:
            if name in env or name in os.environ:
                argv += ["-x", name]
        # ob1 with the TCP / shared-memory BTLs; the openib BTL is deprecated and warns or hangs on many clusters.
        argv += ["-mca", "pml", "ob1", "-mca", "btl", "^openib"]
        if local:
            # Containers often forbid the cross-process memory copy (ptrace) that shared memory uses by default.
            argv += ["-mca", "btl_vader_single_copy_mechanism", "none"]
    else:
        argv += ["--gloo"] if controller == "gloo" else ["--mpi"]
    return LaunchPlan(argv=argv + program, env=env)


def _host_list(hosts: list[Host]) -> str:
    return ",".join(f"{h.name}:{h.slots}" for h in hosts)
