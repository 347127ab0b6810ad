"""Running the launcher under `hvdlm launch`: Ctrl-C, `kill`, a closed terminal end in a checkpoint, and no rank
outlives its launcher.

The launcher (mpirun, horovodrun, srun) runs in a session of its own, so a Ctrl-C at the terminal reaches
`hvdlm launch` alone and not every process at once (mpirun would kill the ranks before they could save). The
first SIGINT, SIGTERM or SIGHUP is handed on to the ranks: they agree on a step, write its checkpoint and exit,
saying why (hvdlm.training.preemption: "interrupted" after Ctrl-C or a closed terminal, "preempted" after TERM).
A second one ends the launcher's whole process group at once (SIGKILL). If `hvdlm launch` itself is killed outright, the
kernel sends the launcher SIGTERM (PR_SET_PDEATHSIG), on which mpirun, horovodrun and srun end their ranks.

How it reaches the ranks, as in the batch scripts of `hvdlm sbatch`: mpirun would turn a TERM into killing the
job, and horovodrun dies on USR1, so under those two the signal goes straight to this machine's ranks (the ranks
of other nodes stop at the same step: the ranks agree on it). Where none runs on this machine (all on other
nodes, or none started yet), mpirun gets SIGUSR1, which Open MPI's forwards to every rank, and horovodrun the
signal itself, on which it ends without a checkpoint (it forwards nothing; waiting for hosts, it has no worker).
srun gets SIGUSR1, what Slurm's preemption sends, and forwards it to every task on every node (its own INT only
reports the tasks' state).

horovodrun ends a job whose worker exited non-zero by raising a Python exception, so its every such end, a stop
signal's checkpoint and exit included, prints a traceback and exits 1. Its standard error is copied through
`hvdlm launch`, which drops that last traceback and keeps the worker's exit code instead (what mpirun exits with),
for hvdlm.launch.job to say in one line what happened.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, NamedTuple

HANDED_ON = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# horovodrun's ends when a worker failed (horovod/runner/gloo_run.py, mpi_run.py), each naming an exit code.
_TRACEBACK = b"Traceback (most recent call last):\n"
_WORKER_LINE = re.compile(rb"\[\d+\]<std(out|err)>:")  # what horovodrun puts before its workers' lines
_PIECES = re.compile(rb"(?<=[\r\n])")  # after each line's end, or a progress bar's carriage return
_WORKER_FAILED = re.compile(
    r"^RuntimeError: (?:Horovod detected that one or more processes exited with non-zero status[^\n]*\n"
    r"Process name: [^\n]*\nExit code: |mpirun failed with exit code )(-?\d+)$",
    re.M,
)


class Ended(NamedTuple):
    """How the launcher ended."""

    code: int  # its exit code; horovodrun's is that of the first worker that failed, when it names one
    signum: int | None  # the first stop signal `hvdlm launch` got
    worker_failed: bool = False  # horovodrun ended the job because a worker failed (its traceback held back)


def run_supervised(argv: list[str], env: dict[str, str], launcher: str) -> Ended:
    """Run the launcher to its end."""
    sys.stderr.flush()
    pipe = subprocess.PIPE if launcher == "horovodrun" else None
    proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_end_with_parent, stderr=pipe)
    errors = HorovodrunErrors(proc.stderr) if proc.stderr else None
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        received.append(signum)
        if len(received) > 1:
            _signal_group(proc.pid, signal.SIGKILL)
            return
        name = signal.Signals(signum).name
        targets = [proc.pid] if launcher == "srun" else rank_pids(proc.pid)
        if targets:
            _say(f"{name}: asking the ranks to write a checkpoint and stop (press Ctrl-C again to end them at once)")
            _send(targets, signal.SIGUSR1 if launcher == "srun" else signum)
        elif launcher == "mpirun":  # every rank on other nodes: Open MPI's mpirun forwards USR1 to each
            _say(f"{name}: asking the ranks, through mpirun, to write a checkpoint and stop (Ctrl-C again: at once)")
            _send([proc.pid], signal.SIGUSR1)
        else:  # horovodrun waiting for hosts, or with workers elsewhere only: nothing else would stop
            _say(f"{name}: no rank runs on this machine, none can write a checkpoint: ending the launcher")
            _send([proc.pid], signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in HANDED_ON}
    try:
        code = proc.wait()  # PEP 475: the wait resumes after each handler
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        _signal_group(proc.pid, signal.SIGKILL)  # nothing of the job may outlive the launcher
    worker = errors.end() if errors else None
    signum = received[0] if received else None
    return Ended(code, signum) if worker is None or code != 1 else Ended(worker, signum, worker_failed=True)


class HorovodrunErrors:
    """horovodrun's standard error, copied to ours as it comes (a line, or a progress bar's update ending in a
    carriage return, at a time), but for the traceback it ends with when a worker failed: that is held back,
    dropped, and the worker's exit code kept (`worker_code`). Any other traceback of its own is shown whole."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.worker_code: int | None = None
        self._held: list[bytes] = []
        self._thread = threading.Thread(target=self._copy, args=(stream.fileno(),), daemon=True)
        self._thread.start()

    def end(self, timeout: float = 10) -> int | None:
        """The failed worker's exit code, once horovodrun's output has ended (None: no worker failed)."""
        self._thread.join(timeout)
        return self.worker_code

    def _copy(self, fd: int) -> None:
        pending = b""
        while chunk := os.read(fd, 65536):
            *pieces, pending = _PIECES.split(pending + chunk)
            for piece in pieces:
                self._take(piece)
        self._take(pending)
        found = _WORKER_FAILED.search(b"".join(self._held).decode(errors="replace"))
        if found:
            code = int(found[1])
            self.worker_code = 128 - code if code < 0 else code  # -N: killed by signal N, as a shell says 128 + N
        else:
            _write(b"".join(self._held))

    def _take(self, piece: bytes) -> None:
        if self._held and _WORKER_LINE.match(piece):  # a worker speaks after it: not horovodrun's end
            _write(b"".join(self._held))
            self._held = []
        if self._held or piece == _TRACEBACK:
            self._held.append(piece)
        else:
            _write(piece)


def _write(data: bytes) -> None:
    err = sys.stderr
    if hasattr(err, "buffer"):
        err.buffer.write(data)
        err.buffer.flush()
    else:  # a text stream in place of the real one (an embedding program's)
        err.write(data.decode(errors="replace"))
        err.flush()


def _say(line: str) -> None:
    print(f"\nhvdlm launch: {line}", file=sys.stderr, flush=True)


def _send(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:  # already gone
            pass


def rank_pids(root: int) -> list[int]:
    """The descendants of `root` whose argv is `PYTHON -m hvdlm train ...` (not the `sh -c` that horovodrun
    wraps them in: a shell dies on USR1)."""
    parents, ranks = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        pid = int(entry.name)
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the command name is the ppid
        if argv[1:4] == [b"-m", b"hvdlm", b"train"]:
            ranks.add(pid)
    found = []
    for pid in ranks:
        ancestor = pid
        while ancestor in parents and ancestor != root:
            ancestor = parents[ancestor]
        if ancestor == root:
            found.append(pid)
    return sorted(found)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group has ended
        pass


def _end_with_parent() -> None:
    """In the launcher's process, before it runs: SIGTERM when `hvdlm launch` dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: no such guard
        pass
