"""Golden files for what job preparation writes: hostfiles, launcher commands, Slurm batch scripts.

Inputs are fixed (executable names, paths), so the outputs are the same on every machine; the files in
tests/golden/ are the reviewed specification (HVDLM_UPDATE_GOLDEN=1 rewrites them).
"""

from __future__ import annotations

import subprocess

import pytest
from golden_files import assert_golden
from helpers import REPO, demo_sbatch_spec, run_cli

from hvdlm.launch.commands import CommandSpec, LaunchOptions, LaunchPlan, build_command, rank_env
from hvdlm.launch.hostfile import FORMATS, render_hostfile
from hvdlm.launch.hosts import Host
from hvdlm.launch.sbatch import SbatchSpec, render
from hvdlm.launch.sources import hosts_from

ALLOCATION = {"SLURM_JOB_NODELIST": "gpu-[01-03],cpu7", "SLURM_TASKS_PER_NODE": "4(x3),2"}
PROGRAM = ["python", "-m", "hvdlm", "train", "/shared/jobs/demo.toml", "--run-dir", "/shared/runs/demo"]
HOSTS = [Host("node01", 4), Host("node02", 4)]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_hostfile_formats(fmt):
    assert_golden(f"hostfile-slurm.{fmt}", render_hostfile(hosts_from("slurm", None, env=ALLOCATION), fmt))


COMMANDS = {
    "mpirun-openmpi-hosts": dict(
        launcher="mpirun",
        hosts=HOSTS,
        opts=LaunchOptions(nic="ib0", env=["WANDB_MODE"]),
        present=["PATH", "LD_LIBRARY_PATH", "NCCL_DEBUG", "HOME"],
    ),
    "mpirun-openmpi-hostfile": dict(launcher="mpirun", hostfile="hosts.openmpi", opts=LaunchOptions(cycle_time_ms=5)),
    "mpirun-mpich": dict(launcher="mpirun", hosts=HOSTS, opts=LaunchOptions(mpi="mpich", nic="ib0")),
    "horovodrun-mpi-everything": dict(
        launcher="horovodrun",
        hosts=HOSTS,
        opts=LaunchOptions(
            controller="mpi",
            nic="ib0",
            cycle_time_ms=5,
            fusion_threshold_mb=64,
            timeline="/shared/timeline.json",
            autotune=True,
            autotune_log="/shared/autotune.csv",
        ),
    ),
    "horovodrun-gloo-hostfile": dict(launcher="horovodrun", hostfile="hosts.openmpi", opts=LaunchOptions()),
    "srun-gpus": dict(
        launcher="srun",
        hosts=HOSTS,
        opts=LaunchOptions(
            nic="hsn0", tasks_per_node=4, gpus_per_node=4, cpu_bind="cores", gpu_bind="closest", fusion_threshold_mb=32
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_launcher_commands(name):
    case = dict(COMMANDS[name])
    launcher, opts = case.pop("launcher"), case.pop("opts")
    env = rank_env(opts, launcher, threads=8)
    argv = build_command(CommandSpec(launcher, launcher, 8, PROGRAM, env=env, **case), opts)
    assert_golden(f"command-{name}.txt", LaunchPlan(argv, env).display() + "\n")


SCRIPTS = {
    "srun-gpu": SbatchSpec(
        job_name="gpt2-small",
        job_file="/shared/jobs/gpt2-small.toml",
        nodes=2,
        gpus_per_node=4,
        ntasks_per_node=4,
        cpus_per_task=8,
        time="12:00:00",
        partition="gpu",
        account="proj42",
        modules=["openmpi/4.1.5", "cuda/12.2"],
        venv="/shared/venv",
        setup=["ulimit -n 65536"],
        directives=["--constraint=a100", "--exclusive"],
        options=LaunchOptions(nic="ib0", gpus_per_node=4, gpu_bind="closest"),
        overrides=["train.lr=3e-4"],
        command="hvdlm sbatch jobs/gpt2-small.toml --nodes 2 --gpus-per-node 4 --time 12:00:00",
        script="gpt2-small.sbatch",
    ),
    "mpirun-cpu": demo_sbatch_spec(
        nodes=2,
        cpus_per_task=16,
        launcher="mpirun",
        venv="/shared/venv",
        run_dir="/shared/runs/demo",
        options=LaunchOptions(cycle_time_ms=5),
        max_restarts=2,  # slurm.max_restarts: failed runs are requeued
    ),
    "horovodrun-cpu": demo_sbatch_spec(
        time="00:10:00",
        launcher="horovodrun",
        python="/usr/bin/python3",
        options=LaunchOptions(cycle_time_ms=5, nic="eth0"),
    ),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_sbatch_scripts(name):
    script = render(SCRIPTS[name])
    assert_golden(f"sbatch-{name}.sh", script)
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == sorted(directives)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # the shell can parse it


def test_sbatch_from_the_command_line():
    """The whole path: job file + [slurm] defaults + options -> script (this checkout's path replaced)."""
    args = "sbatch jobs/demo.toml --nodes 2 --gpus-per-node 4 --time 02:00:00 --partition gpu --account proj42"
    r = run_cli(*args.split(), "--venv", "/shared/venv", "--set", "launch.nic=ib0", timeout=60, split=True)
    assert r.code == 0, r.err
    assert_golden("sbatch-cli-demo.sh", r.out.replace(str(REPO), "$REPO"))
