"""Start a program on N real MPI ranks of this machine, as `hvdlm launch` would, but allowing more ranks than
cores (--oversubscribe: the 4-rank TP x DP tests run on 2-core CI machines)."""

from __future__ import annotations

import os
import subprocess
import sys

from hvdlm.launch.commands import plan_launch


def mpirun_argv(np: int, program: list[str]) -> tuple[list[str], dict[str, str]]:
    """mpirun's argv for `program` on np ranks, and the environment it needs (on top of this process's)."""
    # The launch plan of one rank on this machine gives the flags and variables hvdlm uses (root permission,
    # yielding when idle, the BTL choices); only the rank count and --oversubscribe differ.
    plan = plan_launch("mpirun", 1, None, None, program, threads=1, cycle_time_ms=5.0)
    argv = list(plan.argv)
    i = argv.index("-np")
    argv[i : i + 2] = ["-np", str(np), "--oversubscribe"]
    return argv, {**os.environ, **plan.env, "PYTHONUNBUFFERED": "1"}


def mpirun(np: int, program: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    argv, launch_env = mpirun_argv(np, program)
    return subprocess.run(
        argv,
        env={**launch_env, **(env or {})},
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def hvdlm_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hvdlm", *args]
