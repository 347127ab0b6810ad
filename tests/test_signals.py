"""Ctrl-C, kill and a closed terminal, with real signals: a checkpoint and a clear exit, and nothing left running.

Each test starts the real command, waits until it trains, signals it as a person or a scheduler would, and looks
at the exit code, the output, the checkpoints and the processes left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, cli_env, hvdlm_argv, mpirun_argv

from hvdlm.checkpoint.store import find_checkpoints

# Long enough never to finish by itself; steps logged one by one so the test sees training start.
ENDLESS = ["--set", "train.max_steps=100000", "--set", "train.log_interval=1", "--set", "train.eval_interval=0"]
STEP_LINE = re.compile(r"^step +(\d+) \| loss", re.M)


class Running:
    """A command in its own session (so the test's signals reach it alone), its output collected as it runs."""

    def __init__(self, argv: list[str], cache: Path):
        env = cli_env(cache)
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self.out = ""

    def wait_for_steps(self, n: int, timeout: float = 180) -> None:
        """Read output until step n was logged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.out += line
            if (m := STEP_LINE.match(line)) and int(m[1]) >= n:
                return
        self.proc.kill()
        raise AssertionError(f"no step {n} within {timeout} s:\n{self.out[-3000:]}")

    def finish(self, timeout: float = 120) -> int:
        rest, _ = self.proc.communicate(timeout=timeout)
        self.out += rest
        return self.proc.returncode


def training(command: str, job: Path, run_dir: Path, cache: Path, *args: str, steps: int) -> Running:
    """`hvdlm COMMAND JOB ARGS --run-dir RUN_DIR`, training without end, once it has logged step `steps`."""
    run = Running(hvdlm_argv(command, job, *args, "--run-dir", run_dir, *ENDLESS), cache)
    run.wait_for_steps(steps)
    return run


def assert_checkpointed_where_it_stopped(run: Running, run_dir: Path, stop: str) -> None:
    """The output says `stop` ("interrupted at step {step} (SIGINT)", say) and that step's checkpoint was written,
    the run's only one."""
    said = re.escape(f"{stop}: checkpoint written; resume with --resume auto")
    m = re.search(said.replace(re.escape("{step}"), r"(\d+)"), run.out)
    assert m, run.out[-3000:]
    assert [saved.step for saved in find_checkpoints(run_dir)] == [int(m[1])]


def ranks_still_running(run_dir: Path) -> list[str]:
    """Processes whose command line names the run directory (the ranks of its job)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if entry.name.isdigit() and str(run_dir) in cmdline and int(entry.name) != os.getpid():
            found.append(cmdline)
    return found


def test_ctrl_c_on_a_lone_rank_checkpoints_and_exits_130(tiny_job, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run = training("train", tiny_job, run_dir, cache_dir, steps=3)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.out[-3000:]
    assert_checkpointed_where_it_stopped(run, run_dir, "interrupted at step {step} (SIGINT)")
    assert "Traceback" not in run.out and "Aborted!" not in run.out


def test_a_second_ctrl_c_ends_at_once(tiny_job, tmp_path, cache_dir):
    run = training("train", tiny_job, tmp_path / "run", cache_dir, steps=2)
    run.proc.send_signal(signal.SIGINT)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=60) == 130, run.out[-3000:]
    assert "Traceback" not in run.out and "Aborted!" not in run.out


PIPELINE = ("--set", "parallel.pp=2", "--set", "parallel.microbatches=2")  # two stages: the vote spans them


@pytest.mark.distributed
@pytest.mark.parametrize(
    "sig,layout", [(signal.SIGTERM, ()), (signal.SIGINT, ()), (signal.SIGTERM, PIPELINE)], ids=["term", "int", "pp2"]
)
def test_a_signal_to_launch_ends_every_rank_after_a_checkpoint(tiny_job, tmp_path, cache_dir, sig, layout):
    run_dir = tmp_path / "run"
    run = training("launch", tiny_job, run_dir, cache_dir, "--np", "2", *layout, steps=3)
    run.proc.send_signal(sig)
    assert run.finish() == 128 + sig, run.out[-3000:]
    # The ranks get the signal itself: Ctrl-C is an interruption, TERM a preemption.
    how = "interrupted" if sig == signal.SIGINT else "preempted"
    assert_checkpointed_where_it_stopped(run, run_dir, f"{how} at step {{step}} ({signal.Signals(sig).name})")
    assert f"hvdlm launch: {signal.Signals(sig).name}" in run.out
    assert ranks_still_running(run_dir) == []
    assert "Traceback" not in run.out


# A rank `hvdlm launch` does not see (it looks for `hvdlm train` processes below the launcher, on this machine): it
# says when it runs, and stops on USR1 as a preempted rank does.
UNSEEN_RANK = """
import os, pathlib, signal, sys, time
def stop(signum, frame):
    os.write(1, f"rank got {signal.Signals(signum).name}\\n".encode())  # one write: the ranks' lines never interleave
    sys.exit(75)
signal.signal(signal.SIGUSR1, stop)
pathlib.Path(sys.argv[1], os.environ["OMPI_COMM_WORLD_RANK"]).touch()
time.sleep(120)
"""


@pytest.mark.distributed
def test_a_signal_reaches_ranks_on_other_nodes_through_mpirun(tmp_path):
    """Ranks that `hvdlm launch` cannot signal itself (on other nodes) are asked through mpirun, which forwards
    SIGUSR1 to every rank."""
    script = tmp_path / "rank.py"
    script.write_text(UNSEEN_RANK)
    argv, env = mpirun_argv(2, [sys.executable, str(script), str(tmp_path)])
    supervise = (
        "import os; from hvdlm.launch.supervise import run_supervised; "
        f"end = run_supervised({argv!r}, dict(os.environ), 'mpirun'); print('ended', end.code, end.signum)"
    )
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    proc = subprocess.Popen([sys.executable, "-c", supervise], cwd=REPO, env=env, **output)
    deadline = time.monotonic() + 60
    while not ((tmp_path / "0").exists() and (tmp_path / "1").exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert "SIGTERM: asking the ranks, through mpirun, to write a checkpoint and stop" in out, out
    assert out.count("rank got SIGUSR1") == 2 and "ended 75 15" in out, out
