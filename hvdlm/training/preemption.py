"""Preemption: SIGUSR1 or SIGTERM asks the run to stop; the ranks agree on a step, checkpoint it and exit with
REQUEUE_EXIT_CODE (hvdlm.runfiles), which the batch script that `hvdlm sbatch` writes turns into `scontrol
requeue`. SIGINT (Ctrl-C) and SIGHUP (a closed terminal) stop a rank the same way but exit 128 + the signal's
number (130 for Ctrl-C), as a shell expects of an interrupted command; a second SIGINT ends the rank at once.

Slurm sends SIGUSR1 before the time limit when the script asks for it (`#SBATCH --signal=B:USR1@120`; the
script hands it on to the ranks), and SIGTERM at the limit or on `scancel`. A signal may reach some ranks and
not others, or reach them at different steps: each rank sends its flag with every step (an allreduce of one
number, in flight during the step), and all stop after the first step at which any rank had one."""

from __future__ import annotations

import signal
from enum import IntEnum

from hvdlm.runfiles import REQUEUE_EXIT_CODE, StoppedAtCheckpoint

# Signals that ask for a checkpoint and a requeue; the others that stop a rank end it as interrupted.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STOP_SIGNALS = (*REQUEUE_SIGNALS, signal.SIGINT, signal.SIGHUP)

_received: int | None = None  # the stop signal this process got, if any


def catch_stop_signals() -> None:
    """From now on the stop signals ask for a checkpoint and a stop instead of killing the process.

    Called first thing in a rank's program: a signal that came while the data or the model were still loading
    would otherwise kill the rank (Python's default for TERM, USR1 and HUP) and with it the chance to requeue.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)


def _on_signal(signum, frame) -> None:
    # Only a flag: the training loop stops at the next step every rank agrees on, never inside a signal handler.
    global _received
    if signum == signal.SIGINT and _received == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: the person does not want to wait for the checkpoint
    if _received is None or _received in REQUEUE_SIGNALS:  # Ctrl-C after a preemption signal: still interrupted
        _received = signum


def stop_exit_code() -> int:
    """The exit code of a rank that stopped with a checkpoint: REQUEUE_EXIT_CODE when this rank got a requeue
    signal or none (another rank did), 128 + the signal for an interrupt (130 for Ctrl-C)."""
    if _received is None or _received in REQUEUE_SIGNALS:
        return REQUEUE_EXIT_CODE
    return 128 + int(_received)


def received_signal() -> str | None:
    """The name of the stop signal this process received (SIGTERM, ...), None if none (another rank got one)."""
    return signal.Signals(_received).name if _received else None


class Stop(IntEnum):
    """Why the ranks stop early; the vote keeps the largest, so the more serious reason wins."""

    NO = 0
    PREEMPTED = 1  # SIGUSR1 / SIGTERM: checkpoint, exit REQUEUE_EXIT_CODE
    # A loss spike (hvdlm.training.rollback): back to a checkpoint from before it. Above PREEMPTED, so that a run
    # preempted mid-spike rolls back first and checkpoints the healthy state (the signal still stops it after).
    SPIKE = 2
    NON_FINITE = 3  # too many non-finite steps in a row: exit 2 with advice
    WRITE_FAILED = 4  # rank 0 could not write the run's metrics (a full disk): exit 2, naming the file


class Preempted(StoppedAtCheckpoint):
    """Raised after the checkpoint of the agreed stop step is on disk; the CLI exits with `exit_code`, that of the
    signal this rank received (stop_exit_code)."""

    def __init__(self) -> None:
        super().__init__(stop_exit_code())


class StopVote:
    """Each step every rank contributes its reason to stop (0: none); all learn the largest one.

    The vote is an allreduce (max) of one number over the job (hvdlm.parallel.jobwide), started before the step's
    forward pass and read after the optimizer step, so it travels with the step's own traffic and adds no wait of
    its own. Every rank reads the same result at the same step, so all of them stop after the same step.
    """

    def __init__(self, world_size: int):
        import torch

        catch_stop_signals()  # normally done already, as the rank's program started
        self.world_size = world_size
        self.local = Stop.NO
        self._buffer = torch.zeros(1, dtype=torch.int32)
        self._pending = None

    @property
    def signal_name(self) -> str | None:
        return received_signal()

    def start(self) -> None:
        """Send this rank's reason for the coming step."""
        reason = max(self.local, Stop.PREEMPTED if _received else Stop.NO)
        self._buffer.fill_(int(reason))
        if self.world_size > 1:
            from hvdlm.parallel.jobwide import PendingMax

            # In flight while the step computes; the max over all ranks (of every TP, DP and pipeline group).
            self._pending = PendingMax(self._buffer, "hvdlm.stop_vote")

    def result(self) -> Stop:
        """The largest reason any rank sent with this step."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        return Stop(int(self._buffer.item()))
