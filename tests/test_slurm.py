"""A real Slurm on this machine: `hvdlm sbatch --submit` scripts train 2 ranks with srun, mpirun and horovodrun,
and, preempted with USR1, requeue themselves and resume.

munged, slurmctld and slurmd run from a temporary directory for this module (tests/slurm_cluster.py); Debian's
packages are installed first when they are missing and we are root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
from helpers import TINY_JOB, Result, metrics, run_cli, summary

from hvdlm.launch.sbatch import SbatchSpec, render

pytestmark = pytest.mark.distributed
LAUNCHERS = ("srun", "mpirun", "horovodrun")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.ensure_installed(slurm_cluster.CLUSTER_TOOLS)
    if reason:
        pytest.skip(f"cannot run a Slurm here: {reason}")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm runs its daemons as root (SlurmUser=root); not root here")
    cluster = slurm_cluster.start_cluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def jobs(cluster, cache_dir, tmp_path_factory):
    """Submit one job per launcher up front (Slurm runs them one after another on the 2 cores)."""
    work = tmp_path_factory.mktemp("slurm-jobs")
    job = work / "tiny.toml"
    job.write_text(TINY_JOB)
    submitted = {}
    for launcher in LAUNCHERS:
        script, run_dir = work / f"{launcher}.sbatch", work / f"run-{launcher}"
        proc = _submit(job, launcher, run_dir, script, cluster.env, cache_dir)
        assert proc.code == 0, proc.out + proc.err
        m = re.fullmatch(r"submitted batch job (\d+)\n", proc.out)
        assert m, proc.out
        submitted[launcher] = (m.group(1), run_dir, script)
    return work, submitted


def _submit(job: Path, launcher: str, run_dir: Path, script: Path, env: dict, cache: Path, *extra: str) -> Result:
    """`hvdlm sbatch JOB ... --submit`: 2 ranks on the one node, submitted from the job file's directory (where the
    job's output file goes)."""
    return run_cli(
        *("sbatch", job, "--nodes", "1", "--gpus-per-node", "0", "--time", "00:05:00", "--launcher", launcher),
        *("--run-dir", run_dir, "-o", script, *extra, "--submit"),
        cache=cache,
        env=env,
        cwd=job.parent,
        timeout=60,
        split=True,
    )


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sbatch_script_trains_two_ranks(cluster, jobs, launcher):
    work, submitted = jobs
    job_id, run_dir, script = submitted[launcher]
    state = cluster.wait(job_id, timeout=300)
    output = work / f"tiny-{job_id}.out"  # the script's --output=%x-%j.out, in the submission directory
    log = output.read_text() if output.exists() else "(no job output)"
    assert state == "COMPLETED", f"{launcher} job {job_id}: {state}\n{log}\n{cluster.logs()}"
    s = summary(run_dir)
    assert s["ranks"] == 2, log
    assert s["replica_checksums"][0] == s["replica_checksums"][1]
    assert s["final_val_loss"] < s["first_val_loss"]
    assert [row["step"] for row in metrics(run_dir) if "loss" in row] == list(range(1, 9))
    assert "validation loss:" in log
    # The script that ran is the one hvdlm wrote: its launch line names the launcher.
    assert any(line.startswith(launcher) for line in script.read_text().splitlines())


