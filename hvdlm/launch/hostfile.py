"""Hostfiles in the formats launchers read, and writing them without ever leaving half a file behind."""

from __future__ import annotations

import os
from pathlib import Path

from hvdlm.errors import InputError
from hvdlm.fsutil import atomic_write
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


def write_atomically(path: str | Path, text: str) -> Path:
    """Write an -o output with hvdlm.fsutil.atomic_write (readers see the old file or the new one; a symbolic link
    is followed: its target is replaced and the link stays), with errors that name the path. Returns the file
    actually written.
    """
    path = Path(os.path.realpath(path))
    if path.is_dir():
        raise InputError(f"'{path}' is a directory; -o needs a file name.")
    if not path.parent.is_dir():
        raise InputError(f"directory '{path.parent}' does not exist; create it first or choose another -o.")
    try:
        return atomic_write(path, text)
    except OSError as e:
        # Permission denied, a read-only or full file system, /proc: the old file is untouched (only the
        # temporary file was written), so say where and why.
        raise InputError(f"cannot write '{path}': {e.strerror or e}. Choose another -o.") from None
