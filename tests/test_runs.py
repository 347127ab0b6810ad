"""`hvdlm runs [DIR]`: run directories and their state, from a real run copied into every state it can be in,
and from real runs ended by real signals, bad input and the watchdog.

One tiny real run is trained once per module; the states of runs from before status.json are that run's files as a
crash, a preemption or a live run leaves them (summary.json, status.json and heartbeats gone, rows after a
checkpoint, modification times moved). The others are real runs, stopped as a scheduler, a person, the OOM killer
or the watchdog stops them, read at once: their state must not wait for their files to age.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, cli_env, hvdlm_argv, sets, train_once

from hvdlm.runfiles import WATCHDOG_EXIT_CODE, process_start
from hvdlm.watch.runs import list_runs, render_table

HOUR_AGO = time.time() - 3600


@pytest.fixture(scope="module")
def trained(tmp_path_factory, job, cache_dir) -> Path:
    """A finished 8-step run with checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("runs-src") / "done"
    settings = ["train.checkpoint_interval=4", "train.sample_tokens=0", "train.tensorboard=false"]
    return train_once(job, run_dir, *settings, cache=cache_dir).run_dir


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _age(run: Path, when: float) -> None:
    for p in [run, *run.rglob("*")]:
        os.utime(p, (when, when))


