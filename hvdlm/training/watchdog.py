"""The watchdog: a rank whose training makes no progress for train.watchdog_s seconds ends the job, saying which
rank, step and phase, which ranks are behind, and every thread's Python stack.

A hung job (a stuck collective, a dead peer, a stalled file system, a stopped process) otherwise holds its nodes
until the time limit, with no first error to read. How it works:

- The training loop calls `beat(phase, step)` as each phase starts (one tuple assignment: nothing to measure).
- A daemon thread wakes every `tick` seconds. The main thread blocked inside mpi4py or Horovod has released the
  GIL, so the thread runs. When the beat is older than the allowance (train.watchdog_s; setup and the first step
  get train.watchdog_first_s, for data preparation and compilation), it prints its report and ends the process
  with WATCHDOG_EXIT_CODE; the launcher (mpirun, horovodrun, srun) then ends the other ranks within seconds.
- Naming the rank behind: a rank stopped (SIGSTOP), swapped out or dead cannot speak, so the others must say who
  it is. Each rank's thread writes a heartbeat, a small JSON file RUN_DIR/heartbeats/rank-N.json holding its step,
  phase and the wall time, every watchdog_s / 20 seconds (at least each second). A rank whose own watchdog fires
  reads them all: a heartbeat older than a few beats is a rank that no longer runs at all (its thread stopped with
  it); a fresh one at an earlier step is a rank that runs but is stuck elsewhere. The run directory is on a file
  system all nodes share (as checkpoints assume), and a file per rank needs no communication that could itself
  hang.
- Before it ends the process, the firing rank writes how the run ended into RUN_DIR/status.json (exit code 124,
  the step and phase, the newest checkpoint: hvdlm.training.outcome), which `hvdlm runs` reads; the heartbeats
  also tell it whether a run on another node still runs (each holds how often it is written).
- A backstop for a main thread that holds the GIL inside C code (the watchdog thread could then not run):
  faulthandler.dump_traceback_later, re-armed by the thread at every tick, dumps every stack and exits (code 1,
  faulthandler's) WATCHDOG_BACKSTOP_S after the allowance.

Horovod's own stall inspector (which sees only Horovod tensors, not mpi4py) is set to agree: it warns after
min(60, watchdog_s / 2) seconds, naming the ranks that did not submit a tensor, and shuts Horovod down
WATCHDOG_BACKSTOP_S after the watchdog would have ended the rank.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from hvdlm.runfiles import FAILED, HEARTBEAT_DIR, WATCHDOG_EXIT_CODE, process_start, steps_done
from hvdlm.training.outcome import record_end

WATCHDOG_BACKSTOP_S = 30.0
# train.watchdog_s = -1: by device. A GPU step of a large model takes seconds, a CPU step can take a minute.
DEFAULT_WATCHDOG_S = {"cuda": 300.0, "cpu": 900.0}
_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def watchdog_seconds(configured: float, device_type: str) -> float:
    """train.watchdog_s as seconds: -1 picks the device's default, 0 is off."""
    return DEFAULT_WATCHDOG_S.get(device_type, DEFAULT_WATCHDOG_S["cpu"]) if configured < 0 else configured


def configure_stall_inspector(limit_s: float, env=os.environ) -> None:
    """Horovod's stall inspector, consistent with the watchdog (before hvd.init, which reads these; a value the
    user set is kept)."""
    if limit_s <= 0:
        return
    env.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(1, int(min(60.0, limit_s / 2)))))
    env.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(int(limit_s + WATCHDOG_BACKSTOP_S)))


def start_watchdog(t) -> Watchdog:
    """The watchdog of train config `t`, watching from now (the rank's start-up)."""
    import torch

    device = "cuda" if t.device != "cpu" and torch.cuda.is_available() else "cpu"
    limit = watchdog_seconds(t.watchdog_s, device)
    configure_stall_inspector(limit)
    return Watchdog(limit, t.watchdog_first_s)


