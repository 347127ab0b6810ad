"""A real Slurm on this machine: `hvdlm sbatch --submit` scripts train 2 ranks with srun, mpirun and horovodrun.

munged, slurmctld and slurmd run from a temporary directory for this module (tests/slurm_cluster.py); Debian's
packages are installed first when they are missing and we are root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import slurm_cluster
from conftest import REPO, TINY_JOB

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
    env = {**cluster.env, "HVDLM_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    submitted = {}
    for launcher in LAUNCHERS:
        script, run_dir = work / f"{launcher}.sbatch", work / f"run-{launcher}"
        proc = subprocess.run(
            [sys.executable, "-m", "hvdlm", "sbatch", str(job), "--nodes", "1", "--gpus-per-node", "0",
             "--time", "00:05:00", "--launcher", launcher, "--run-dir", str(run_dir), "-o", str(script), "--submit"],
            cwd=work, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        m = re.fullmatch(r"submitted batch job (\d+)\n", proc.stdout)
        assert m, proc.stdout
        submitted[launcher] = (m.group(1), run_dir, script)
    return work, submitted


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sbatch_script_trains_two_ranks(cluster, jobs, launcher):
    work, submitted = jobs
    job_id, run_dir, script = submitted[launcher]
    state = cluster.wait(job_id, timeout=300)
    output = work / f"tiny-{job_id}.out"  # the script's --output=%x-%j.out, in the submission directory
    log = output.read_text() if output.exists() else "(no job output)"
    assert state == "COMPLETED", f"{launcher} job {job_id}: {state}\n{log}\n{cluster.logs()}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["ranks"] == 2, log
    assert summary["replica_checksums"][0] == summary["replica_checksums"][1]
    assert summary["final_val_loss"] < summary["first_val_loss"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 9))
    assert "validation loss:" in log
    # The script that ran is the one hvdlm wrote: its launch line names the launcher.
    assert any(line.startswith(launcher) for line in script.read_text().splitlines())


def test_hostfile_inside_a_job_reads_the_allocation(cluster, tmp_path):
    proc = cluster.run(
        "sbatch", "--parsable", "--ntasks=2", f"--chdir={tmp_path}", "--output=hosts.out",
        f"--wrap={sys.executable} -m hvdlm hostfile --from slurm && {sys.executable} -m hvdlm hostfile --from slurm "
        "--format horovod",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    assert cluster.wait(job_id, timeout=120) == "COMPLETED", (tmp_path / "hosts.out").read_text()
    assert (tmp_path / "hosts.out").read_text() == f"{cluster.node} slots=2\n{cluster.node}:2\n"


def test_submit_reports_sbatchs_refusal(cluster, tmp_path):
    """--submit to a partition that does not exist: sbatch's own reason, exit 2, and the written script kept."""
    script = tmp_path / "s.sbatch"
    proc = subprocess.run(
        [sys.executable, "-m", "hvdlm", "sbatch", "jobs/demo.toml", "--partition", "nosuch", "-o", str(script),
         "--submit"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "sbatch refused the script" in proc.stderr and "partition" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr
    assert "#SBATCH --partition=nosuch" in script.read_text()
