"""Helpers for the tests of runs that survive (test_resume.py, test_numerics.py).

Ranks are real: `hvdlm train` under mpirun, as helpers.mpirun starts them, but also in the background, so a
test can watch metrics.jsonl and then kill the whole job (SIGKILL to mpirun and to every rank: Open MPI puts
each rank in a process group of its own) or signal one rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from helpers import REPO, Result, cli_env, mpirun, mpirun_argv, run_process

from hvdlm.checkpoint.manifest import manifest_path
from hvdlm.checkpoint.store import checkpoint_path

# Compared per metrics.jsonl row between a resumed and an uninterrupted run: everything but the clock.
TIMING_KEYS = {"time", "tokens_per_s", "ms_per_step", "mfu", "memory_mb", "max_allocated_mb"}


def run(np: int, program: list[str], cache: Path, timeout: float = 300) -> Result:
    """Run to the end: under mpirun for np >= 1; np = 0 runs `program` as one plain process (no launcher)."""
    if np == 0:
        return run_process(program, cli_env(cache), timeout=timeout)
    return mpirun(np, program, cache, timeout=timeout)


class Job:
    """An mpirun job in the background, in a session (process group) of its own, its output in a file."""

    def __init__(self, np: int, program: list[str], cache: Path, log: Path):
        argv, env = mpirun_argv(np, program)
        self.np = np
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=cli_env(cache, env), stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def out(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def rank_pids(self, timeout: float = 60) -> dict[int, int]:
        """{rank: pid} of the ranks mpirun started (its children that carry OMPI_COMM_WORLD_RANK)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {}
            for pid in _children(self.proc.pid):
                rank = _environ(pid).get("OMPI_COMM_WORLD_RANK")
                if rank is not None:
                    found[int(rank)] = pid
            if len(found) == self.np:
                return found
            assert self.proc.poll() is None, (
                f"mpirun ended ({self.proc.returncode}) before all ranks showed:\n{self.out}"
            )
            time.sleep(0.05)
        raise AssertionError(f"not all {self.np} ranks of mpirun {self.proc.pid} found in {timeout} s")

    def kill(self) -> list[int]:
        """SIGKILL to mpirun and to each of its ranks; returns the rank pids killed."""
        pids = list(self.rank_pids().values()) if self.proc.poll() is None else []
        # Open MPI puts every rank in a process group of its own, so mpirun's group (its pid: start_new_session)
        # holds mpirun alone: the ranks get their SIGKILL by pid, at the same moment.
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.wait(60)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in pids), f"ranks {pids} outlived SIGKILL"
        return pids


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    # A row being written when we look may be torn: only complete lines count.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in rows(run_dir) if "loss" in r), default=0)


def wait_for_step(job: Job, run_dir: Path, step: int, timeout: float = 180) -> int:
    """Poll metrics.jsonl until a training row with at least `step` shows; returns the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = last_step(run_dir)
        if seen >= step:
            return seen
        assert job.proc.poll() is None, f"the job ended ({job.proc.returncode}) before step {step}:\n{job.out}"
        time.sleep(0.005)
    raise AssertionError(f"no step {step} in {timeout} s:\n{job.out}")


def wait_for_checkpoint(job: Job, run_dir: Path, step: int, timeout: float = 180) -> None:
    """Poll until the save of `step` is complete (its manifest is written last): an asynchronous save
    (train.async_checkpoint) is put in place a step or more after its own."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if saved(run_dir, step):
            return
        assert job.proc.poll() is None, f"the job ended ({job.proc.returncode}) before checkpoint {step}:\n{job.out}"
        time.sleep(0.005)
    raise AssertionError(f"no complete checkpoint of step {step} in {timeout} s:\n{job.out}")


def saved(run_dir: Path, step: int) -> bool:
    """Whether the save of `step` is complete: its manifest is written once every file is in place."""
    return manifest_path(checkpoint_path(run_dir, step)).exists()


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows(run_dir) if "loss" in r}


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the clock-dependent fields."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows(run_dir)]


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """{file name: (sha256 of its bytes, mtime_ns)} of every file in `directory`."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:12]) for p in (run_dir / "checkpoints").glob("step-*.pt"))
