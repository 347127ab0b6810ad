"""GPU ranks at launch, on a machine without GPUs: the device kind is an input, so every case runs on CPU.

What GPU ranks get that CPU ranks do not (Open MPI's choice of PML, no yielding, Horovod's own cycle time), how
launch.env (-x) reaches the ranks under each launcher, and the GPU jobs refused before anything starts. The GPU
command lines are golden files next to the CPU ones (tests/golden/command-gpu-*.txt).
"""

from __future__ import annotations

import pytest
from golden_files import assert_golden

from hvdlm.config import load_config
from hvdlm.errors import InputError
from hvdlm.launch.commands import (
    CPU,
    GPU,
    CommandSpec,
    LaunchOptions,
    LaunchPlan,
    LaunchRequest,
    build_command,
    check_gpus_per_node,
    count_nvidia_smi,
    env_notes,
    plan_launch,
    rank_device,
    rank_env,
    visible_gpus,
)
from hvdlm.launch.hosts import Host
from hvdlm.launch.sbatch import SlurmOverrides, render, spec_from_config

PROGRAM = ["python", "-m", "hvdlm", "train", "/shared/jobs/demo.toml", "--run-dir", "/shared/runs/demo"]
HOSTS = [Host("node01", 4), Host("node02", 4)]


# --- how many GPUs this machine shows, and what kind of ranks a job has ---


@pytest.mark.parametrize(
    "physical, visible, expected",
    [
        (4, None, 4),  # unset: all of them
        (4, "", 0),  # empty hides every GPU
        (4, "-1", 0),
        (4, "0,1", 2),
        (4, "1,-1,2", 1),  # CUDA stops at the first invalid entry
        (4, "GPU-8f1c,GPU-77aa", 2),  # UUIDs count like indices
        (1, "0,1,2", 1),  # no more than the machine has
        (0, "0", 0),  # no driver: nothing to see whatever the variable says
    ],
)
def test_visible_gpus(physical, visible, expected):
    assert visible_gpus(physical, visible) == expected


def test_nvidia_smi_counts_gpus_not_mig_instances():
    text = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\n"
        "  MIG 3g.40gb     Device  0: (UUID: MIG-a)\n"
        "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)\n"
    )
    assert count_nvidia_smi(text) == 2 and count_nvidia_smi("") == 0


@pytest.mark.parametrize(
    "train_device, launcher, gpus_here, gpus_per_node, expected",
    [
        ("cpu", "mpirun", 8, 0, CPU),  # GPUs hidden from the job on purpose
        ("cuda", "mpirun", 0, 0, GPU),  # a login node launching onto GPU hosts
        ("auto", "mpirun", 2, 0, GPU),
        ("auto", "mpirun", 0, 0, CPU),
        ("auto", "srun", 0, 4, GPU),  # srun hands the ranks the allocation's GPUs
        ("auto", "srun", 0, 0, CPU),
    ],
)
def test_rank_device(train_device, launcher, gpus_here, gpus_per_node, expected):
    assert rank_device(train_device, launcher, gpus_here, gpus_per_node) == expected


# --- what GPU ranks get ---


def test_gpu_ranks_neither_yield_nor_take_the_cpu_cycle_time():
    opts = LaunchOptions.from_config(load_config("jobs/demo.toml"))  # launch.cycle_time_ms = 5, the CPU tuning
    cpu, gpu = rank_env(opts, "mpirun", 4), rank_env(opts, "mpirun", 4, device=GPU)
    assert cpu["OMPI_MCA_mpi_yield_when_idle"] == "1" and cpu["HOROVOD_CYCLE_TIME"] == "5"
    assert "OMPI_MCA_mpi_yield_when_idle" not in gpu and "HOROVOD_CYCLE_TIME" not in gpu
    # A cycle time of the user's own applies to GPU ranks too, as horovodrun's option as well.
    own = LaunchOptions(cycle_time_ms=2.5)
    assert rank_env(own, "mpirun", 4, device=GPU)["HOROVOD_CYCLE_TIME"] == "2.5"
    assert "--cycle-time-ms" in build_command(CommandSpec("horovodrun", "horovodrun", 2, PROGRAM, device=GPU), own)
    assert "--cycle-time-ms" not in build_command(CommandSpec("horovodrun", "horovodrun", 2, PROGRAM, device=GPU), opts)


def test_gpu_ranks_let_open_mpi_choose_ucx():
    opts = LaunchOptions()
    cpu = build_command(CommandSpec("mpirun", "mpirun", 2, PROGRAM, hosts=HOSTS), opts)
    gpu = build_command(CommandSpec("mpirun", "mpirun", 2, PROGRAM, hosts=HOSTS, device=GPU), opts)
    assert "ob1" in cpu and "ob1" not in gpu and "pml" not in gpu
    assert gpu[gpu.index("btl") + 1] == "^openib"  # the deprecated openib BTL stays off


