"""Starting a benchmark's own `--worker` run on np ranks of this machine, and reading back the JSON it prints.

One rank a core, 1 thread each, ranks that yield when they wait (the machine has 2 cores), Open MPI's shared memory
with its single copy where this machine allows it, as `hvdlm launch` decides (hvdlm.launch.shared_memory): without
it a send posted before a rank goes back to computing waits for that rank's next MPI call.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys


def transport() -> str:
    """How large messages cross shared memory in these runs, for the record."""
    from hvdlm.launch.shared_memory import single_copy_works

    return "single copy (CMA)" if single_copy_works() else "copied through a shared buffer (no CMA here)"


def run_worker(script: str, np: int, argv: list[str], what: str) -> dict:
    """Run `script --worker ARGV` on np ranks and return the JSON of its last `RESULT ` line; exits with the run's
    output tail (what: the run's name in that message) if it fails."""
    from hvdlm.launch.commands import root_env
    from hvdlm.launch.shared_memory import single_copy_works

    mpirun = shutil.which("mpirun")
    if not mpirun:
        sys.exit("mpirun is not on the PATH (run `make setup`, or load your MPI)")
    env = {**os.environ, **root_env(), "OMP_NUM_THREADS": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
    cmd = [mpirun, "-np", str(np), "-bind-to", "none"]
    if not single_copy_works():
        cmd += ["-mca", "btl_vader_single_copy_mechanism", "none"]
    cmd += [sys.executable, os.path.abspath(script), "--worker", *argv]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = [line[len("RESULT ") :] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not found:
        sys.exit(f"the {what} run failed:\n{proc.stdout[-3000:]}")
    return json.loads(found[-1])
