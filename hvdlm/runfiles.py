"""What a run leaves behind and how its ranks end: the run directory's file names and the exit codes.

Torch-free, below everything (standard library, hvdlm.errors and hvdlm.fsutil), so that what reads a run from
outside (hvdlm.watch, hvdlm.checkpoint), what starts one (hvdlm.launch, the CLI) and the rank's own program
(hvdlm.training) share one definition of each name without importing the training code. A run directory holds:

    config.toml      the resolved configuration, rewritten by every attempt (CONFIG_FILE)
    metrics.jsonl    one JSON object per logged step; evaluation rows carry "val_loss" (METRICS_FILE)
    summary.json     written when the run finishes (SUMMARY_FILE)
    status.json      rank 0's account: while it runs, its process; when it ended, how (STATUS_FILE; below)
    checkpoints/     the saves (CHECKPOINT_DIR; their names: hvdlm.checkpoint.store), each with its checksum
                     manifest step-N.manifest.json (MANIFEST_SUFFIX; hvdlm.checkpoint.manifest)
    tensorboard/     TensorBoard's event files, with train.tensorboard (TENSORBOARD_DIR)
    heartbeats/      the watchdog's rank-N.json, one per rank (HEARTBEAT_DIR; hvdlm.training.watchdog)

The exit codes a launcher, a batch script and `hvdlm launch --max-restarts` act on: 0 done, 2 bad input
(hvdlm.errors.InputError.exit_code), REQUEUE_EXIT_CODE, WATCHDOG_EXIT_CODE, SPIKE_EXIT_CODE (SpikeRecurred), and
128 + the signal of a rank stopped by an interrupt (INTERRUPTED_EXIT_CODE for Ctrl-C); `hvdlm launch --elastic`
adds WORKERS_LOST_EXIT_CODE.

status.json is how `hvdlm runs` tells a live run from a dead one and a clean stop from a failure without guessing
from file times. Rank 0 writes it (atomically) as the run starts, with state RUNNING and the process that runs
it (pid, host, the process's start time, which tells a reused pid from the same process), and again as the run
ends: FINISHED, PREEMPTED or INTERRUPTED (stopped at the checkpoint of `step`), or FAILED with the exit code and
its cause (bad input, the watchdog, an exception). A run killed outright (SIGKILL, out of memory, a lost node)
writes nothing more: its record still says RUNNING, and the reader finds the process gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from hvdlm.errors import InputError
from hvdlm.fsutil import atomic_write

# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry". A rank stopped by a preemption
# signal exits with it after its checkpoint; the batch script that `hvdlm sbatch` writes requeues the job on it, and
# the requeued job resumes with `--resume auto`.
REQUEUE_EXIT_CODE = 75
# A rank ended by the watchdog (hvdlm.training.watchdog); `hvdlm launch --max-restarts` counts it as a failure. 124
# is what timeout(1) exits with when its command ran out of time.
WATCHDOG_EXIT_CODE = 124
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports of a command stopped by Ctrl-C
# EX_UNAVAILABLE from sysexits.h. `hvdlm launch --elastic` ends with it when horovodrun has no worker left: it
# blacklists the whole host of a failed worker and stops when every host is blacklisted (on one host, at the first
# worker's death). The run's newest checkpoint is intact; `--resume auto` continues it.
WORKERS_LOST_EXIT_CODE = 69
# EX_DATAERR from sysexits.h. With train.spike_rollback, a loss spike that came back after
# train.spike_max_rollbacks rollbacks in a row (or one with no checkpoint from before it to go back to) stops the
# run: going on, or restarting, would spike again. Neither `hvdlm launch --max-restarts` nor slurm.max_restarts
# restarts it; the checkpoints from before the spike are intact.
SPIKE_EXIT_CODE = 65

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
# A save's checksum manifest, `step-0000100.manifest.json` beside its files (hvdlm.checkpoint.manifest).
MANIFEST_SUFFIX = ".manifest.json"
TENSORBOARD_DIR = "tensorboard"
HEARTBEAT_DIR = "heartbeats"
STATUS_FILE = "status.json"

# status.json's "state": RUNNING from the start, one of the others once the run has ended.
RUNNING, FINISHED, PREEMPTED, INTERRUPTED, FAILED = "running", "finished", "preempted", "interrupted", "failed"


class StoppedAtCheckpoint(Exception):
    """A run stopped on request (a preemption signal, Ctrl-C) after the checkpoint of the step its ranks agreed on
    is on disk; the CLI exits with `exit_code` (REQUEUE_EXIT_CODE, or 128 + the interrupting signal).

    hvdlm.training.preemption.Preempted raises it with the code of the signal the rank received; the CLI catches it
    here, so that it needs nothing of the training code to turn it into an exit code."""

    def __init__(self, exit_code: int = REQUEUE_EXIT_CODE) -> None:
        super().__init__()
        self.exit_code = exit_code


class SpikeRecurred(InputError):
    """A loss spike that train.spike_rollback may no longer roll back: every rank stops, and the CLI prints the
    message as it prints bad input (one paragraph, no traceback) but exits with SPIKE_EXIT_CODE."""

    exit_code = SPIKE_EXIT_CODE


def refuse_to_overwrite(run_dir: Path) -> None:
    """A new run never writes over an old one: metrics.jsonl marks a run directory that holds a run."""
    if (Path(run_dir) / METRICS_FILE).exists():
        raise InputError(
            f"run directory '{run_dir}' already holds a run (metrics.jsonl). Continue it with --resume auto, pass "
            "a new --run-dir, or remove the old run if you no longer need it; hvdlm never writes over a run."
        )


def status_record(state: str, step: int | None, **ending: Any) -> dict[str, Any]:
    """A status.json record of this process: `state` after `step` complete steps, and for an ended run its
    exit_code, cause and checkpoint_step (the newest complete checkpoint)."""
    pid = os.getpid()
    record = {"state": state, "step": step, "exit_code": None, "cause": None, "checkpoint_step": None, **ending}
    record.update(pid=pid, host=socket.gethostname(), process_start=process_start(pid), time=time.time())
    return record


def write_status(run_dir: str | Path, record: dict[str, Any]) -> bool:
    """Replace RUN_DIR/status.json with `record`; False when it cannot be written (a full or read-only disk: the
    record is an account of the run, and must not end it or hide the error that ends it)."""
    try:
        atomic_write(Path(run_dir) / STATUS_FILE, json.dumps(record, indent=2) + "\n")
    except OSError:
        return False
    return True


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """RUN_DIR/status.json, or None when there is none (a run from before it was written) or it is unreadable."""
    try:
        record = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("state"), str) else None


def steps_done(phase: str, step: int | None) -> int | None:
    """The steps complete when a rank announced `phase` of step `step` (the watchdog's beat, a heartbeat, numbered
    as the logs number steps): in its train_step phase a step is still being computed; its log, evaluation and
    checkpoint phases come once it is done."""
    if step is None:
        return None
    return step - 1 if phase == "train_step" else step


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux's /proc/PID/stat, field 22); None where it
    cannot be read (no /proc, or no such process) and for a process that has ended but is not yet reaped (a
    zombie). A pid the system reused belongs to a process with another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after the command name, which may hold spaces and parentheses
    try:
        # Field 3 (the state) is fields[0], so field 22 is fields[19]; "Z": a zombie, "X": dead.
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (IndexError, ValueError):
        return None
