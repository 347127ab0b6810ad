"""Real multi-rank training: ranks started by mpirun and horovodrun through `hvdlm launch`, no mocks."""

import pytest
from helpers import hvdlm_argv, mpirun, sets

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("launcher", ["mpirun", "horovodrun"])
def test_two_ranks_train_and_stay_bit_identical(hvdlm, tiny_job, tmp_path, launcher):
    run_dir = tmp_path / launcher
    r = hvdlm("launch", str(tiny_job), "--np", "2", "--launcher", launcher, "--run-dir", str(run_dir))
    assert r.code == 0, r.out
    summary = r.summary()
    assert summary["ranks"] == 2
    # Each rank hashed its own parameters after the last step; the digests came back from both ranks.
    assert len(summary["replica_checksums"]) == 2
    assert summary["replica_checksums"][0] == summary["replica_checksums"][1]
    assert summary["final_val_loss"] < summary["first_val_loss"]
    rows = r.metrics()
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 9))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(row) for row in rows if "loss" in row)
    assert (run_dir / "config.toml").is_file()
    assert (run_dir / "checkpoints" / "step-0000008.pt").is_file()
    assert "validation loss:" in r.out and "run directory:" in r.out


def test_horovodrun_with_the_mpi_controller(hvdlm, tiny_job, tmp_path):
    args = ("--np", "2", "--launcher", "horovodrun", "--run-dir", tmp_path / "run")
    r = hvdlm("launch", tiny_job, *args, *sets("launch.controller=mpi", "train.max_steps=3"))
    assert r.code == 0, r.out
    checksums = r.summary()["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]


def test_two_ranks_with_batch_b_follow_one_rank_with_batch_2b(hvdlm, tiny_job, tmp_path):
    """Horovod's averaged gradient equals the gradient of the global batch: same samples, same trajectory."""
    common = ["--set", "train.max_steps=5", "--set", "train.eval_interval=0", "--set", "train.grad_clip=0"]
    one = hvdlm(
        "launch", str(tiny_job), "--np", "1", "--run-dir", str(tmp_path / "one"), *common, "--set", "train.batch_size=8"
    )
    two = hvdlm(
        "launch", str(tiny_job), "--np", "2", "--run-dir", str(tmp_path / "two"), *common, "--set", "train.batch_size=4"
    )
    assert one.code == 0, one.out
    assert two.code == 0, two.out
    a, b = one.losses(), two.losses()
    assert len(a) == len(b) == 5
    for step, (x, y) in enumerate(zip(a, b), start=1):
        assert abs(x - y) / abs(x) < 1e-4, f"step {step}: 1 rank {x} vs 2 ranks {y}"
    # The check has teeth: the loss moved over the 5 steps, so a wrong gradient would have shown.
    assert a[-1] < a[0] - 0.05


def test_two_ranks_with_different_data_would_differ(hvdlm, tiny_job, tmp_path):
    """Control for the test above: 2 ranks of batch 4 are not 1 rank of batch 4 (the comparison can fail)."""
    common = ["--set", "train.max_steps=5", "--set", "train.eval_interval=0", "--set", "train.batch_size=4"]
    one = hvdlm("launch", str(tiny_job), "--np", "1", "--run-dir", str(tmp_path / "one"), *common)
    two = hvdlm("launch", str(tiny_job), "--np", "2", "--run-dir", str(tmp_path / "two"), *common)
    assert one.code == 0 and two.code == 0, one.out + two.out
    assert max(abs(x - y) / abs(x) for x, y in zip(one.losses(), two.losses())) > 1e-3


def test_bad_input_under_mpirun_is_reported_once(tmp_path, cache_dir):
    """Every rank meets the same bad job file; only rank 0 says so, and the job exits non-zero."""
    r = mpirun(2, hvdlm_argv("train", tmp_path / "nope.toml"), cache_dir, timeout=120)
    assert r.code != 0
    assert r.out.count("does not exist") == 1, r.out
    assert "Traceback" not in r.out


def test_launch_from_a_hostfile(hvdlm, tiny_job, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# this machine\nlocalhost slots=2\n")
    run_dir = tmp_path / "run"
    r = hvdlm(
        "launch", tiny_job, "--np", "2", "--hostfile", hostfile, "--run-dir", run_dir, "--set", "train.max_steps=2"
    )
    assert r.code == 0, r.out
    assert " -H localhost:2 " in r.out  # the launcher gets the hosts as parsed, not a file it may misread
    assert r.summary()["ranks"] == 2
