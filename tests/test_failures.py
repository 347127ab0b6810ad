"""Failures with real ranks and real signals: the watchdog ends a job with a stopped rank and names it, `hvdlm launch
--max-restarts` restarts a job with a killed rank from its newest checkpoint (bit-identical from there), gives up
after its budget, and continues on fewer replicas when the hostfile lost slots (the global batch kept).

Each run is started by the real `hvdlm launch` (mpirun, 2 ranks); ranks are found by the heartbeat files the
watchdog writes (RUN_DIR/heartbeats/rank-N.json, which hold their pids) and signalled as a scheduler or a failing
node would.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_JOB, assert_imports_nothing_heavy, cli_env, hvdlm_argv, metrics, run_cli, sets, summary
from survive import saved

from hvdlm.data.dataset import TokenSplit
from hvdlm.data.sampler import WindowSampler
from hvdlm.errors import InputError
from hvdlm.launch.elastic import discovery_script
from hvdlm.launch.hosts import Host
from hvdlm.launch.restarts import RESTARTS_FILE, AttemptSize, failure_cause, shrunk
from hvdlm.runfiles import WATCHDOG_EXIT_CODE, WORKERS_LOST_EXIT_CODE

pytestmark = pytest.mark.distributed

STEPS, EVERY = 30, 10
JOB = (
    TINY_JOB.replace("max_steps = 8", f"max_steps = {STEPS}")
    .replace("eval_interval = 4", "eval_interval = 0")
    .replace("sample_tokens = 16", f"sample_tokens = 0\ncheckpoint_interval = {EVERY}\nkeep_checkpoints = 0")
)
# What must be equal in a metrics row of a restarted run and of the uninterrupted one (the rest is timing).
SAME = ("step", "loss", "lr", "grad_norm", "tokens")


class Launched:
    """`hvdlm launch JOB --np 2 ARGS --run-dir RUN_DIR` in its own session, its output in a file."""

    def __init__(self, job: Path, run_dir: Path, cache: Path, *args: str):
        self.run_dir, self.log = run_dir, run_dir.with_suffix(".out")
        argv = hvdlm_argv("launch", job, "--np", "2", *args, "--run-dir", run_dir)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=cli_env(cache), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    @property
    def out(self) -> str:
        return self.log.read_text()

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if max(logged_steps(self.run_dir), default=0) >= step:
                return
            time.sleep(0.02)
        self.end()
        raise AssertionError(f"no step {step} within {timeout} s:\n{self.out[-3000:]}")

    def wait_for_checkpoint(self, step: int, timeout: float = 120) -> None:
        """Until the save of `step` is complete (its manifest is written last): an asynchronous save is put in place
        a step or more after its own (train.async_checkpoint), and a rank killed before that restarts from the one
        before."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if saved(self.run_dir, step):
                return
            time.sleep(0.02)
        self.end()
        raise AssertionError(f"no complete checkpoint of step {step} within {timeout} s:\n{self.out[-3000:]}")

    def rank_pid(self, rank: int, other_than: int | None = None, at_step: int = 0, timeout: float = 120) -> int:
        """The pid in rank `rank`'s heartbeat (one that is not `other_than`: a new attempt's), once it reports
        step `at_step` or later."""
        path = self.run_dir / "heartbeats" / f"rank-{rank}.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                beat = json.loads(path.read_text())
                if beat["pid"] != other_than and (beat["step"] or 0) >= at_step:
                    return beat["pid"]
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.end()
        raise AssertionError(f"no heartbeat of rank {rank}:\n{self.out[-3000:]}")

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.end()
            raise AssertionError(f"still running after {timeout} s:\n{self.out[-3000:]}") from None

    def end(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def logged_steps(run_dir: Path) -> list[int]:
    """Steps of the training rows written so far (complete lines only)."""
    path = run_dir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [row["step"] for row in map(json.loads, text.split("\n")[:-1]) if "loss" in row]


def restarts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / RESTARTS_FILE).read_text().splitlines()]


