"""Hostfiles in the formats launchers read, and writing -o outputs (hostfiles, batch scripts, configs) without ever
leaving half a file behind or replacing what is not a regular file."""

from __future__ import annotations

import os
import stat
import sys
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


# Paths that name this process's own output streams. Through /proc/self/fd they resolve to whatever the shell
# redirected into, a regular file perhaps, which an atomic rename would replace (and so truncate).
_STANDARD = {
    "/dev/stdout": 1,
    "/dev/fd/1": 1,
    "/proc/self/fd/1": 1,
    "/dev/stderr": 2,
    "/dev/fd/2": 2,
    "/proc/self/fd/2": 2,
}
_LINK_HOPS = 40  # as the kernel's limit on nested symbolic links


def _names_a_descriptor(path: str) -> bool:
    """Whether `path` leads, through symbolic links, to an open file descriptor (/dev/stdout -> /proc/self/fd/1)."""
    current = os.path.abspath(path)
    for _ in range(_LINK_HOPS):
        if not os.path.islink(current):
            return False
        if current.startswith(("/proc/", "/dev/fd/")):
            return True
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
    return False


def output_is_file(path: str) -> bool:
    """Whether write_output(path, ...) writes a regular file by atomic rename (a new one, or one that `sbatch FILE`
    can read again) rather than a stream: '-', /dev/stdout, a FIFO, a character device."""
    if path == "-" or _names_a_descriptor(path):
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True  # a new file, or one the atomic write names with its error


def write_output(path: str, text: str) -> None:
    """Write an -o output, once everything is checked: '-' is standard output; a FIFO, a character device
    (/dev/null, a terminal) or a descriptor (/dev/stdout) is a stream, appended to, never replaced or truncated, so
    what the shell redirected into stays; a regular file or a new path gets the atomic write."""
    if path == "-":
        _echo(sys.stdout, text)
    elif output_is_file(path):
        write_atomically(path, text)
    else:
        _write_stream(path, text)


def _echo(stream, text: str) -> None:
    stream.write(text)
    stream.flush()


def _write_stream(path: str, text: str) -> None:
    """Append to a special file without creating, truncating or replacing it (a FIFO blocks until it is read)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"'{path}' does not exist. Choose another -o.") from None
    except OSError as e:
        raise InputError(f"cannot write '{path}': {e.strerror or e}. Choose another -o.") from None
    if stat.S_ISDIR(mode) or stat.S_ISBLK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a block device"
        raise InputError(
            f"'{path}' is {kind}; -o takes a file, a FIFO, a character device such as /dev/null, or - for stdout."
        )
    sys.stdout.flush()  # what this process printed before comes first
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY)
    except OSError as e:
        if path in _STANDARD:  # a socket behind stdout (a systemd service) cannot be opened again: use it as it is
            _echo(sys.stdout if _STANDARD[path] == 1 else sys.stderr, text)
            return
        raise InputError(f"cannot write '{path}': {e.strerror or e}. Choose another -o.") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise InputError(f"cannot write '{path}': {e.strerror or e}. Choose another -o.") from None