class Watchdog:
    """One rank's watchdog; `limit_s` <= 0 makes one that only records beats."""

    def __init__(self, limit_s: float, first_limit_s: float):
        self.limit_s, self.first_limit_s = limit_s, max(first_limit_s, limit_s)
        self.rank = int(next((os.environ[v] for v in _RANK_VARIABLES if v in os.environ), "0"))
        self.first_step = 0  # steps up to this one get the first allowance
        self.size, self.attached = 1, 0.0
        self.heartbeats: Path | None = None
        self._beat: tuple[str, int | None, float] = ("setup", None, time.monotonic())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tick = min(1.0, max(0.1, limit_s / 6))
        # Heartbeats every tick for short limits (tests), every limit / 20 for long ones: a thousand ranks writing
        # a file each second would load a parallel file system's metadata server for nothing.
        self.heartbeat_every = max(self.tick, limit_s / 20)
        self._process_start = process_start(os.getpid())  # with the pid in a heartbeat: tells a reused pid apart
        if limit_s > 0:
            self._thread = threading.Thread(target=self._watch, name="hvdlm-watchdog", daemon=True)
            self._thread.start()

    # -- the training loop's side ----------------------------------------------------------------------------

    def beat(self, phase: str, step: int | None) -> None:
        """`phase` of step `step` (numbered as the logs number it) starts now."""
        self._beat = (phase, step, time.monotonic())

    def attach(self, run_dir: Path, rank: int, size: int, first_step: int) -> None:
        """Once the run directory is known: heartbeats go there; the steps after `first_step` + 1 get the
        normal allowance."""
        self.rank, self.size, self.first_step = rank, size, first_step
        self.attached = time.time()  # heartbeats older than this are an earlier attempt's
        if self._thread is not None:
            self.heartbeats = Path(run_dir) / HEARTBEAT_DIR
            self.heartbeats.mkdir(parents=True, exist_ok=True)
            self._write_heartbeat(*self._beat[:2])  # at once: a short run may end before the thread's first tick

    def steps_done(self) -> int | None:
        """The steps complete at the last beat (None: still setting up)."""
        return steps_done(*self._beat[:2])

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            faulthandler.cancel_dump_traceback_later()

    # -- the thread ------------------------------------------------------------------------------------------

    def allowance(self, step: int | None) -> float:
        return self.first_limit_s if step is None or step <= self.first_step + 1 else self.limit_s

    def _watch(self) -> None:
        last, written = time.monotonic(), float("-inf")  # the first heartbeat as soon as the run directory is known
        while not self._stop.wait(self.tick):
            phase, step, since = self._beat
            now = time.monotonic()
            idle, allowance, frozen = now - since, self.allowance(step), now - last
            last = now
            if now - written >= self.heartbeat_every and self._write_heartbeat(phase, step):
                written = now
            if idle > allowance:
                self._fire(phase, step, idle, frozen if frozen > 3 * self.tick + 1 else 0.0)
            # The backstop, should this thread stop running while the process hangs (see the module docstring).
            faulthandler.dump_traceback_later(allowance - idle + WATCHDOG_BACKSTOP_S, exit=True)

    def _write_heartbeat(self, phase: str, step: int | None) -> bool:
        """Write this rank's heartbeat; False when there is nowhere to write it yet."""
        if self.heartbeats is None:
            return False
        beat = {"rank": self.rank, "step": step, "phase": phase, "time": time.time(), "pid": os.getpid()}
        # Who wrote it and how often: `hvdlm runs` asks a process on its own host whether it still runs, and
        # judges the others by the heartbeat's age.
        beat.update(host=socket.gethostname(), process_start=self._process_start, every=self.heartbeat_every)
        path = self.heartbeats / f"rank-{self.rank}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(beat))
            os.replace(tmp, path)
        except OSError:  # a full or stalled file system must not end the watch itself
            pass
        return True

    def _fire(self, phase: str, step: int | None, idle: float, frozen: float) -> None:
        """Report and end the process; `frozen`: seconds this whole process did not run (SIGSTOP), or 0."""
        where = f"step {step}" if step is not None else "start-up"
        lines = [
            f"hvdlm watchdog: rank {self.rank} ({socket.gethostname()}, pid {os.getpid()}) made no progress for "
            f"{idle:.0f} s at {where}, phase {phase} (allowance {self.allowance(step):g} s, train.watchdog_s); "
            f"ending the job with exit code {WATCHDOG_EXIT_CODE}.",
            *(
                [f"hvdlm watchdog: rank {self.rank} itself did not run for {frozen:.0f} s (stopped or frozen)."]
                if frozen
                else self.ranks_behind(step)
            ),
            f"hvdlm watchdog: Python stacks of rank {self.rank}, every thread (the main thread's: where it waits):",
        ]
        try:
            sys.stdout.flush()
            sys.stderr.write("\n".join(lines) + "\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            if self.heartbeats is not None:  # the run directory is known: say how the run ended (after the report,
                # which matters more should the file system be what hangs; the backstop ends a stuck write)
                said = " ".join(line.removeprefix("hvdlm watchdog: ") for line in (lines[0], lines[-2]))
                cause = f"the watchdog: {said}"  # what happened, and which rank stalled
                record_end(self.heartbeats.parent, FAILED, steps_done(phase, step), WATCHDOG_EXIT_CODE, cause)
        finally:
            os._exit(WATCHDOG_EXIT_CODE)

    def ranks_behind(self, step: int | None) -> list[str]:
        """One line per other rank that is not running (stale heartbeat) or at an earlier step than this one."""
        if self.heartbeats is None:
            return ["hvdlm watchdog: no heartbeats yet (the run directory was not set up), so no rank is named."]
        stale_after = max(3 * self.heartbeat_every, self.limit_s / 2)
        now, lines, behind = time.time(), [], []
        for path in sorted(self.heartbeats.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1])):
            try:
                beat = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if beat["rank"] == self.rank or beat["rank"] >= self.size or beat["time"] < self.attached - 60:
                continue  # this rank, or a rank of an earlier attempt with more ranks
            age = now - beat["time"]
            at = f"step {beat['step']}, phase {beat['phase']}, on {beat['host']} (pid {beat['pid']})"
            if age > stale_after:
                behind.append(beat["rank"])
                lines.append(
                    f"hvdlm watchdog: rank {beat['rank']} is not running: its last heartbeat is {age:.1f} s old, at "
                    f"{at}; it is stopped, dead, or its node is unreachable."
                )
            elif step is not None and beat["step"] is not None and beat["step"] < step:
                behind.append(beat["rank"])
                lines.append(f"hvdlm watchdog: rank {beat['rank']} is behind, at {at}.")
        if behind:
            lines.append(f"hvdlm watchdog: the stalled rank(s): {', '.join(map(str, behind))}.")
        else:
            lines.append("hvdlm watchdog: every other rank is alive and at this step: the hang is collective.")
        return lines