GPU_COMMANDS = {
    "mpirun-openmpi": dict(
        launcher="mpirun",
        hosts=HOSTS,
        opts=LaunchOptions(nic="ib0", env=["WANDB_MODE"], cycle_time_ms=5),
        present=["PATH", "LD_LIBRARY_PATH", "NCCL_DEBUG", "UCX_TLS", "HOME"],
    ),
    "horovodrun-mpi": dict(launcher="horovodrun", hosts=HOSTS, opts=LaunchOptions(controller="mpi", cycle_time_ms=5)),
    "srun": dict(
        launcher="srun",
        hosts=HOSTS,
        opts=LaunchOptions(nic="hsn0", tasks_per_node=4, gpus_per_node=4, gpu_bind="closest", cycle_time_ms=5),
    ),
}


@pytest.mark.parametrize("name", sorted(GPU_COMMANDS))
def test_gpu_launcher_commands(name):
    case = dict(GPU_COMMANDS[name])
    launcher, opts = case.pop("launcher"), case.pop("opts")
    env = rank_env(opts, launcher, threads=8, device=GPU)
    argv = build_command(CommandSpec(launcher, launcher, 8, PROGRAM, env=env, device=GPU, **case), opts)
    assert_golden(f"command-gpu-{name}.txt", LaunchPlan(argv, env).display() + "\n")


# --- -x NAME (launch.env) under each launcher ---


def test_env_reaches_open_mpi_ranks_through_x():
    argv = build_command(CommandSpec("mpirun", "mpirun", 2, PROGRAM, hosts=HOSTS), LaunchOptions(env=["WANDB_MODE"]))
    assert argv[argv.index("WANDB_MODE") - 1] == "-x"


def test_env_reaches_mpich_ranks_with_the_whole_environment():
    named = build_command(
        CommandSpec("mpirun", "mpirun", 2, PROGRAM, hosts=HOSTS), LaunchOptions(mpi="mpich", env=["WANDB_MODE"])
    )
    plain = build_command(CommandSpec("mpirun", "mpirun", 2, PROGRAM, hosts=HOSTS), LaunchOptions(mpi="mpich"))
    assert "-genvall" in named and "-genvall" not in plain
    assert "-genvlist" not in named  # it would pass only the listed names: PATH and the rest would be lost


def test_env_reaches_horovodrun_ranks_except_what_horovodrun_drops():
    opts = LaunchOptions(env=["WANDB_MODE", "CUDA_VISIBLE_DEVICES"])
    argv = build_command(CommandSpec("horovodrun", "horovodrun", 2, PROGRAM, hosts=HOSTS), opts)
    assert "WANDB_MODE" not in argv  # horovodrun passes its whole environment by itself
    (note,) = env_notes("horovodrun", opts)
    assert "-x CUDA_VISIBLE_DEVICES is ignored" in note and "mpirun or srun" in note
    assert env_notes("mpirun", opts) == [] and env_notes("srun", opts) == []


@pytest.mark.parametrize("export", [None, "ALL", "ALL,FOO", "all"])
def test_srun_passes_everything_by_default(export):
    opts = LaunchOptions(env=["WANDB_MODE"])
    argv = build_command(
        CommandSpec("srun", "srun", 2, PROGRAM, env={"OMP_NUM_THREADS": "4"}, slurm_export=export), opts
    )
    assert not any(a.startswith("--export") for a in argv)


@pytest.mark.parametrize(
    "export, expected",
    [
        ("NONE", "--export=OMP_NUM_THREADS,WANDB_MODE"),
        ("FOO,WANDB_MODE", "--export=FOO,WANDB_MODE,OMP_NUM_THREADS"),
    ],
)
def test_srun_adds_the_names_to_a_narrowed_export(export, expected):
    opts = LaunchOptions(env=["WANDB_MODE"])
    argv = build_command(
        CommandSpec("srun", "srun", 2, PROGRAM, env={"OMP_NUM_THREADS": "4"}, slurm_export=export), opts
    )
    assert expected in argv and argv.index(expected) < argv.index("python")


# --- GPU jobs refused before anything starts ---


def test_a_gpu_job_here_without_gpus_is_refused_with_the_fix():
    with pytest.raises(InputError, match=r"shows none .* the job runs only here.*train.device=cpu"):
        plan_launch(LaunchRequest("mpirun", 1, PROGRAM, train_device="cuda"), gpus=0)
    with pytest.raises(InputError, match="shows none"):
        plan_launch(LaunchRequest("mpirun", 1, PROGRAM, [Host("localhost", 1)], train_device="cuda"), gpus=0)