def _variant(trained: Path, dest: Path, keep_rows_to: int | None = None, drop_steps: tuple[int, ...] = ()) -> Path:
    """A copy of the run as one from before status.json (and heartbeats) left it, without summary.json, its metrics
    cut after step `keep_rows_to`, some checkpoints gone."""
    shutil.copytree(trained, dest)
    for name in ("summary.json", "status.json"):
        (dest / name).unlink()
    shutil.rmtree(dest / "heartbeats")
    if keep_rows_to is not None:
        rows = [r for r in _rows(dest) if r["step"] <= keep_rows_to]
        (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step in drop_steps:
        (dest / "checkpoints" / f"step-{step:07d}.pt").unlink()
    return dest


@pytest.fixture(scope="module")
def runs_dir(trained, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(trained, root / "finished")
    _variant(trained, root / "running", keep_rows_to=6, drop_steps=(8,))  # fresh files: still writing
    # Stopped at its checkpoint of step 4 (a preemption: the agreed step is checkpointed, then the ranks exit).
    _age(_variant(trained, root / "preempted", keep_rows_to=4, drop_steps=(8,)), HOUR_AGO)
    # Logged steps 5..8 after its last checkpoint, then died.
    _age(_variant(trained, root / "crashed", drop_steps=(8,)), HOUR_AGO)
    _age(_variant(trained, root / "no-checkpoint", keep_rows_to=3, drop_steps=(4, 8)), HOUR_AGO)
    # A finished run resumed with more steps, and stopped: its old summary covers 8 of 16.
    grown = root / "grown"
    shutil.copytree(trained, grown)
    config = (grown / "config.toml").read_text()
    (grown / "config.toml").write_text(config.replace("max_steps = 8", "max_steps = 16"))
    _age(grown, HOUR_AGO)
    (root / "notes").mkdir()  # not a run: no config.toml, no metrics.jsonl
    (root / "README.txt").write_text("my runs\n")
    return root


def _by_name(runs) -> dict:
    return {r["name"] if isinstance(r, dict) else r.name: r for r in runs}


def test_states_from_the_files(runs_dir):
    runs = _by_name(list_runs(runs_dir))
    assert sorted(runs) == ["crashed", "finished", "grown", "no-checkpoint", "preempted", "running"]
    states = {name: r.state for name, r in runs.items()}
    assert states == {
        "finished": "finished",
        "running": "running",
        "preempted": "preempted",
        "crashed": "failed",
        "no-checkpoint": "failed",
        "grown": "preempted",  # stopped at its step-8 checkpoint, 8 of 16 steps done
    }
    # The same files an hour later: nothing is running any more.
    later = _by_name(list_runs(runs_dir, now=time.time() + 3600))
    assert later["running"].state == "failed"  # rows up to 6, checkpoint at 4


def test_progress_losses_throughput_and_checkpoint(runs_dir, trained):
    rows = _rows(trained)
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    runs = _by_name(list_runs(runs_dir))
    done = runs["finished"]
    assert (done.step, done.max_steps) == (8, 8)
    assert done.loss == train[-1]["loss"] and done.val_loss == val[-1]["val_loss"]
    assert done.tokens_per_s == train[-1]["tokens_per_s"]
    assert done.checkpoint == str(runs_dir / "finished" / "checkpoints" / "step-0000008.pt")
    preempted = runs["preempted"]
    assert (preempted.step, preempted.checkpoint_step) == (4, 4)
    assert preempted.loss == train[3]["loss"] and preempted.val_loss == val[1]["val_loss"]  # evaluated at 0, 4
    assert runs["grown"].max_steps == 16
    nothing = runs["no-checkpoint"]
    assert nothing.checkpoint is None and nothing.val_loss == val[0]["val_loss"]


def test_the_table_and_json_from_the_command(hvdlm, runs_dir):
    r = hvdlm("runs", str(runs_dir))
    assert r.code == 0, r.out
    lines = r.out.splitlines()
    assert lines[0].split()[:3] == ["RUN", "STATE", "STEP"]
    table = {line.split()[0]: line.split() for line in lines[1:]}
    assert table["finished"][1:3] == ["finished", "8/8"] and "step-0000008.pt" in table["finished"]
    assert table["preempted"][1:3] == ["preempted", "4/8"] and "step-0000004.pt" in table["preempted"]
    assert table["grown"][2] == "8/16"
    r = hvdlm("runs", str(runs_dir), "--json")
    assert r.code == 0, r.out
    runs = _by_name(json.loads(r.out))
    assert runs["crashed"]["state"] == "failed" and runs["crashed"]["checkpoint_step"] == 4
    assert runs["finished"]["max_steps"] == 8 and runs["finished"]["step"] == 8
    # A run directory named itself is listed alone.
    r = hvdlm("runs", str(runs_dir / "finished"), "--json")
    assert [x["name"] for x in json.loads(r.out)] == ["finished"]


def test_the_default_directory_and_bad_input(hvdlm, tmp_path):
    r = hvdlm("runs")  # runs/ of the working directory (the repository root here), which need not exist
    assert r.code in (0, 2) and "Traceback" not in r.out
    r = hvdlm("runs", str(tmp_path / "missing"))
    assert r.code == 2 and "does not exist" in r.out and "Traceback" not in r.out
    (tmp_path / "file").write_text("x")
    r = hvdlm("runs", str(tmp_path / "file"))
    assert r.code == 2 and "is a file" in r.out
    (tmp_path / "empty").mkdir()
    r = hvdlm("runs", str(tmp_path / "empty"))
    assert r.code == 0 and "no runs under" in r.out
    assert hvdlm("runs", str(tmp_path / "empty"), "--json").out.strip() == "[]"


def test_a_damaged_config_and_torn_metrics_are_shown_not_fatal(tmp_path):
    run = tmp_path / "runs" / "odd"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("[train\nmax_steps = ")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5, "tokens_per_s": 10}\n{"step": 2, "lo')
    [info] = list_runs(tmp_path / "runs", now=time.time() + 3600)
    assert (info.step, info.loss, info.max_steps, info.state) == (1, 2.5, None, "failed")
    assert "config.toml unreadable" in info.note
    assert "odd: config.toml unreadable" in render_table([info])


def test_the_last_rows_of_a_long_metrics_file(tmp_path):
    """Read from the end in blocks: the last evaluation row lies many blocks before the last training row."""
    run = tmp_path / "runs" / "long"
    run.mkdir(parents=True)
    rows = [{"step": 0, "val_loss": 9.0}, {"step": 10, "val_loss": 4.25}]
    rows += [{"step": s, "loss": 1000.0 / s, "tokens_per_s": float(s), "pad": "x" * 40} for s in range(11, 20_011)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (run / "metrics.jsonl").stat().st_size > 1_000_000
    [info] = list_runs(tmp_path / "runs")
    assert (info.step, info.loss, info.val_loss, info.tokens_per_s) == (20_010, 1000.0 / 20_010, 4.25, 20_010.0)


def test_runs_never_imports_torch_horovod_mpi4py_or_numpy(runs_dir):
    code = (
        "import sys\n"
        "from hvdlm.cli import main\n"
        "try:\n"
        "    main(['runs', sys.argv[1], '--json'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = sorted({'torch', 'horovod', 'mpi4py', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, f'hvdlm runs imported {heavy}'"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(runs_dir)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- runs that ended for real, read at once ------------------------------------------------------------------------

ENDLESS = ("train.max_steps=100000", "train.eval_interval=0", "train.sample_tokens=0", "train.tensorboard=false")


class Training:
    """`hvdlm train` or `hvdlm launch --np 2` of the tiny job without end, in its own session, its output in a
    file; `until(step)` waits for a logged step, `rank_pid(rank)` reads a rank's pid from its heartbeat."""

    def __init__(self, job: Path, run_dir: Path, cache: Path, *settings: str, ranks: int = 1):
        self.run_dir, self.log = run_dir, run_dir.with_suffix(".out")
        command = ("train",) if ranks == 1 else ("launch", "--np", str(ranks))
        argv = hvdlm_argv(*command, job, "--run-dir", run_dir, *sets(*ENDLESS, *settings))
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=cli_env(cache), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def _wait_for(self, ready, what: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if (found := ready()) is not None:
                return found
            time.sleep(0.02)
        self.end()
        raise AssertionError(f"no {what} within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def until(self, step: int) -> None:
        self._wait_for(lambda: True if (_logged(self.run_dir) or 0) >= step else None, f"step {step}")

    def rank_pid(self, rank: int, at_step: int) -> int:
        def beat():
            try:
                b = json.loads((self.run_dir / "heartbeats" / f"rank-{rank}.json").read_text())
            except (OSError, ValueError):
                return None
            return b["pid"] if (b["step"] or 0) >= at_step else None

        return self._wait_for(beat, f"heartbeat of rank {rank} at step {at_step}")

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.end()
            raise AssertionError(f"still running after {timeout} s:\n{self.log.read_text()[-3000:]}") from None

    def end(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def _logged(run_dir: Path) -> int | None:
    """The last step of a training row written so far (complete lines only)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return max((row["step"] for row in map(json.loads, lines) if "loss" in row), default=None)


def _only(run_dir: Path):
    [info] = list_runs(run_dir)
    return info


@pytest.fixture(scope="module")
def ended(job, cache_dir, tmp_path_factory) -> dict[str, tuple[Training, int]]:
    """Three lone runs, side by side (their start-up is most of their time), each with its exit code:

    killed     SIGKILL after step 4, its checkpoint at 3 (the OOM killer, `kill -9`: nothing can be written)
    preempted  SIGTERM after step 3, no periodic checkpoints (it checkpoints the step where it stops, exits 75)
    bad-input  a learning rate that makes every step non-finite: exit 2 after train.max_skipped_steps
    """
    root = tmp_path_factory.mktemp("ended")
    bad = ("train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0", "train.max_skipped_steps=2")
    runs = {
        # Synchronous saves: the checkpoint of step 3 is in place before step 4 (an asynchronous one lands a few
        # steps later, more on a loaded machine; tests/test_async_checkpoint.py kills runs during one).
        "killed": Training(
            job, root / "killed", cache_dir, "train.checkpoint_interval=3", "train.async_checkpoint=off"
        ),
        "preempted": Training(job, root / "preempted", cache_dir, "train.checkpoint_interval=0"),
        "bad-input": Training(job, root / "bad-input", cache_dir, *bad),
    }
    for name, step, sig in (("killed", 4, signal.SIGKILL), ("preempted", 3, signal.SIGTERM)):
        runs[name].until(step)
        runs[name].proc.send_signal(sig)
    return {name: (run, run.finish()) for name, run in runs.items()}


def test_a_run_killed_outright_is_failed_at_once_not_running(ended):
    """SIGKILL leaves no word: status.json still says running, and the process it names is gone, so the run is
    failed at once, not running for --active-minutes."""
    run, code = ended["killed"]
    assert code == -signal.SIGKILL
    info = _only(run.run_dir)
    assert info.state == "failed", info
    assert info.exit_code is None and f"pid {run.proc.pid}" in info.cause and "is gone" in info.cause, info
    assert info.stopped_step >= 4 and info.checkpoint_step == 3, info
    line = render_table([info]).splitlines()[-1]
    assert line.startswith(f"killed: failed at step {info.stopped_step}: its process (pid {run.proc.pid}"), line
    assert f"--resume auto goes back to its checkpoint of step 3 ({info.stopped_step - 3} step(s) redone)" in line


def test_a_preempted_run_is_preempted_at_once_where_its_checkpoint_is(ended):
    """SIGTERM: the run checkpoints the step where it stops and exits 75; `runs` says preempted at once, at the
    step of its newest checkpoint (the files were written a moment ago: no waiting for them to age)."""
    run, code = ended["preempted"]
    assert code == 75, run.log.read_text()[-3000:]
    info = _only(run.run_dir)
    assert info.state == "preempted", info
    assert info.exit_code == 75 and info.cause.startswith("preempted (SIGTERM)"), info
    assert info.stopped_step == info.checkpoint_step == info.step >= 3, info


def test_bad_input_during_the_run_is_failed_with_exit_2_and_its_message(ended):
    """Too many non-finite steps in a row stop the run with exit 2: `runs` says failed at once, with the code and
    the message the run ended with."""
    run, code = ended["bad-input"]
    assert code == 2, run.log.read_text()[-3000:]
    info = _only(run.run_dir)
    assert info.state == "failed", info
    assert info.exit_code == 2 and "steps in a row had a non-finite loss or gradient norm" in info.cause, info
    assert "(exit 2): 2 steps in a row had a non-finite" in render_table([info])


@pytest.mark.distributed
def test_a_run_the_watchdog_ended_is_failed_with_exit_124_not_preempted(job, cache_dir, tmp_path):
    """Rank 1 stopped (SIGSTOP) a few steps after the checkpoint and log row of step 20: rank 0's watchdog ends the
    job (124) and writes why. Its metrics end at (or one log row past) its newest checkpoint, yet the run got
    further and failed: `runs` says failed, with the exit code, the cause and the step it reached."""
    every = "20"  # the heartbeats, which say when to stop rank 1, lag by up to half a second: a few steps
    # Synchronous saves: each log row's step has its checkpoint in place (an asynchronous save needs every rank's
    # word at a later step, which the stopped rank never gives: the metrics would run far past the newest checkpoint).
    intervals = (f"train.checkpoint_interval={every}", f"train.log_interval={every}", "train.async_checkpoint=off")
    run = Training(job, tmp_path / "run", cache_dir, "train.watchdog_s=3", *intervals, ranks=2)
    stopped = run.rank_pid(1, at_step=24)
    os.kill(stopped, signal.SIGSTOP)
    try:
        assert run.finish(timeout=60) == WATCHDOG_EXIT_CODE, run.log.read_text()[-3000:]
    finally:
        for sig in (signal.SIGKILL, signal.SIGCONT):  # in case the launcher left it
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, sig)
    for now in (time.time() + 3600, None):  # once its files have aged, and at once
        [info] = list_runs(run.run_dir, now=now)
        assert info.state == "failed", (now, info)
        assert info.exit_code == WATCHDOG_EXIT_CODE, info
        assert info.cause.startswith("the watchdog: rank 0 ") and "the stalled rank(s): 1." in info.cause, info
        # The stop lands some steps after the heartbeat of step 24 (how many depends on the machine's load), past
        # the checkpoint of step 20. The metrics end at the newest checkpoint's step, or one log row later where
        # the stop fell between a step's log row and its save (the row is written first; the save needs rank 1).
        assert info.stopped_step >= info.step >= info.checkpoint_step >= 20, info
        assert info.step - info.checkpoint_step in (0, int(every)), info


def test_a_run_on_another_host_is_judged_by_its_heartbeats(tmp_path):
    """A run whose rank 0 runs elsewhere cannot be asked about: a heartbeat fresher than a few of its intervals
    says it runs; a stale one that it is gone (it is not running whatever its files' times)."""
    run = tmp_path / "runs" / "remote"
    (run / "heartbeats").mkdir(parents=True)
    (run / "config.toml").write_text("[train]\nmax_steps = 100\n")
    (run / "metrics.jsonl").write_text('{"step": 7, "loss": 2.0}\n')
    now = time.time()
    record = {"state": "running", "step": 0, "pid": 4242, "host": "node-elsewhere", "process_start": 1, "time": now}
    (run / "status.json").write_text(json.dumps(record))
    beat = {"rank": 0, "step": 9, "phase": "log", "time": now, "pid": 4242, "host": "node-elsewhere", "every": 5.0}
    (run / "heartbeats" / "rank-0.json").write_text(json.dumps(beat))
    assert _only(run).state == "running"
    [later] = list_runs(run, active_seconds=1e9, now=now + 120)  # 120 s > 3 beats of 5 s and the margin
    assert (later.state, later.stopped_step) == ("failed", 9), later
    assert "pid 4242 on node-elsewhere" in later.cause


def test_a_reused_pid_is_not_the_run(tmp_path):
    """status.json names this very process, but as started at another time: the pid was reused, the run is gone."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    here = {"state": "running", "step": 0, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    (run / "status.json").write_text(json.dumps({**here, "process_start": process_start(os.getpid())}))
    assert _only(run).state == "running"
    (run / "status.json").write_text(json.dumps({**here, "process_start": process_start(os.getpid()) - 1}))
    assert _only(run).state == "failed"