def test_hostfile_inside_a_job_reads_the_allocation(cluster, tmp_path):
    proc = cluster.run(
        "sbatch",
        "--parsable",
        "--ntasks=2",
        f"--chdir={tmp_path}",
        "--output=hosts.out",
        f"--wrap={sys.executable} -m hvdlm hostfile --from slurm && {sys.executable} -m hvdlm hostfile --from slurm "
        "--format horovod",
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    assert cluster.wait(job_id, timeout=120) == "COMPLETED", (tmp_path / "hosts.out").read_text()
    assert (tmp_path / "hosts.out").read_text() == f"{cluster.node} slots=2\n{cluster.node}:2\n"


def test_submit_reports_sbatchs_refusal(cluster, tmp_path):
    """--submit to a partition that does not exist: sbatch's own reason, exit 2, and the written script kept."""
    script = tmp_path / "s.sbatch"
    args = "sbatch jobs/demo.toml --partition nosuch -o".split()
    proc = run_cli(*args, script, "--submit", env=cluster.env, timeout=60, split=True)
    assert proc.code == 2, proc.out + proc.err
    assert "sbatch refused the script" in proc.err and "partition" in proc.err.lower()
    assert "Traceback" not in proc.err
    assert "#SBATCH --partition=nosuch" in script.read_text()


def test_sbatch_prepare_script_prepares_on_two_ranks(cluster, tmp_path):
    """`hvdlm sbatch JOB --prepare ARGS --submit`: srun starts 2 ranks that prepare the job's data.dataset, the same
    bytes as one process on this machine."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = [json.dumps({"text": f"record {i}: " + "words of a document " * (5 + i % 20)}) for i in range(300)]
    (corpus / "a.jsonl").write_text("\n".join(records) + "\n")
    (corpus / "b.txt").write_text("a text file of its own\n" * 30)
    job = tmp_path / "prep.toml"
    job.write_text(f'[data]\ndataset = "{tmp_path / "ds"}"\n')
    proc = run_cli(
        *("sbatch", job, "--prepare", f"{corpus} --unit-mb 0.005", "--nodes", "1", "--ntasks-per-node", "2"),
        *("--cpus-per-task", "1", "--time", "00:05:00", "-o", tmp_path / "prep.sbatch", "--submit"),
        env=cluster.env,
        cwd=tmp_path,
        timeout=60,
        split=True,
    )
    assert proc.code == 0, proc.out + proc.err
    job_id = re.fullmatch(r"submitted batch job (\d+)\n", proc.out).group(1)
    state = cluster.wait(job_id, timeout=300)
    output = tmp_path / f"prep-prepare-{job_id}.out"
    log = output.read_text() if output.exists() else "(no job output)"
    assert state == "COMPLETED", f"{state}\n{log}\n{cluster.logs()}"
    assert "spread     2 rank(s) x 1 worker(s)" in log, log
    local = run_cli("data", "prepare", corpus, "--out", tmp_path / "local", "--workers", "1", timeout=120)
    assert local.code == 0, local.out
    files = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "local").iterdir()) and "meta.json" in files
    for name in files:
        assert (tmp_path / "ds" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


# Preemption and requeue: the batch script hands Slurm's USR1 on to the ranks and requeues the job when they exit
# with hvdlm.runfiles.REQUEUE_EXIT_CODE. `scancel --batch` signals the batch shell only, as
# --signal=B:USR1@120 does before the time limit.
PREEMPT_LAUNCHERS = ("srun", "mpirun", "horovodrun")
STAND_IN = '''"""Stand-in for `python -m hvdlm train JOB --run-dir D --resume auto` (found first on PYTHONPATH):
waits for USR1, writes a "checkpoint" and exits 75; a start that finds the checkpoint exits 0. Anything but `train`
runs hvdlm."""
import os, pathlib, runpy, signal, sys, time
here = pathlib.Path(__file__).resolve().parent.parent
sys.path = [p for p in sys.path if pathlib.Path(p or ".").resolve() != here]  # any other command: the real hvdlm
if sys.argv[1:2] != ["train"]:
    sys.modules.pop("hvdlm", None)
    runpy.run_module("hvdlm", run_name="__main__", alter_sys=True)
    sys.exit(0)
args = sys.argv[2:]
assert args[args.index("--resume") + 1] == "auto", args
run = pathlib.Path(args[args.index("--run-dir") + 1])
# mpirun keeps the batch's SLURM_PROCID, so the launchers' own variables come first
env = os.environ
rank = env.get("HOROVOD_RANK") or env.get("OMPI_COMM_WORLD_RANK") or env.get("SLURM_PROCID") or "?"
run.mkdir(parents=True, exist_ok=True)
with open(run / "starts.txt", "a") as f:
    f.write(f"rank {rank} restart {os.environ.get('SLURM_RESTART_COUNT', '-')}\\n")
if (run / f"checkpoint.{rank}").exists():
    print(f"rank {rank}: resumed", flush=True)
    sys.exit(0)
stop = []
signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
(run / f"ready.{rank}").touch()
deadline = time.monotonic() + 120
while not stop and time.monotonic() < deadline:
    time.sleep(0.05)
(run / f"checkpoint.{rank}").touch()
print(f"rank {rank}: preempted", flush=True)
# Like the trainer, leave only together: mpirun kills the other ranks once one exits non-zero.
while len(list(run.glob("checkpoint.*"))) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
sys.exit(75 if stop else 1)
'''


def _wait_until(ready, timeout: float, what: str, cluster, job_id: str, output: Path, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline or cluster.job_state(job_id) not in ("PENDING", "RUNNING", "CONFIGURING"):
            cluster.run("scancel", job_id)
            log = output.read_text() if output.exists() else "(no job output)"
            pytest.fail(f"no {what}; job {job_id} {cluster.job_state(job_id)}\n{log}\n{cluster.logs()}")
        time.sleep(every)


def _job_field(cluster, job_id: str, name: str) -> str:
    for word in cluster.run("scontrol", "show", "job", job_id).stdout.split():
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return ""


# scancel's target: the batch shell (--batch, as --signal=B:USR1@120 does), or by default the job steps, which
# reaches srun's ranks directly (mpirun's and horovodrun's ranks are no job steps).
@pytest.mark.parametrize("launcher,to", [*((launcher, "--batch") for launcher in PREEMPT_LAUNCHERS), ("srun", "")])
def test_preempted_script_requeues_the_job(cluster, tmp_path, launcher, to):
    """A stand-in program behind the generated script, on the real Slurm: USR1 reaches both ranks, they exit 75,
    the script requeues the job, and the requeued start (SLURM_RESTART_COUNT=1, same job id and so the same run
    directory) finishes; the output file keeps both starts."""
    stand_in = tmp_path / "stand-in" / "hvdlm"
    stand_in.mkdir(parents=True)
    (stand_in / "__main__.py").write_text(STAND_IN)
    (stand_in / "__init__.py").write_text("")
    run_dir, script = tmp_path / "run", tmp_path / "job.sbatch"
    spec = SbatchSpec(
        job_name="standin",
        job_file=str(tmp_path / "job.toml"),
        nodes=1,
        gpus_per_node=0,
        ntasks_per_node=2,
        cpus_per_task=1,
        time="00:05:00",
        launcher=launcher,
        venv=sys.prefix,
        run_dir=str(run_dir),
    )
    script.write_text(render(spec))
    env = {**cluster.env, "PYTHONPATH": str(stand_in.parent)}
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={tmp_path}", str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    output = tmp_path / f"standin-{job_id}.out"
    _wait_until(lambda: len(list(run_dir.glob("ready.*"))) == 2, 90, "2 ready ranks", cluster, job_id, output)
    started = time.monotonic()
    assert cluster.run("scancel", *([to] if to else []), "--signal=USR1", job_id).returncode == 0
    _wait_until(lambda: _job_field(cluster, job_id, "Restarts") == "1", 30, "requeue", cluster, job_id, output)
    requeued = time.monotonic()
    after_requeue = {k: _job_field(cluster, job_id, k) for k in ("JobState", "Reason", "EligibleTime", "SubmitTime")}
    state = cluster.wait(job_id, timeout=120)
    output = output.read_text()
    assert state == "COMPLETED", f"{state}\n{output}\n{cluster.logs()}"
    print(
        f"{launcher}: requeued {requeued - started:.1f} s after USR1, completed {time.monotonic() - requeued:.1f} "
        f"s later (cred_expire={slurm_cluster.REQUEUE_DELAY_S}); after the requeue {after_requeue}, "
        f"started again {_job_field(cluster, job_id, 'StartTime')}; "
        f"{next(line for line in output.splitlines() if 'requeueing' in line)}"
    )
    starts = sorted((run_dir / "starts.txt").read_text().splitlines())
    assert starts == ["rank 0 restart -", "rank 0 restart 1", "rank 1 restart -", "rank 1 restart 1"], output
    assert "rank 0: preempted" in output and "rank 1: preempted" in output, output
    assert f"requeueing job {job_id}," in output, output
    assert "rank 0: resumed" in output and "rank 1: resumed" in output, output  # --open-mode=append kept both


# About 30 steps a second here: long enough a run that the signal lands mid-run.
MAX_STEPS = 300
PREEMPT_JOB = TINY_JOB.replace("max_steps = 8", f"max_steps = {MAX_STEPS}").replace(
    "eval_interval = 4", "eval_interval = 100"
)


def _logged_steps(metrics: Path) -> list[int]:
    """Steps of the training rows, complete lines only (rank 0 may be writing the last one)."""
    text = metrics.read_text() if metrics.exists() else ""
    rows = [json.loads(line) for line in text.split("\n")[:-1]]
    return [row["step"] for row in rows if "loss" in row]


# The real trainer under srun and mpirun; horovodrun's part (its ranks' 75 reported as 1, which the script counts as
# preempted) is the batch script's, checked with the stand-in above at a fraction of the suite's time.
@pytest.mark.parametrize("launcher", ("srun", "mpirun"))
def test_preempted_training_resumes_after_requeue(cluster, cache_dir, tmp_path, launcher):
    """The real trainer: USR1 mid-run, a checkpoint, exit 75, requeue, `--resume auto`, steps 1..max_steps once."""
    job, run_dir, script = tmp_path / "tiny.toml", tmp_path / "run", tmp_path / "tiny.sbatch"
    job.write_text(PREEMPT_JOB)
    proc = _submit(job, launcher, run_dir, script, cluster.env, cache_dir, "--set", "train.checkpoint_interval=20")
    assert proc.code == 0, proc.out + proc.err
    job_id = re.fullmatch(r"submitted batch job (\d+)\n", proc.out).group(1)
    metrics, output = run_dir / "metrics.jsonl", tmp_path / f"tiny-{job_id}.out"
    _wait_until(lambda: len(_logged_steps(metrics)) >= 3, 120, "3 logged steps", cluster, job_id, output, every=0.1)
    assert cluster.run("scancel", "--batch", "--signal=USR1", job_id).returncode == 0
    state = cluster.wait(job_id, timeout=180)
    log = output.read_text()
    assert state == "COMPLETED", f"{state}\n{log}\n{cluster.logs()}"
    assert _job_field(cluster, job_id, "Restarts") == "1", log
    m = re.search(r"preempted at step (\d+) .*: checkpoint written", log)  # "(SIGUSR1)" between
    assert m and 3 <= int(m.group(1)) < MAX_STEPS, log
    first, _, second = log.partition(f"requeueing job {job_id},")
    # horovodrun (Gloo) reports the ranks' 75 as 1; the script counts that as preempted after the signal it forwarded.
    assert second and f"(exit status {1 if launcher == 'horovodrun' else 75})" in first, log
    assert re.search(r"resum", second, re.IGNORECASE), log  # the requeued start says it resumes
    assert _logged_steps(metrics) == list(range(1, MAX_STEPS + 1)), log
    assert summary(run_dir)["ranks"] == 2


def test_a_killed_rank_is_requeued_by_max_restarts_and_completes(cluster, cache_dir, tmp_path):
    """slurm.max_restarts = 1: a rank killed (SIGKILL) inside the batch job fails the run, the script requeues the
    job once, and the requeued start resumes from the newest checkpoint to the end, every step logged once."""
    job, run_dir, script = tmp_path / "tiny.toml", tmp_path / "run", tmp_path / "tiny.sbatch"
    steps = 100
    job.write_text(PREEMPT_JOB.replace(f"max_steps = {MAX_STEPS}", f"max_steps = {steps}"))
    sets = ("--set", "train.checkpoint_interval=20", "--set", "slurm.max_restarts=1")
    proc = _submit(job, "mpirun", run_dir, script, cluster.env, cache_dir, *sets)
    assert proc.code == 0, proc.out + proc.err
    job_id = re.fullmatch(r"submitted batch job (\d+)\n", proc.out).group(1)
    metrics, output = run_dir / "metrics.jsonl", tmp_path / f"tiny-{job_id}.out"
    heartbeat = run_dir / "heartbeats" / "rank-1.json"  # the watchdog's, with the rank's pid
    _wait_until(lambda: heartbeat.exists() and _logged_steps(metrics), 120, "rank 1", cluster, job_id, output, 0.1)
    os.kill(json.loads(heartbeat.read_text())["pid"], 9)
    state = cluster.wait(job_id, timeout=180)
    log = output.read_text()
    assert state == "COMPLETED", f"{state}\n{log}\n{cluster.logs()}"
    assert _job_field(cluster, job_id, "Restarts") == "1", log
    assert f"the run failed (exit status 137): requeueing job {job_id} (restart 1 of 1)" in log, log
    assert [json.loads(line)["restart"] for line in (run_dir / "restarts.jsonl").read_text().splitlines()] == [1]
    assert _logged_steps(metrics) == list(range(1, steps + 1)), log
