"""How a run ended, written down where `hvdlm runs` reads it: RUN_DIR/status.json (its format: hvdlm.runfiles).

Rank 0 writes a RUNNING record as soon as the run directory is prepared (and again after an elastic reset, when
rank 0 may be another process), and an end record as the rank's program ends, whatever ends it: finished,
stopped at a checkpoint by a signal, bad input (exit 2), an exception. The watchdog, which ends its process from
a thread, writes its own end record first (`record_end`, from any rank: the rank that waits is often not rank 0).

The exit code and cause of each ending are those the CLI gives the same exception (hvdlm.cli's group), so the
record and the process's exit status agree.
"""

from __future__ import annotations

from pathlib import Path

from hvdlm.checkpoint.store import find_checkpoints
from hvdlm.errors import InputError
from hvdlm.runfiles import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    INTERRUPTED_EXIT_CODE,
    PREEMPTED,
    REQUEUE_EXIT_CODE,
    RUNNING,
    StoppedAtCheckpoint,
    read_status,
    status_record,
    write_status,
)
from hvdlm.training.preemption import received_signal

_CAUSE_CHARS = 2000  # an exception's message is kept whole up to this (one paragraph; a traceback is not wanted)


def how_it_ended(error: BaseException | None) -> tuple[str, int, str | None]:
    """(state, exit code, cause) of a rank's program that ended with `error` (None: it returned)."""
    if error is None:
        return FINISHED, 0, None
    if isinstance(error, StoppedAtCheckpoint):
        state = PREEMPTED if error.exit_code == REQUEUE_EXIT_CODE else INTERRUPTED
        cause = f"{state} ({received_signal() or 'a signal to another rank'}); the checkpoint of its step is written"
        return state, error.exit_code, cause
    if isinstance(error, InputError):
        return FAILED, error.exit_code, str(error)
    if isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: ended at once, without a checkpoint
        return INTERRUPTED, INTERRUPTED_EXIT_CODE, "interrupted at once (a second Ctrl-C), without a checkpoint"
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
        return (FINISHED if code == 0 else FAILED), code, None if code == 0 else f"exited with code {code}"
    # Python's own exit status for an uncaught exception; the traceback itself is on the rank's stderr.
    return FAILED, 1, f"{type(error).__name__}: {error}"[:_CAUSE_CHARS]


def newest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest complete checkpoint in the run directory (None: none)."""
    try:
        saves = find_checkpoints(run_dir)
    except OSError:
        return None
    return saves[0].step if saves else None


def record_end(run_dir: Path, state: str, step: int | None, exit_code: int, cause: str | None) -> bool:
    """Write how the run ended, after `step` complete steps, with its newest checkpoint; False when another rank
    already wrote how this attempt ended (the watchdog, which saw the cause first: rank 0 then fails only because
    it did), or when it cannot be written."""
    current = read_status(run_dir)
    if current is not None and current["state"] != RUNNING:  # an attempt starts with RUNNING, so this is ours
        return False
    ending = {"exit_code": exit_code, "cause": cause, "checkpoint_step": newest_checkpoint_step(run_dir)}
    return write_status(run_dir, status_record(state, step, **ending))


class RunStatus:
    """Rank 0's status.json for one rank's program: started once the run directory is prepared, ended as the
    program ends. On other ranks (and before the run directory is known) it writes nothing."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.writes = False  # this process is rank 0
        self.step: int | None = None  # the step it started from (or was reset to)

    def start(self, run_dir: Path, rank0: bool, step: int) -> None:
        self.run_dir, self.writes, self.step = Path(run_dir), rank0, step
        if rank0:
            write_status(self.run_dir, status_record(RUNNING, step))

    def end(self, error: BaseException | None, step: int | None) -> None:
        """The run ended with `error` (None: it finished) after `step` complete steps (None: the start's)."""
        if self.run_dir is None or not self.writes:
            return
        state, code, cause = how_it_ended(error)
        record_end(self.run_dir, state, self.step if step is None else step, code, cause)