def rows_after(run_dir: Path, step: int) -> list[dict]:
    return [{k: row[k] for k in SAME} for row in metrics(run_dir) if "loss" in row and row["step"] > step]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("job") / "fail.toml"
    path.write_text(JOB)
    return path


@pytest.fixture(scope="module")
def uninterrupted(job, cache_dir, tmp_path_factory) -> Path:
    """The reference: the job on 2 ranks (2 replicas), never interrupted."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    r = run_cli("launch", job, "--np", "2", "--run-dir", run_dir, cache=cache_dir)
    assert r.code == 0, r.out[-3000:]
    return run_dir


@pytest.mark.parametrize("tp", [1, 2])
def test_a_stopped_rank_ends_the_job_and_is_named(job, cache_dir, tmp_path, tp):
    """SIGSTOP on rank 1 at a random step: rank 0 waits in a collective (Horovod's allreduce with tp 1, mpi4py's
    tensor-parallel allreduce with tp 2), its watchdog names rank 1 and shows its stack, and the job ends."""
    watchdog_s = 3
    # No checkpoints: at a checkpoint step rank 0 would wait in the save's agreement (Horovod's allgather) instead.
    args = sets(
        f"train.watchdog_s={watchdog_s}", f"parallel.tp={tp}", "train.max_steps=100000", "train.checkpoint_interval=0"
    )
    if tp == 2:  # no per-step loss allreduce (Horovod's): between steps, the TP collectives are rank 0's only wait
        args += sets("train.log_interval=100000")
    run = Launched(job, tmp_path / "run", cache_dir, *args)
    step = random.randint(2, 12)
    stopped = run.rank_pid(1, at_step=step)
    os.kill(stopped, signal.SIGSTOP)
    started = time.monotonic()
    try:
        code = run.finish(timeout=watchdog_s + 30)
    finally:
        for sig in (signal.SIGKILL, signal.SIGCONT):  # in case the launcher left it
            try:
                os.kill(stopped, sig)
            except ProcessLookupError:
                pass
    took, out = time.monotonic() - started, run.out
    assert code == WATCHDOG_EXIT_CODE, f"stopped after step {step}, exit {code}:\n{out[-4000:]}"
    assert took < watchdog_s + 30
    assert "hvdlm watchdog: rank 0 " in out and "made no progress" in out, out[-4000:]
    assert "hvdlm watchdog: rank 1 is not running" in out and "the stalled rank(s): 1." in out, out[-4000:]
    report = out[out.index("Python stacks of rank 0") :]
    assert 'File "' in report and "hvdlm/training/trainer.py" in report, report[:4000]
    # Where rank 0 waits: inside Horovod (tp 1), inside the sharded layers' mpi4py collective (tp 2).
    assert ("horovod/torch/mpi_ops.py" if tp == 1 else "hvdlm/parallel/collectives.py") in report, report[:4000]


def test_a_killed_rank_restarts_from_the_checkpoint_bit_identical(job, cache_dir, tmp_path, uninterrupted):
    run = Launched(job, tmp_path / "run", cache_dir, "--max-restarts", "1", "--set", "train.watchdog_s=30")
    step, rank_1 = random.randint(EVERY + 1, 2 * EVERY - 2), run.rank_pid(1)  # the pid first: the kill is then at once
    run.wait_for_step(step)
    run.wait_for_checkpoint(EVERY)
    os.kill(rank_1, signal.SIGKILL)
    code = run.finish()
    assert code == 0, f"killed after step {step}:\n{run.out[-4000:]}"
    [record] = restarts(run.run_dir)
    assert record["cause"].startswith("a rank died of SIGKILL") and record["exit_code"] == 128 + signal.SIGKILL
    assert record["from_step"] in (EVERY, 2 * EVERY) and record["np"] == 2 and record["accumulation_steps"] == 1
    assert "restart 1 of 1 from the checkpoint of step" in run.out
    assert logged_steps(run.run_dir) == list(range(1, STEPS + 1))  # every step once
    assert rows_after(run.run_dir, record["from_step"]) == rows_after(uninterrupted, record["from_step"])
    assert summary(run.run_dir)["replicas_identical"]


def test_a_rank_that_always_dies_ends_the_job_after_the_restart_budget(job, cache_dir, tmp_path):
    run = Launched(job, tmp_path / "run", cache_dir, "--max-restarts", "1", "--set", "train.max_steps=100000")
    first = run.rank_pid(1)
    os.kill(first, signal.SIGKILL)
    os.kill(run.rank_pid(1, other_than=first), signal.SIGKILL)  # the restarted attempt's
    code = run.finish()
    assert code == 128 + signal.SIGKILL, run.out[-4000:]
    assert "It was restarted 1 time(s), the most --max-restarts 1 allows, so the job ends here" in run.out
    assert [r["restart"] for r in restarts(run.run_dir)] == [1]


def test_fewer_slots_at_a_restart_continue_with_fewer_replicas_and_the_same_batch(
    job, cache_dir, tmp_path, uninterrupted
):
    """2 replicas, then the hostfile keeps 1 slot and rank 1 dies: 1 replica continues with 2 micro-batches per
    step, i.e. the same samples per step, and matches a 1-replica run resumed from the same checkpoint."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    args = ("--hostfile", hostfile, "--max-restarts", "1", "--min-np", "1")
    run = Launched(job, tmp_path / "run", cache_dir, *args)
    step, rank_1 = random.randint(EVERY + 1, 2 * EVERY - 2), run.rank_pid(1)
    run.wait_for_step(step)
    run.wait_for_checkpoint(EVERY)
    hostfile.write_text("localhost slots=1\n")
    os.kill(rank_1, signal.SIGKILL)
    assert run.finish() == 0, run.out[-4000:]
    [record] = restarts(run.run_dir)
    assert (record["np"], record["accumulation_steps"]) == (1, 2), record
    assert "1 replica(s) instead of 2: the global batch is kept" in run.out
    assert logged_steps(run.run_dir) == list(range(1, STEPS + 1))
    assert summary(run.run_dir)["dp"] == 1
    start = record["from_step"]
    checkpoint = run.run_dir / "checkpoints" / f"step-{start:07d}.pt"
    alone = run_cli(
        *("train", job, "--run-dir", tmp_path / "alone", "--resume", checkpoint),
        *("--set", "train.accumulation_steps=2"),
        cache=cache_dir,
    )
    assert alone.code == 0, alone.out[-3000:]
    shrunk, reference, two = (rows_after(d, start) for d in (run.run_dir, tmp_path / "alone", uninterrupted))
    assert [r["tokens"] for r in shrunk] == [r["tokens"] for r in two]  # the same tokens per step
    for ours, theirs in ((shrunk, reference), (shrunk, two)):
        worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs, strict=True))
        assert worst <= 1e-5, (worst, ours, theirs)


