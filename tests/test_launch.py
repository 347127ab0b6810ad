"""Launcher command lines and host handling (pure functions; the real launches are in test_distributed.py)."""

import os
import socket

import pytest
from helpers import sets

from hvdlm.errors import InputError
from hvdlm.launch.commands import LaunchOptions, LaunchRequest, plan_launch, threads_per_rank
from hvdlm.launch.hosts import Host, parse_hosts, place_ranks, read_hostfile

PROGRAM = ["python", "-m", "hvdlm", "train", "job.toml"]


def test_mpirun_command_forwards_threads_and_places_by_slot():
    plan = plan_launch(
        LaunchRequest("mpirun", 4, PROGRAM, [Host("n1", 2), Host("n2", 2)], threads=0), LaunchOptions(cycle_time_ms=5)
    )
    argv = plan.argv
    assert argv[0].endswith("mpirun")
    assert argv[argv.index("-np") + 1] == "4"
    assert argv[argv.index("-H") + 1] == "n1:2,n2:2"
    assert ["-bind-to", "none", "-map-by", "slot"] == argv[argv.index("-bind-to") : argv.index("-bind-to") + 4]
    forwarded = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert "OMP_NUM_THREADS" in forwarded and "HOROVOD_CYCLE_TIME" in forwarded
    assert plan.env["HOROVOD_CYCLE_TIME"] == "5"
    assert plan.env["OMPI_MCA_mpi_yield_when_idle"] == "1"  # Open MPI passes OMPI_MCA_* on by itself
    assert argv[-len(PROGRAM) :] == PROGRAM
    assert plan.env["OMP_NUM_THREADS"] == str(threads_per_rank(2))


def test_horovodrun_command_uses_the_chosen_controller():
    gloo = plan_launch(
        LaunchRequest("horovodrun", 2, PROGRAM, [Host("localhost", 2)]), LaunchOptions(controller="gloo")
    ).argv
    mpi = plan_launch(
        LaunchRequest("horovodrun", 2, PROGRAM, [Host("localhost", 2)]), LaunchOptions(controller="mpi")
    ).argv
    assert gloo[0].endswith("horovodrun") and "--gloo" in gloo and "--mpi" not in gloo
    assert "--mpi" in mpi and "--gloo" not in mpi
    assert gloo[gloo.index("-H") + 1] == "localhost:2"


def test_hostfile_is_handed_to_the_launcher(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("n1 slots=2\nn2 slots=2\n")
    argv = plan_launch(LaunchRequest("mpirun", 3, PROGRAM, read_hostfile(hostfile), str(hostfile))).argv
    assert argv[argv.index("--hostfile") + 1] == str(hostfile) and "-H" not in argv


@pytest.mark.parametrize("ranks, cores, expected", [(1, 2, 2), (2, 2, 1), (4, 2, 1), (3, 16, 5)])
def test_threads_per_rank_splits_the_cores(ranks, cores, expected):
    assert threads_per_rank(ranks, cores) == expected


def test_root_needs_open_mpis_permission_variables():
    env = plan_launch(LaunchRequest("mpirun", 1, PROGRAM)).env
    assert ("OMPI_ALLOW_RUN_AS_ROOT" in env) == (os.geteuid() == 0)


def test_more_ranks_than_slots_is_refused():
    with pytest.raises(InputError, match=r"3 ranks do not fit the 2 slot\(s\) of a:1,b:1"):
        place_ranks([Host("a", 1), Host("b", 1)], 3)


def test_ranks_fill_hosts_in_order():
    assert place_ranks([Host("a", 2), Host("b", 2), Host("c", 2)], 3) == [2, 1, 0]


def test_parse_hosts():
    assert parse_hosts("n1:4, n2:2,n3") == [Host("n1", 4), Host("n2", 2), Host("n3", 1)]
    with pytest.raises(InputError, match="slots must be a positive whole number, got '0'"):
        parse_hosts("n1:0")
    with pytest.raises(InputError, match="appears twice"):
        parse_hosts("n1:2,n1:2")


def test_hostfile_formats_comments_and_line_numbers(tmp_path):
    good = tmp_path / "good"
    good.write_text("# cluster\nn1 slots=4\n\nn2:2   # mpich style\nn3\n")
    assert read_hostfile(good) == [Host("n1", 4), Host("n2", 2), Host("n3", 1)]
    bad = tmp_path / "bad"
    bad.write_text("n1 slots=4\nn2 slots=-1\n")
    with pytest.raises(InputError, match=r"bad:2: slots must be a positive whole number, got '-1'"):
        read_hostfile(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_hostfile(tmp_path / "missing")


# A hostfile as people write them: comments, blank lines, Open MPI's and MPICH's forms and a bare name mixed.
# horovodrun's own parser crashes on it and Open MPI refuses host:N, so hvdlm hands launchers the parsed hosts.
MIXED = "# our two nodes\n\nlocalhost:1   # MPICH style\n\n{host} slots=1 # Open MPI style\n"


@pytest.mark.parametrize(
    "launcher, mpi, flag", [("mpirun", "openmpi", "-H"), ("horovodrun", "openmpi", "-H"), ("mpirun", "mpich", "-hosts")]
)
def test_a_mixed_hostfile_reaches_the_launcher_as_parsed_hosts(hvdlm, tiny_job, tmp_path, launcher, mpi, flag):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(MIXED.format(host="n2") + "n3\n")
    r = hvdlm(
        "launch", tiny_job, "--np", "3", "--hostfile", hostfile, "--launcher", launcher, "--mpi", mpi, "--dry-run"
    )
    assert r.code == 0, r.out
    assert f" {flag} localhost:1,n2:1,n3:1 " in r.out and str(hostfile) not in r.out, r.out


@pytest.mark.distributed
@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_ranks_start_from_a_commented_mixed_format_hostfile(hvdlm, tiny_job, tmp_path, launcher):
    """Two real ranks on this machine, named twice (localhost and its host name) in a hostfile of both formats."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text(MIXED.format(host=socket.gethostname()))
    run_dir = tmp_path / "run"
    overrides = sets("train.max_steps=2", "train.eval_interval=0", "train.sample_tokens=0")
    ranks = ("--np", "2", "--hostfile", hostfile, "--launcher", launcher)
    r = hvdlm("launch", tiny_job, *ranks, "--run-dir", run_dir, *overrides)
    assert r.code == 0, r.out
    assert "Traceback" not in r.out and "illegal character" not in r.out
    summary = r.summary()
    assert summary["ranks"] == 2 and len(summary["replica_checksums"]) == 2
