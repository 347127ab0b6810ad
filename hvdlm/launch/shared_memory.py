"""Whether ranks on this machine may read each other's memory: Linux cross-memory attach (CMA,
process_vm_readv), which Open MPI's shared-memory transport (the vader BTL) uses for every message above its eager
limit unless told `btl_vader_single_copy_mechanism none`.

With it, a large message is one copy, made by the receiver straight from the sender's memory, and a send posted
before the sender goes back to computing (the interleaved pipeline's forward output, hvdlm.parallel.p2p) reaches
the neighbour as soon as the neighbour waits for it. Without it, the message travels in fragments through a shared
buffer that the sender must keep filling from inside MPI: a posted send then waits for the sender's next MPI call
(measured here: a 1 MB message posted before a 1 s sleep arrived after 1.0 s without it, after 1 ms with it).

Containers often forbid it (a seccomp profile, or Yama's ptrace_scope above 0 between sibling processes), and Open
MPI then fails at the first large message ("Read using Linux CMA failed") instead of falling back, so the launcher
asks this probe rather than guessing: the probe reads a forked child's memory the way one rank reads another's.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

_YAMA = Path("/proc/sys/kernel/yama/ptrace_scope")
_MARK = b"hvdlm-cma"


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


@functools.lru_cache(maxsize=1)
def single_copy_works() -> bool:
    """Whether a process here may read a sibling process's memory (answered once per process)."""
    if not sys.platform.startswith("linux") or _yama_blocks_siblings():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        readv = libc.process_vm_readv
    except (OSError, AttributeError):
        return False
    readv.restype = ctypes.c_ssize_t
    source = ctypes.create_string_buffer(_MARK)
    ready, release = os.pipe()
    try:
        pid = os.fork()
    except OSError:  # no process to spare: say no, and the launcher keeps to the copy that always works
        os.close(ready)
        os.close(release)
        return False
    if pid == 0:  # the child only waits to be read, then leaves without running the parent's cleanup
        try:
            os.read(ready, 1)
        finally:
            os._exit(0)
    try:
        target = ctypes.create_string_buffer(len(_MARK))
        here = _IoVec(ctypes.addressof(target), len(_MARK))
        there = _IoVec(ctypes.addressof(source), len(_MARK))  # the same address in the forked child
        copied = readv(pid, ctypes.byref(here), 1, ctypes.byref(there), 1, 0)
        return copied == len(_MARK) and target.raw == _MARK
    finally:
        os.write(release, b"x")
        os.close(ready)
        os.close(release)
        os.waitpid(pid, 0)


def _yama_blocks_siblings() -> bool:
    """Yama's ptrace_scope 1 lets a process read only its descendants (ranks are siblings); 2 and 3, no one."""
    try:
        return int(_YAMA.read_text().strip()) > 0
    except (OSError, ValueError):
        return False  # no Yama: the ordinary same-user permission applies
