"""Hostfiles in the formats launchers read, and writing them without ever leaving half a file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hvdlm.errors import InputError
from hvdlm.launch.hosts import Host

FORMATS = {
    "openmpi": "Open MPI hostfile: 'host slots=N' (mpirun --hostfile)",
    "mpich": "MPICH / Hydra machine file: 'host:N' (mpiexec -f)",
    "horovod": "the horovodrun -H string: host:N,host:N",
    "list": "one host per line (pdsh, clush, ssh loops)",
}


def render_hostfile(hosts: list[Host], fmt: str) -> str:
    if fmt == "openmpi":
        lines = [f"{h.name} slots={h.slots}" for h in hosts]
    elif fmt == "mpich":
        lines = [f"{h.name}:{h.slots}" for h in hosts]
    elif fmt == "horovod":
        lines = [",".join(f"{h.name}:{h.slots}" for h in hosts)]
    elif fmt == "list":
        lines = [h.name for h in hosts]
    else:
        raise InputError(f"unknown hostfile format '{fmt}'. Use one of {', '.join(FORMATS)}.")
    return "\n".join(lines) + "\n"


def write_atomically(path: str | Path, text: str) -> None:
    """Write a temporary file beside `path`, then rename it over: readers see the old file or the new one."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"'{path}' is a directory; -o needs a file name.")
    if not path.parent.is_dir():
        raise InputError(f"directory '{path.parent}' does not exist; create it first or choose another -o.")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
