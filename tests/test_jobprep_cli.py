"""`hvdlm hostfile`, `hvdlm sbatch`, `hvdlm doctor` and the grown `hvdlm launch`, as users meet them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_cluster
from helpers import REPO, assert_imports_nothing_heavy, old_file_kept, run_cli

from hvdlm.config import load_config
from hvdlm.errors import InputError
from hvdlm.launch.commands import CommandSpec, LaunchOptions, LaunchRequest, build_command, check_tp_layout, plan_launch
from hvdlm.launch.sbatch import SlurmOverrides, render, spec_from_config
from hvdlm.launch.shared_memory import single_copy_works


def test_hostfile_to_stdout_and_to_a_file(hvdlm, tmp_path):
    r = hvdlm("hostfile", "--from", "slurm", "node[001-003]", "--tasks-per-node", "2(x2),1", "--format", "mpich")
    assert r.code == 0, r.out
    assert r.out == "node001:2\nnode002:2\nnode003:1\n"
    out = tmp_path / "hosts"
    r = hvdlm("hostfile", "--from", "hosts", "a:2,b:4", "-o", str(out))
    assert r.code == 0 and r.out == f"wrote {out}: 2 host(s) with 6 slot(s), openmpi format\n"
    assert out.read_text() == "a slots=2\nb slots=4\n"
    # A hostfile in, another format out.
    r = hvdlm("hostfile", "--from", "file", str(out), "--format", "horovod")
    assert r.out == "a:2,b:4\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--from", "slurm", "node[1-"], "node list 'node[1-' is malformed"),
        (["--from", "slurm", "n[1-2];reboot"], "characters a Slurm node list cannot have"),
        (["--from", "slurm", "n1,n1"], "'n1' appears twice"),
        (["--from", "slurm", "n[1-3]", "--tasks-per-node", "2(x2)"], "2 count(s) for the 3 node(s)"),
        (["--from", "hosts", "a:0"], "slots must be a positive whole number, got '0'"),
        (["--from", "hosts", "a:-2"], "slots must be a positive whole number, got '-2'"),
        (["--from", "hosts", "a:2", "--slots", "0"], "--slots must be positive"),
        (["--from", "hosts", "a$(id):2"], "not a valid host name"),
        (["--from", "hosts", "a:2", "--format", "yaml"], "Invalid value for '--format'"),
        (["--from", "hosts"], "--from hosts needs its text"),
        (["--from", "lsf", "h1 4 h2"], "'4' looks like a slot count"),
        (["--from", "slurm", "n1", "--tasks-per-node", "9" * 5000], "tasks on a node is more than the 999999 allowed"),
        (["--from", "slurm", f"n[1-{'9' * 5000}]"], "at most 18 digits"),
        (["--from", "slurm", "n[1-99999999]"], "more than 65536 hosts"),
        (["--from", "slurm", "a,-b"], "starts with '-'"),
        (["--from", "slurm", "n[1-2]", "--tasks-per-node", "\u0662(x2)"], "is malformed at"),
        (["--from", "hosts", "a:\u0662"], "slots must be a positive whole number"),
        (["--from", "hosts", "a", "--slots", "1000000"], "more than the 999999 slots"),
        (["--from", "lsf", "h1 \u0664 h2 4"], "looks like a slot count"),
    ],
)
def test_hostfile_bad_input_is_one_clear_error(hvdlm, tmp_path, args, message):
    out = tmp_path / "hosts"
    out.write_text("keep me\n")
    r = hvdlm("hostfile", *args, "-o", str(out))
    assert r.code == 2, r.out
    assert message in r.out and "Traceback" not in r.out
    assert out.read_text() == "keep me\n"  # nothing already written is damaged


def test_a_huge_task_count_from_the_job_environment_is_one_clear_error(tmp_path):
    env = {**os.environ, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "9" * 5000}
    r = run_cli("hostfile", "--from", "slurm", env=env, timeout=60, split=True)
    assert r.code == 2 and "more than the 999999 allowed" in r.err, r.err
    assert "Traceback" not in r.err and len(r.err) < 500


def test_name_errors_say_what_that_kind_of_name_may_hold(hvdlm, tiny_job):
    r = hvdlm("sbatch", str(tiny_job), "--partition", "gpu queue")
    assert r.code == 2, r.out
    assert "--partition 'gpu queue' is not a plain name (allowed: letters, digits and . _ - / +" in r.out
    assert "only for hosts" not in r.out
    r = hvdlm("launch", str(tiny_job), "--dry-run", "-x", "1VAR")
    assert r.code == 2 and "'1VAR' is not a plain name (allowed: letters, digits and '_', not starting with a" in r.out
    r = hvdlm("sbatch", str(tiny_job), "--time", "\u0660\u0661:00:00")
    assert r.code == 2 and "is not a Slurm time limit" in r.out


def test_bad_hostfile_names_its_line(hvdlm, tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("# nodes\nn1 slots=2\n\nn2 slots=two\n")
    r = hvdlm("hostfile", "--from", "file", str(bad))
    assert r.code == 2 and f"{bad}:4: slots must be a positive whole number, got 'two'" in r.out, r.out
    bad.write_text("n1 slots=2\nn1 slots=2\n")
    assert "appears twice" in hvdlm("hostfile", "--from", "file", str(bad)).out
    bad.write_bytes(b"\xff\xfe n1\n")
    r = hvdlm("hostfile", "--from", "file", str(bad))
    assert r.code == 2 and "not UTF-8" in r.out


def test_job_preparation_never_imports_torch_or_horovod(tmp_path):
    """hostfile and sbatch must answer at once on a login node (< 0.5 s): no torch, no horovod, no mpi4py."""
    script = tmp_path / "s.sbatch"
    for argv in (
        ["hostfile", "--from", "slurm", "node[01-04]", "--slots", "4"],
        ["sbatch", "jobs/demo.toml", "--nodes", "2", "--gpus-per-node", "4", "--time", "01:00:00", "-o", str(script)],
        ["launch", "jobs/demo.toml", "--dry-run", "--launcher", "horovodrun"],
    ):
        assert_imports_nothing_heavy(argv, modules=("torch", "horovod", "mpi4py", "numpy"))
    assert script.read_text().startswith("#!/bin/bash")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--partition", "gpu;rm -rf ~"], "--partition 'gpu;rm -rf ~' is not a plain name"),
        (["--account", "a b"], "not a plain name"),
        (["--time", "2 hours"], "not a Slurm time limit"),
        (["--nodes", "0"], "--nodes must be positive"),
        (["--gpus-per-node", "-1"], "--gpus-per-node must be zero or more"),
        (["--venv", "/opt/$(whoami)"], "contains '$'"),
        (["--run-dir", "runs/`id`"], "contains '`'"),
        (["--set", "slurm.modules=openmpi;reboot"], "module 'openmpi;reboot' is not a plain name"),
        (["--set", "launch.nic=eth0 && reboot"], "launch.nic 'eth0 && reboot'"),
        (["--set", "launch.env=A-B"], "launch.env variable 'A-B'"),
        (["--set", "slurm.directives=--time=1"], "sets --time, which hvdlm sets already"),
        (["--set", "slurm.directives=--mail-user=$(x)"], "is not an sbatch option"),
        (["--set", "launch.np=3", "--nodes", "2"], "do not spread evenly over 2 CPU-only node(s)"),
        (["--set", "slurm.launcher=pbsdsh"], "'slurm.launcher' must be one of"),
        (["--set", "slurm.nodes=many"], "must be int"),
        (["--partition", "gpu\nrm -rf ~"], "is not a plain name"),
        (["--set", "slurm.setup=echo a\necho b"], "holds a line break"),
        (["--ntasks-per-node", "0"], "--ntasks-per-node must be positive, got 0"),
        (["--cpus-per-task", "0"], "--cpus-per-task must be positive, got 0"),
        (["--ntasks-per-node", "-2"], "--ntasks-per-node must be positive, got -2"),
        (["--set", "launch.fusion_threshold_mb=inf"], "'launch.fusion_threshold_mb' must be a finite number, got inf"),
        (["--set", "launch.fusion_threshold_mb=nan"], "'launch.fusion_threshold_mb' must be a finite number, got nan"),
        (["--set", "launch.cycle_time_ms=nan"], "'launch.cycle_time_ms' must be a finite number, got nan"),
        (["--set", "launch.cycle_time_ms=-inf"], "'launch.cycle_time_ms' must be a finite number, got -inf"),
        (["--set", "launch.fusion_threshold_mb=1e308"], "'launch.fusion_threshold_mb' must be at most 1048576"),
        (["--set", "train.lr=nan"], "'train.lr' must be a finite number"),
        (["--set", "model.dropout=nan"], "'model.dropout' must be a finite number"),
        (["--set", "data.val_fraction=inf"], "'data.val_fraction' must be a finite number"),
    ],
)
def test_sbatch_bad_input_is_one_clear_error(hvdlm, tmp_path, args, message):
    out = tmp_path / "job.sbatch"
    out.write_text("#!/bin/bash\n# an earlier script\n")
    r = hvdlm("sbatch", "jobs/demo.toml", *args, "-o", str(out))
    assert r.code == 2, r.out
    assert message in r.out and "Traceback" not in r.out
    assert out.read_text() == "#!/bin/bash\n# an earlier script\n"


@pytest.mark.parametrize("value", ["nan", "inf", "-nan", "+inf"])
def test_launch_refuses_non_finite_launch_settings(hvdlm, tiny_job, value):
    for key in ("launch.fusion_threshold_mb", "launch.cycle_time_ms"):
        r = hvdlm("launch", str(tiny_job), "--dry-run", "--launcher", "horovodrun", "--set", f"{key}={value}")
        assert r.code == 2 and f"'{key}' must be a finite number" in r.out and "Traceback" not in r.out, r.out


@pytest.mark.parametrize("command", ["hostfile", "sbatch"])
@pytest.mark.parametrize("target", ["/proc/hvdlm-test", "missing-dir/out", "/proc/self/status"])
def test_an_unwritable_output_is_one_clear_error(hvdlm, tmp_path, command, target):
    target = target if target.startswith("/") else str(tmp_path / target)
    args = ["--from", "hosts", "a:2"] if command == "hostfile" else ["jobs/demo.toml"]
    r = hvdlm(command, *args, "-o", target)
    assert r.code == 2 and "Traceback" not in r.out, r.out
    assert "cannot write" in r.out or "does not exist" in r.out, r.out
    assert Path(target).name in r.out or Path(target).parent.name in r.out  # the message names the path


def test_a_failed_write_keeps_the_old_file(tmp_path, full_disk_rename):
    from hvdlm.launch.hostfile import write_atomically

    out = tmp_path / "hosts"
    with old_file_kept(out), pytest.raises(InputError, match=f"cannot write '{out}': No space left on device"):
        write_atomically(out, "new\n")


def test_sbatch_refuses_to_write_over_its_job_file(hvdlm, tmp_path):
    job = tmp_path / "j.toml"
    job.write_text((REPO / "jobs" / "demo.toml").read_text())
    before = job.read_text()
    link = tmp_path / "link.sbatch"
    link.symlink_to(job)
    for target in (job, link):
        r = hvdlm("sbatch", str(job), "-o", str(target))
        assert r.code == 2 and "is the job file itself" in r.out, r.out
        assert job.read_text() == before


def test_output_through_a_symlink_replaces_the_target_and_keeps_the_link(hvdlm, tmp_path):
    target = tmp_path / "shared" / "hosts"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "hosts"
    link.symlink_to(target)
    r = hvdlm("hostfile", "--from", "hosts", "a:2", "-o", str(link))
    assert r.code == 0, r.out
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text() == "a slots=2\n"


def test_slurm_tasks_per_node_reaches_srun(hvdlm, tiny_job):
    cfg = load_config(tiny_job, ["slurm.ntasks_per_node=2"])
    opts = LaunchOptions.from_config(cfg)
    assert opts.tasks_per_node == 2
    argv = build_command(CommandSpec("srun", "srun", 4, ["prog"]), opts)
    assert "--ntasks-per-node=2" in argv
    # In a batch script srun inherits the allocation's tasks per node, which the command line may have changed.
    script = render(spec_from_config(cfg, str(tiny_job), SlurmOverrides(ntasks_per_node=4, venv="")))
    assert "#SBATCH --ntasks-per-node=4" in script and "srun --mpi=pmix --ntasks-per-node" not in script
    reason = slurm_cluster.ensure_installed(slurm_cluster.CLIENT_TOOLS)
    if reason:
        pytest.skip(f"no srun: {reason}")
    r = hvdlm(
        "launch", str(tiny_job), "--dry-run", "--launcher", "srun", "--np", "4", "--set", "slurm.ntasks_per_node=2"
    )
    assert r.code == 0 and "srun --mpi=pmix --ntasks=4 --ntasks-per-node=2 " in r.out, r.out


def test_duplicate_hosts_in_a_hostfile_name_both_lines(tmp_path):
    from hvdlm.launch.hosts import read_hostfile

    f = tmp_path / "hosts"
    f.write_text("# nodes\nn1 slots=2\nn2:2\n\nn1\n")
    with pytest.raises(InputError, match=f"host 'n1' appears twice in {f} \\({f}:2 and {f}:5\\)"):
        read_hostfile(f)


def test_setup_lines_with_a_syntax_error_are_refused_before_writing(hvdlm, tmp_path):
    job = tmp_path / "job.toml"
    out = tmp_path / "job.sbatch"
    out.write_text("#!/bin/bash\n# an earlier script\n")
    job.write_text('[slurm]\nsetup = ["ulimit -n 4096", "echo \\"unclosed"]\n')
    r = hvdlm("sbatch", str(job), "-o", str(out))
    assert r.code == 2 and "slurm.setup has a shell syntax error in item 2, 'echo \"unclosed'" in r.out, r.out
    assert out.read_text() == "#!/bin/bash\n# an earlier script\n"
    job.write_text('[slurm]\nsetup = ["fi"]\n')
    r = hvdlm("sbatch", str(job))
    assert r.code == 2 and "in item 1, 'fi' (syntax error near unexpected token `fi')" in r.out, r.out
    # A construct over several items is one command in the script: fine.
    job.write_text('[slurm]\nsetup = ["if [ -n \\"$HOME\\" ]; then", "  echo home", "fi"]\n')
    r = hvdlm("sbatch", str(job), "-o", str(out))
    assert r.code == 0 and "  echo home\nfi\n" in out.read_text(), r.out


def _fake_sbatch(directory, body):
    directory.mkdir()
    fake = directory / "sbatch"
    fake.write_text(f"#!/bin/sh\n{body}\n")
    fake.chmod(0o755)


@pytest.mark.parametrize(
    "body, message",
    [
        ("exit 0", "printed no job id"),
        (
            "echo 'sbatch: error: Batch job submission failed' >&2; exit 1",
            "sbatch refused the script: sbatch: error: Batch job submission failed",
        ),
    ],
)
def test_submit_answers_without_a_job_id_are_errors(hvdlm, tmp_path, monkeypatch, body, message):
    _fake_sbatch(tmp_path / "bin", body)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    r = hvdlm("sbatch", "jobs/demo.toml", "--submit")
    assert r.code == 2 and message in r.out and "submitted batch job" not in r.out, r.out


def test_submit_that_hangs_or_cannot_start_is_an_input_error(tmp_path, monkeypatch):
    from hvdlm.launch import sbatch as batch

    _fake_sbatch(tmp_path / "bin", "echo 42")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert batch.submit("#!/bin/bash\n", None) == "42"

    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired("sbatch", 120)

    monkeypatch.setattr(batch.subprocess, "run", hang)
    with pytest.raises(InputError, match="did not answer within 120 s"):
        batch.submit("#!/bin/bash\n", None)

    def gone(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(batch.subprocess, "run", gone)
    with pytest.raises(InputError, match="could not be started: Permission denied"):
        batch.submit("#!/bin/bash\n", None)


def test_sbatch_output_path_cannot_break_out_of_the_header(hvdlm, tmp_path):
    out = tmp_path / "x\nreboot"
    r = hvdlm("sbatch", "jobs/demo.toml", "-o", str(out))
    assert r.code == 2 and "-o" in r.out and not out.exists(), r.out


def test_sbatch_on_cpu_only_nodes_gives_each_rank_its_cores():
    cfg = load_config("jobs/demo.toml", ["launch.np=8"])
    spec = spec_from_config(cfg, "jobs/demo.toml", SlurmOverrides(nodes=2, gpus_per_node=0, venv="/v"))
    assert (spec.ntasks_per_node, spec.cpus_per_task) == (4, 1)
    spec = spec_from_config(
        cfg, "jobs/demo.toml", SlurmOverrides(nodes=2, gpus_per_node=0, cpus_per_task=16, venv="/v")
    )
    script = render(spec)
    assert "#SBATCH --ntasks-per-node=4" in script and "#SBATCH --cpus-per-task=16" in script
    assert 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK}"' in script
    assert "--gpus-per-node" not in script
    gpu = spec_from_config(cfg, "jobs/demo.toml", SlurmOverrides(nodes=2, gpus_per_node=4, venv="/v"))
    assert (gpu.ntasks_per_node, gpu.cpus_per_task) == (4, 4)


def test_job_file_slurm_section_feeds_sbatch_and_launch(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(
        '[launch]\nnic = "ib0"\nenv = ["WANDB_MODE"]\n'
        '[slurm]\nnodes = 3\ngpus_per_node = 2\ntime = "04:00:00"\npartition = "big"\nlauncher = "mpirun"\n'
        'modules = ["openmpi/5"]\n'
    )
    cfg = load_config(job)
    script = render(spec_from_config(cfg, str(job), SlurmOverrides(venv="")))
    for line in (
        "#SBATCH --nodes=3",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --time=04:00:00",
        "#SBATCH --partition=big",
        "module load openmpi/5",
    ):
        assert line in script
    assert "-x WANDB_MODE" in script and "-mca btl_tcp_if_include ib0" in script
    # Command-line values win over the file.
    assert "#SBATCH --nodes=1" in render(spec_from_config(cfg, str(job), SlurmOverrides(nodes=1, venv="")))
    plan = plan_launch(LaunchRequest("mpirun", 2, ["prog"]), LaunchOptions.from_config(cfg))
    assert plan.env["NCCL_SOCKET_IFNAME"] == "ib0" and "WANDB_MODE" in plan.argv


def test_tensor_parallelism_needs_an_mpi_launcher():
    check_tp_layout(1, 3, "horovodrun", "gloo")  # data parallelism alone is fine with Gloo, on any rank count
    for launcher, controller in (("mpirun", "gloo"), ("srun", "gloo"), ("horovodrun", "mpi")):
        check_tp_layout(2, 4, launcher, controller)
    with pytest.raises(InputError, match="parallel.tp = 2 needs an MPI launcher"):
        check_tp_layout(2, 2, "horovodrun", "gloo")
    with pytest.raises(InputError, match="does not divide the 3 ranks"):
        check_tp_layout(2, 3, "mpirun", "gloo")
    with pytest.raises(InputError, match="does not divide the 3 ranks per node"):
        check_tp_layout(2, 6, "srun", "gloo", ranks_per_node=3)


def test_launch_and_sbatch_refuse_layouts_tensor_parallelism_cannot_use(tmp_path):
    def hvdlm(*args):
        return run_cli(*args, timeout=60, split=True)

    tp2 = str(REPO / "jobs" / "tp2.toml")
    cases = [
        (["launch", tp2, "--launcher", "horovodrun", "--dry-run"], "needs an MPI launcher"),
        (["launch", tp2, "--np", "3", "--hosts", "localhost:4", "--dry-run"], "does not divide the 3 ranks"),
        # 6 ranks divide by tp = 2, but slots fill in order: 3 on a, 3 on b, each splitting a replica.
        (["launch", tp2, "--np", "6", "--hosts", "a:3,b:3", "--dry-run"], "does not divide the 3 ranks per node"),
        (["launch", tp2, "--np", "4", "--hosts", "a:3,b:3", "--dry-run"], "does not divide the 3 ranks per node"),
        (["sbatch", tp2, "--nodes", "2", "--gpus-per-node", "3", "--time", "01:00:00"], "3 ranks per node"),
        (
            ["sbatch", tp2, "--nodes", "1", "--gpus-per-node", "0", "--time", "01:00:00", "--launcher", "horovodrun"],
            "needs an MPI launcher",
        ),
    ]
    for args, message in cases:
        r = hvdlm(*args)
        assert r.code == 2, (args, r.out, r.err)
        assert message in r.err and "Traceback" not in r.err, (args, r.err)
    ok = hvdlm("launch", tp2, "--np", "4", "--hosts", "localhost:4", "--dry-run")
    assert ok.code == 0 and "-np 4" in ok.out, ok.err
    ok = hvdlm("launch", tp2, "--np", "6", "--hosts", "a:4,b:4", "--dry-run")  # 4 on a, 2 on b
    assert ok.code == 0 and "-H a:4,b:4" in ok.out, ok.err


def test_launch_grows_nic_forwarding_and_mpich(hvdlm, tiny_job):
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--nic", "lo", "-x", "MY_VAR")
    assert r.code == 0, r.out
    assert "NCCL_SOCKET_IFNAME=lo GLOO_SOCKET_IFNAME=lo" in r.out
    assert "-x MY_VAR" in r.out and "-mca btl_tcp_if_include lo -mca oob_tcp_if_include lo" in r.out
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--mpi", "mpich", "--nic", "lo")
    assert "-hosts localhost:" in r.out and "-iface lo" in r.out and "-bind-to" not in r.out
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--nic", "eth0;reboot")
    assert r.code == 2 and "launch.nic 'eth0;reboot' is not a plain name" in r.out


def test_launch_with_srun_inside_an_allocation(hvdlm, tiny_job):
    reason = slurm_cluster.ensure_installed(slurm_cluster.CLIENT_TOOLS)  # srun comes with slurm-client
    if reason:
        pytest.skip(f"no srun: {reason}")
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--launcher", "srun", "--np", "4", "--set", "slurm.cpu_bind=cores")
    assert r.code == 0, r.out
    assert "srun --mpi=pmix --ntasks=4 --cpu-bind=cores" in r.out
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--launcher", "srun", "--hostfile", __file__)
    assert r.code == 2


def test_doctor_explains_this_environment(hvdlm):
    r = hvdlm("doctor", timeout=300)
    assert "Traceback" not in r.out
    assert "[ok]   horovod build: Horovod 0.28.1: frameworks PyTorch; controllers MPI, GLOO" in r.out, r.out
    assert "[ok]   one MPI: Horovod and mpi4py both load" in r.out
    assert "MPI threads" in r.out and "launcher mpirun" in r.out and "GPUs" in r.out
    # The same answer as the launcher's, which turns the single copy off where it is a warning here.
    single_copy = "[ok]   shared memory: ranks on this machine may read each other's memory"
    assert (single_copy in r.out) is single_copy_works(), r.out
    assert r.code == (1 if "[FAIL]" in r.out else 0)


def test_doctor_reports_a_missing_horovod_with_its_fix(hvdlm, tmp_path):
    # An interpreter without horovod, mpi4py or torch: each is one failed check with a fix, not a crash.
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    r = hvdlm("doctor", "--python", str(bare / "bin" / "python"), timeout=300)
    assert r.code == 1, r.out
    assert "[FAIL] horovod: cannot import or start horovod.torch: ModuleNotFoundError" in r.out
    assert "fix: Rebuild Horovod" in r.out and "[FAIL] mpi4py" in r.out and "Traceback" not in r.out


def test_multi_node_horovodrun_scripts_say_they_need_ssh():
    cfg = load_config("jobs/demo.toml", ["launch.np=4"])
    one = render(spec_from_config(cfg, "jobs/demo.toml", SlurmOverrides(nodes=1, launcher="horovodrun", venv="")))
    two = render(spec_from_config(cfg, "jobs/demo.toml", SlurmOverrides(nodes=2, launcher="horovodrun", venv="")))
    assert "over ssh" in two and "over ssh" not in one
    assert "HOSTS=$(" in two and '-H "${HOSTS}"' in two


def test_doctor_explains_problems_this_machine_does_not_have():
    """The verdicts on probe results this CPU machine cannot produce (GPUs, a second MPI, no thread support)."""
    from hvdlm.launch.doctor import _gpu_checks, _horovod_checks, _same_mpi_checks

    hvd = dict(version="0.28.1", mpi=True, gloo=True, nccl=False, cuda=False, ddl=False, ccl=False, threads=False)
    torch = dict(version="2.13.0", cuda="12.8", gpus=2, names=["H100", "H100"], nccl="2.27.3")
    verdicts = {c.name: c for c in _gpu_checks(torch, "", hvd) + _horovod_checks(hvd, "")}
    assert verdicts["GPUs"].status == "ok" and "2 GPU(s): H100, H100" in verdicts["GPUs"].detail
    assert verdicts["NCCL"].status == "fail" and "nvcc" in verdicts["NCCL"].fix
    assert verdicts["MPI threads"].status == "fail" and "Gloo" in verdicts["MPI threads"].fix
    assert all(c.status == "ok" for c in _gpu_checks(torch, "", {**hvd, "nccl": True}))
    # Which libmpi each loads comes from ldd of its extension module; a binary without one cannot be judged
    # (this machine has a single MPI, so the "two libraries" verdict itself is not reachable here).
    import horovod.torch.mpi_lib_v2 as horovod_mpi
    import mpi4py.MPI

    two = _same_mpi_checks({"lib": horovod_mpi.__file__}, {"lib": "/bin/ls"})  # ls links no libmpi
    assert two[0].status == "warn"
    same = _same_mpi_checks({"lib": horovod_mpi.__file__}, {"lib": mpi4py.MPI.__file__})
    assert same[0].status == "ok" and "libmpi" in same[0].detail