def test_a_gpu_job_with_more_ranks_here_than_gpus_is_refused():
    with pytest.raises(InputError, match=r"2 ranks would run on this machine, which shows 1 GPU\(s\). Use --np 1"):
        plan_launch(LaunchRequest("mpirun", 2, PROGRAM, train_device="cuda"), gpus=1)
    with pytest.raises(InputError, match="2 of its ranks would run here"):
        plan_launch(
            LaunchRequest("mpirun", 4, PROGRAM, [Host("localhost", 2), Host("node02", 2)], train_device="cuda"), gpus=0
        )


def test_gpu_jobs_that_fit_are_planned_with_gpu_tuning():
    plan = plan_launch(LaunchRequest("mpirun", 2, PROGRAM, train_device="cuda"), gpus=2)
    assert "ob1" not in plan.argv and "OMPI_MCA_mpi_yield_when_idle" not in plan.env
    # Only other machines' ranks: their GPUs cannot be seen from here, the job goes ahead.
    remote = plan_launch(LaunchRequest("mpirun", 8, PROGRAM, HOSTS, train_device="cuda"), gpus=0)
    assert "ob1" not in remote.argv
    # "auto" follows this machine's GPUs; "cpu" ignores them; srun's ranks are the allocation's business.
    assert "ob1" not in plan_launch(LaunchRequest("mpirun", 1, PROGRAM, train_device="auto"), gpus=1).argv
    assert "ob1" in plan_launch(LaunchRequest("mpirun", 1, PROGRAM, train_device="auto"), gpus=0).argv
    assert "ob1" in plan_launch(LaunchRequest("mpirun", 2, PROGRAM, train_device="cpu"), gpus=1).argv


def test_launch_refuses_a_gpu_job_on_this_gpu_less_machine(hvdlm, tiny_job, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # whatever this machine has: none visible
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--np", "1", "--set", "train.device=cuda")
    assert r.code == 2, r.out
    assert 'train.device = "cuda" asks for GPUs' in r.out and "Traceback" not in r.out
    assert len(r.out.strip().splitlines()) == 1


def test_launch_says_on_stderr_which_x_horovodrun_ignores(hvdlm, tiny_job):
    args = ["--dry-run", "--np", "1", "--launcher", "horovodrun", "-x", "CUDA_VISIBLE_DEVICES"]
    r = hvdlm("launch", str(tiny_job), *args)
    assert r.code == 0, r.out
    assert "-x CUDA_VISIBLE_DEVICES is ignored for other hosts' ranks" in r.out


# --- batch jobs: GPUs per node against ranks per node ---


def test_check_gpus_per_node():
    check_gpus_per_node("auto", 4, 4)
    check_gpus_per_node("cpu", 8, 4)  # CPU ranks on GPU nodes: the GPUs are not theirs to share
    check_gpus_per_node("auto", 2, 0)  # CPU-only nodes
    with pytest.raises(InputError, match="--ntasks-per-node 8 is more than the 4 GPU"):
        check_gpus_per_node("auto", 8, 4)
    with pytest.raises(InputError, match="asks Slurm for none"):
        check_gpus_per_node("cuda", 2, 0)


def test_sbatch_refuses_more_ranks_than_gpus_per_node(hvdlm):
    r = hvdlm("sbatch", "jobs/demo.toml", "--gpus-per-node", "2", "--ntasks-per-node", "4")
    assert r.code == 2 and "more than the 2 GPU(s) per node" in r.out and len(r.out.strip().splitlines()) == 1
    r = hvdlm("sbatch", "jobs/demo.toml", "--set", "train.device=cuda")
    assert r.code == 2 and "--gpus-per-node N" in r.out, r.out


def test_sbatch_gpu_scripts_get_gpu_tuning_and_cpu_scripts_keep_theirs():
    cfg = load_config("jobs/demo.toml")
    gpu = render(spec_from_config(cfg, "jobs/demo.toml", SlurmOverrides(gpus_per_node=4, launcher="mpirun", venv="")))
    cpu = render(spec_from_config(cfg, "jobs/demo.toml", SlurmOverrides(gpus_per_node=0, launcher="mpirun", venv="")))
    assert "yield_when_idle" not in gpu and "HOROVOD_CYCLE_TIME" not in gpu and "ob1" not in gpu
    assert "yield_when_idle=1" in cpu and "HOROVOD_CYCLE_TIME=5" in cpu and "-mca pml ob1" in cpu
