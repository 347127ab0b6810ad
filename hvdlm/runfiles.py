"""What a run leaves behind and how its ranks end: the run directory's file names and the exit codes.

Torch-free, below everything (standard library, hvdlm.errors and nothing else), so that what reads a run from
outside (hvdlm.watch, hvdlm.checkpoint), what starts one (hvdlm.launch, the CLI) and the rank's own program
(hvdlm.training) share one definition of each name without importing the training code. A run directory holds:

    config.toml      the resolved configuration, rewritten by every attempt (CONFIG_FILE)
    metrics.jsonl    one JSON object per logged step; evaluation rows carry "val_loss" (METRICS_FILE)
    summary.json     written when the run finishes (SUMMARY_FILE)
    checkpoints/     the saves (CHECKPOINT_DIR; their names: hvdlm.checkpoint.store)
    tensorboard/     TensorBoard's event files, with train.tensorboard (TENSORBOARD_DIR)
    heartbeats/      the watchdog's rank-N.json, one per rank (HEARTBEAT_DIR; hvdlm.training.watchdog)

The exit codes a launcher, a batch script and `hvdlm launch --max-restarts` act on: 0 done, 2 bad input
(hvdlm.errors.InputError.exit_code), REQUEUE_EXIT_CODE, WATCHDOG_EXIT_CODE, and 128 + the signal of a rank stopped
by an interrupt (INTERRUPTED_EXIT_CODE for Ctrl-C); `hvdlm launch --elastic` adds WORKERS_LOST_EXIT_CODE.
"""

from __future__ import annotations

from pathlib import Path

from hvdlm.errors import InputError

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

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
HEARTBEAT_DIR = "heartbeats"


class StoppedAtCheckpoint(Exception):
    """A run stopped on request (a preemption signal, Ctrl-C) after the checkpoint of the step its ranks agreed on
    is on disk; the CLI exits with `exit_code` (REQUEUE_EXIT_CODE, or 128 + the interrupting signal).

    hvdlm.training.preemption.Preempted raises it with the code of the signal the rank received; the CLI catches it
    here, so that it needs nothing of the training code to turn it into an exit code."""

    def __init__(self, exit_code: int = REQUEUE_EXIT_CODE) -> None:
        super().__init__()
        self.exit_code = exit_code


def refuse_to_overwrite(run_dir: Path) -> None:
    """A new run never writes over an old one: metrics.jsonl marks a run directory that holds a run."""
    if (Path(run_dir) / METRICS_FILE).exists():
        raise InputError(
            f"run directory '{run_dir}' already holds a run (metrics.jsonl). Continue it with --resume auto, pass "
            "a new --run-dir, or remove the old run if you no longer need it; hvdlm never writes over a run."
        )
