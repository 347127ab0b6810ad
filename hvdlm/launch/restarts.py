"""`hvdlm launch --max-restarts N`: after a failure, start the job again from its newest complete checkpoint, at
most N times, with fewer data-parallel replicas when fewer ranks are left (a host gone from the hostfile).

What counts as a failure: any exit but success (0), bad input (2: the same input fails the same way again), a loss
spike that kept coming back (hvdlm.runfiles.SPIKE_EXIT_CODE: it would again) and a stop asked for by a signal
(preemption and Ctrl-C, handled as without restarts: a checkpoint and a clear exit).
The watchdog's exit (hvdlm.runfiles.WATCHDOG_EXIT_CODE) and a rank killed by a signal are failures.
Every restart is a line of RUN_DIR/restarts.jsonl: when, why (the cause and exit code), from which checkpoint
step, on how many ranks.

Shrinking keeps the model's layout (tp x pp ranks per replica) and drops whole replicas; the data sampler's
position is global (hvdlm.data.sampler), so the next sample is the same at any DP size. The global batch
(batch_size x dp x micro-batches) is kept by raising the micro-batches per step (train.accumulation_steps, or with
pipeline stages parallel.microbatches) where the new DP size divides it; otherwise it changes, and the launcher
says how. Job preparation: no torch here.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hvdlm.checkpoint.store import find_checkpoints
from hvdlm.errors import InputError
from hvdlm.runfiles import REQUEUE_EXIT_CODE, SPIKE_EXIT_CODE, WATCHDOG_EXIT_CODE

RESTARTS_FILE = "restarts.jsonl"
ACCUMULATION = "train.accumulation_steps"  # a step's micro-batches; with pipeline stages, parallel.microbatches


@dataclass(frozen=True)
class AttemptSize:
    """One attempt's ranks and micro-batches per step; `note` says what a shrink changed ("" for none)."""

    np: int
    accumulation: int
    note: str = ""


def failure_cause(code: int) -> str | None:
    """Why an attempt that exited `code` failed; None when it did not (success, bad input, preemption) or when a
    restart would fail alike (a loss spike that kept coming back)."""
    if code in (0, 2, REQUEUE_EXIT_CODE, SPIKE_EXIT_CODE):
        return None
    if code == WATCHDOG_EXIT_CODE:
        return "the watchdog ended a rank that made no progress (its report is above)"
    if code > 128 and code - 128 in signal.Signals._value2member_map_:
        name = signal.Signals(code - 128).name
        why = " (out of memory, or killed by hand)" if name == "SIGKILL" else ""
        return f"a rank died of {name}{why}"
    return f"a rank failed (the launcher exited {code})"


def shrunk(launched: AttemptSize, slots: int | None, min_np: int, replica: int, key: str = ACCUMULATION) -> AttemptSize:
    """The size of the next attempt when `slots` ranks can run (None: as many as before). `replica`: the ranks of
    one model replica (parallel.tp x parallel.pp); `key`: the setting that counts a step's micro-batches."""
    if slots is None or slots >= launched.np:
        return AttemptSize(launched.np, launched.accumulation)
    np = slots // replica * replica  # whole replicas only: the tensor- and pipeline-parallel layout is kept
    if np < max(min_np, replica):
        raise InputError(
            f"only {slots} slot(s) are left, fewer than --min-np {min_np} (and whole replicas of {replica} rank(s), "
            f"parallel.tp x parallel.pp), so the job cannot continue. Add hosts to the hostfile and resume with "
            "--resume auto."
        )
    dp_before, dp = launched.np // replica, np // replica
    replicas_x_steps = dp_before * launched.accumulation
    if replicas_x_steps % dp == 0:
        accumulation = replicas_x_steps // dp
        note = (
            f"{dp} replica(s) instead of {dp_before}: the global batch is kept, with {key} "
            f"{launched.accumulation} -> {accumulation}"
        )
    else:
        accumulation = launched.accumulation
        note = (
            f"{dp} replica(s) instead of {dp_before}: {dp} does not divide {replicas_x_steps} (replicas x "
            f"micro-batches), so the global batch changes from {replicas_x_steps} to "
            f"{dp * accumulation} x train.batch_size sequences (the learning rate schedule is unchanged)"
        )
    return AttemptSize(np, accumulation, note)


def newest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint, 0 for none (a restart then starts from the beginning)."""
    found = find_checkpoints(run_dir)
    return found[0].step if found else 0


@dataclass
class RestartPolicy:
    max_restarts: int
    min_np: int  # the fewest ranks worth continuing with
    replica: int  # parallel.tp x parallel.pp: ranks go and come in whole replicas
    key: str = ACCUMULATION  # the setting a shrink raises to keep the global batch


def run_with_restarts(
    attempt: Callable[[AttemptSize, bool], tuple[int, int | None]],
    first: AttemptSize,
    run_dir: Path,
    policy: RestartPolicy,
    slots: Callable[[], int | None],
    say: Callable[[str], None],
) -> tuple[int, int | None]:
    """Run attempts until one does not fail or the restarts are spent; returns the last (exit code, stop signal).

    `attempt(size, resume)` runs the launcher once; `slots()` says how many ranks can run now (None: unknown,
    as many as before)."""
    size, restarts = first, 0
    while True:
        code, signum = attempt(size, restarts > 0)
        cause = failure_cause(code)
        if signum is not None or cause is None:
            return code, signum
        if restarts == policy.max_restarts:
            say(
                f"hvdlm launch: the run failed again: {cause}. It was restarted {restarts} time(s), the most "
                f"--max-restarts {policy.max_restarts} allows, so the job ends here (exit {code}). The restarts and "
                f"their causes are in {run_dir / RESTARTS_FILE}; fix the cause, then continue with --resume auto."
            )
            return code, None
        restarts += 1
        size = shrunk(first, slots(), policy.min_np, policy.replica, policy.key)
        step = newest_step(run_dir)
        record = {
            "restart": restarts,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cause": cause,
            "exit_code": code,
            "from_step": step,
            "np": size.np,
            policy.key.split(".")[1]: size.accumulation,
        }
        _append(run_dir / RESTARTS_FILE, record)
        say(
            f"hvdlm launch: {cause}; restart {restarts} of {policy.max_restarts} from the checkpoint of step {step} "
            f"on {size.np} rank(s)" + (f" ({size.note})" if size.note else "")
        )


def _append(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:  # the restart goes on: the log is a record, not a condition
        print(f"hvdlm launch: cannot record the restart in {path}: {e.strerror or e}", flush=True)