def test_elastic_drops_a_killed_worker_and_finishes_on_the_others(job, cache_dir, tmp_path):
    """3 workers (localhost:2, 127.0.0.1:1) under `hvdlm launch --elastic`; the one on 127.0.0.1 is killed at a
    random step: the other 2 restore the last commit and finish, every step logged once, replicas identical, and
    the data position at the end counts every sample of the global order once (3 x batch per step up to the
    commit, 2 x batch after it)."""
    steps, commit = 60, 5
    args = ("--elastic", "--np", "3", "--min-np", "2", "--hosts", "localhost:2,127.0.0.1:1")
    run = Launched(
        job, tmp_path / "run", cache_dir, *args, *sets(f"train.max_steps={steps}", f"train.commit_interval={commit}")
    )
    step = random.randint(commit + 1, steps // 2)
    run.wait_for_step(step)
    victim = next(pid for pid in (run.rank_pid(r) for r in range(3)) if worker_host(pid) == "127.0.0.1")
    os.kill(victim, signal.SIGKILL)
    assert run.finish() == 0, run.out[-4000:]
    m = re.search(r"elastic: 2 worker\(s\) now; going on from the commit of step (\d+)", run.out)
    assert m and int(m[1]) % commit == 0 and int(m[1]) >= step - commit, run.out[-4000:]
    assert logged_steps(run.run_dir) == list(range(1, steps + 1))
    s = summary(run.run_dir)
    assert s["ranks"] == 2 and s["replicas_identical"], s
    data = torch.load(run.run_dir / "checkpoints" / f"step-{steps:07d}.pt", weights_only=True)["data"]
    consumed = data["epoch"] * data["samples_per_epoch"] + data["position"]
    assert consumed == 4 * (3 * int(m[1]) + 2 * (steps - int(m[1]))), data  # batch_size 4
    assert metrics(run.run_dir)[-1]["tokens"] == consumed * 32  # seq_len 32


def test_elastic_on_this_machine_alone_needs_no_nic(job, cache_dir, tmp_path):
    """Without --nic, horovodrun's elastic driver compares two hosts' interfaces, and waits ten minutes for a second
    host with no worker started: on this machine alone hvdlm gives it the loopback interface."""
    run = Launched(job, tmp_path / "run", cache_dir, "--elastic", "--min-np", "1", *sets("train.max_steps=3"))
    assert run.finish(timeout=90) == 0, run.out[-4000:]
    assert "--network-interface lo" in run.out
    assert logged_steps(run.run_dir) == [1, 2, 3]


def test_a_signal_before_any_elastic_worker_started_ends_the_launch(job, cache_dir, tmp_path):
    """horovodrun waits for slots with no worker started (the hostfile lost one as the job started): SIGTERM has
    no rank to ask for a checkpoint, so it ends the launcher, and `hvdlm launch` says how to continue."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    run = Launched(job, tmp_path / "run", cache_dir, "--elastic", "--min-np", "1", "--hostfile", hostfile)
    script = run.run_dir / "discover_hosts.sh"
    deadline = time.monotonic() + 60
    while not script.exists() and time.monotonic() < deadline:  # written just before horovodrun starts
        time.sleep(0.01)
    hostfile.write_text("localhost slots=1\n")  # before horovodrun's first look: it waits for 2 slots
    time.sleep(5)
    if workers_of(run.run_dir):
        run.end()
        raise AssertionError(f"workers started:\n{run.out[-4000:]}")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=30) == 128 + signal.SIGTERM, run.out[-4000:]
    assert "SIGTERM: no rank runs on this machine, none can write a checkpoint: ending the launcher" in run.out
    assert "stopped by SIGTERM; continue with: hvdlm launch" in run.out and "Traceback" not in run.out, run.out


def test_elastic_on_one_host_says_a_worker_death_ends_it_and_ends_in_one_line(job, cache_dir, tmp_path):
    """horovodrun blacklists the whole host of a failed worker and stops when no host is left: with one host a
    killed worker ends the job. `hvdlm launch` says so before it starts, and ends with its own line and exit code
    instead of horovodrun's traceback."""
    args = ("--elastic", "--min-np", "1", *sets("train.max_steps=100000"))
    run = Launched(job, tmp_path / "run", cache_dir, *args)
    run.wait_for_step(2)
    os.kill(max(workers_of(run.run_dir)), signal.SIGKILL)
    code, out = run.finish(timeout=60), run.out
    assert code == WORKERS_LOST_EXIT_CODE, out[-4000:]
    note = out.index("hvdlm launch: --elastic with one host (localhost): horovodrun drops the whole host of a failed")
    assert note < out.index("horovodrun -np 2"), out[:2000]  # said before it starts
    assert "Traceback" not in out and "RuntimeError" not in out, out[-4000:]
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("hvdlm launch: the elastic job has no worker left: a rank died of SIGKILL"), out[-4000:]
    assert f"continue with: hvdlm launch {job} --run-dir {run.run_dir} --resume auto" in last, last


def test_a_signal_to_an_elastic_launch_checkpoints_and_ends_cleanly(job, cache_dir, tmp_path):
    run = Launched(job, tmp_path / "run", cache_dir, "--elastic", *sets("train.max_steps=100000"))
    run.wait_for_step(3)
    run.proc.send_signal(signal.SIGTERM)
    code, out = run.finish(timeout=60), run.out
    assert code == 128 + signal.SIGTERM, out[-4000:]
    m = re.search(r"preempted at step (\d+) \(SIGTERM\): checkpoint written", out)
    assert m and (run.run_dir / "checkpoints" / f"step-{int(m[1]):07d}.pt").exists(), out[-4000:]
    assert "Traceback" not in out and "RuntimeError" not in out, out[-4000:]
    assert out.rstrip().endswith(
        f"stopped by SIGTERM; continue with: hvdlm launch {job} --run-dir {run.run_dir} --resume auto"
    )


# A stand-in for horovodrun's output: a worker's progress bar (a carriage return, no newline), then its end.
FAKE_HOROVODRUN = """
import sys, time
sys.stderr.write("[0]<stderr>:train 1/9\\r"); sys.stderr.flush()
time.sleep(float(sys.argv[1]))
print("Traceback (most recent call last):\\n  File 'horovodrun', line 8", file=sys.stderr)
print("RUNTIME_ERROR", file=sys.stderr)
sys.exit(1)
"""


@pytest.mark.parametrize(
    "error,code,shown",
    [
        (
            "RuntimeError: Horovod detected that one or more processes exited with non-zero status, thus causing the "
            "job to be terminated. The first process to do so was:\\nProcess name: localhost[1]\\nExit code: -9",
            137,
            False,
        ),
        ("RuntimeError: mpirun failed with exit code 124", 124, False),
        ("RuntimeError: could not connect to some hosts via ssh", 1, True),
    ],
)
def test_horovodruns_traceback_at_a_failed_worker_becomes_its_exit_code(tmp_path, error, code, shown):
    """What run_supervised makes of horovodrun's standard error: a progress bar's update passes at once; the
    traceback of a failed worker is dropped and that worker's exit code kept; any other traceback is shown."""
    script = tmp_path / "horovodrun.py"
    script.write_text(FAKE_HOROVODRUN.replace("RUNTIME_ERROR", error))
    supervise = (
        "import sys; from hvdlm.launch.supervise import run_supervised; "
        f"end = run_supervised([sys.executable, {str(script)!r}, '3'], dict(__import__('os').environ), 'horovodrun'); "
        "print(end.code, end.worker_failed)"
    )
    proc = subprocess.Popen([sys.executable, "-c", supervise], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.monotonic()
    assert proc.stderr.read(len(b"[0]<stderr>:train 1/9\r")) == b"[0]<stderr>:train 1/9\r"
    assert time.monotonic() - started < 2.5, "the progress bar waited for the launcher's end"
    out, err = proc.communicate(timeout=30)
    assert out.decode().split() == [str(code), str(not shown)], (out, err)
    assert (b"Traceback" in err) == shown and (error.split("\\n")[0].encode() in err) == shown, err


def workers_of(run_dir: Path) -> list[int]:
    """The pids of the `hvdlm train` processes of the run in `run_dir`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and argv[1:4] == [b"-m", b"hvdlm", b"train"] and str(run_dir).encode() in argv:
            found.append(int(entry.name))
    return found


def test_the_sampler_takes_every_sample_once_across_a_resize():
    """What the elastic workers do with their samplers: 3 ranks to a commit, steps lost after it, then 2 ranks
    from the commit's state: the samples of the kept steps are one epoch, each sample once."""
    batch, committed, lost, after = 2, 4, 3, 6
    split = TokenSplit((np.arange(batch * (3 * committed + 2 * after) * 8 + 1) % 256,), ())
    samplers = [WindowSampler(split, 8, batch, r, 3, seed=5) for r in range(3)]
    kept = [s.take() for _ in range(committed) for s in samplers]
    state = samplers[0].state_dict()
    for _ in range(lost):  # taken, trained on, and undone by the restore
        [s.take() for s in samplers]
    samplers = [WindowSampler(split, 8, batch, r, 2, seed=5) for r in range(2)]
    for s in samplers:
        s.load_state_dict(state)
    kept += [s.take() for _ in range(after) for s in samplers]
    ids = np.concatenate(kept)
    assert sorted(ids.tolist()) == list(range(samplers[0].samples_per_epoch))


def worker_host(pid: int) -> str:
    """The host horovodrun started a worker for (its HOROVOD_HOSTNAME)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"HOROVOD_HOSTNAME="))


def test_the_layout_of_a_restart_on_fewer_slots():
    note = "1 replica(s) instead of 2: the global batch is kept, with train.accumulation_steps 1 -> 2"
    assert shrunk(AttemptSize(2, 1), 1, min_np=1, replica=1) == AttemptSize(1, 2, note)
    assert shrunk(AttemptSize(2, 1), 2, min_np=1, replica=1) == AttemptSize(2, 1)
    assert shrunk(AttemptSize(2, 1), None, 1, 1) == AttemptSize(2, 1)
    assert shrunk(AttemptSize(8, 1), 5, min_np=2, replica=2) == AttemptSize(
        4, 2, shrunk(AttemptSize(8, 1), 5, 2, 2).note
    )  # whole TP groups
    # With pipeline stages a replica is tp x pp ranks, and the micro-batches are parallel.microbatches.
    staged = shrunk(AttemptSize(8, 4), 6, min_np=4, replica=4, key="parallel.microbatches")
    assert (staged.np, staged.accumulation) == (4, 8) and "parallel.microbatches 4 -> 8" in staged.note
    odd = shrunk(AttemptSize(4, 1), 3, min_np=1, replica=1)
    assert (odd.np, odd.accumulation) == (3, 1) and "the global batch changes from 4 to 3" in odd.note
    with pytest.raises(InputError, match="fewer than --min-np 2"):
        shrunk(AttemptSize(4, 1), 1, min_np=2, replica=1)
    assert [failure_cause(code) for code in (0, 2, 75)] == [None, None, None]
    assert "watchdog" in failure_cause(WATCHDOG_EXIT_CODE) and "SIGKILL" in failure_cause(137)
    assert failure_cause(1) == "a rank failed (the launcher exited 1)"


@pytest.mark.parametrize(
    "args,says",
    [
        (["--min-np", "1"], "--min-np is the fewest ranks a restart may continue with"),
        (["--max-restarts", "1", "--min-np", "3", "--np", "2"], "--min-np 3 is more than the 2 ranks"),
        (["--elastic", "--max-restarts", "1"], "Choose one."),
        (["--elastic", "--set", "parallel.tp=2"], "#3501"),
        (["--elastic", "--np", "4", "--set", "parallel.pp=2"], "#3501"),
        (["--elastic", "--set", "train.optimizer=adamw", "--set", "train.zero=1"], "does not support train.zero"),
        (["--elastic", "--set", "train.optimizer=adamw", "--set", "train.zero=3"], "does not support train.zero"),
        (["--elastic", "--launcher", "mpirun"], "--elastic runs horovodrun"),
        (["--elastic", "--np", "3", "--min-np", "4", "--max-np", "4"], "--min-np <= --np <= --max-np"),
        (["--elastic", "--hosts", "node1:2"], "--elastic on the one host node1 needs the network interface"),
    ],
)
def test_restart_and_elastic_options_refuse_what_cannot_work(args, says):
    r = run_cli("launch", "jobs/demo.toml", *args, "--dry-run", timeout=60, split=True)
    assert r.code == 2 and says in r.err and "Traceback" not in r.err, r.err


def test_elastic_dry_run_is_instant_and_names_the_discovery_script(tmp_path):
    r = run_cli(
        "launch",
        "jobs/demo.toml",
        "--elastic",
        "--np",
        "3",
        "--min-np",
        "2",
        "--run-dir",
        tmp_path / "r",
        "--hosts",
        "localhost:2,127.0.0.1:1",
        "--dry-run",
        timeout=60,
        split=True,
    )
    assert r.code == 0, r.err
    assert f"-np 3 --min-np 2 --max-np 3 --host-discovery-script {tmp_path / 'r' / 'discover_hosts.sh'} --gloo" in r.out
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    assert_imports_nothing_heavy(["launch", "jobs/demo.toml", "--elastic", "--dry-run"])
    script = discovery_script([Host("localhost", 2), Host("127.0.0.1", 1)], None)
    assert subprocess.run(["sh", "-c", script], capture_output=True, text=True).stdout == "localhost:2\n127.0.0.1:1\n"
