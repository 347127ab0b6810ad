"""The CLI as a user meets it: help, dry runs, and bad input (one clear error, exit 2, no traceback)."""

import sys
from pathlib import Path

import pytest
from helpers import assert_imports_nothing_heavy, hvdlm_argv, run_process


def test_help_works_as_command_and_module(hvdlm):
    script = str(Path(sys.executable).parent / "hvdlm")  # the console script installed beside this Python
    for argv in ([script, "--help"], hvdlm_argv("--help")):
        r = run_process(argv, split=True)
        assert r.code == 0, r.err
        assert "train" in r.out and "launch" in r.out


def test_launch_dry_run_prints_the_command_without_running_it(hvdlm, tiny_job, tmp_path):
    run_dir = tmp_path / "never"
    r = hvdlm("launch", str(tiny_job), "--np", "2", "--dry-run", "--run-dir", str(run_dir), "--set", "train.lr=1e-3")
    assert r.code == 0, r.out
    assert "mpirun -np 2 -H localhost:" in r.out
    assert f"-m hvdlm train {tiny_job} --run-dir {run_dir} --set train.lr=1e-3" in r.out
    assert "OMP_NUM_THREADS=" in r.out
    assert not run_dir.exists()


def test_launch_with_horovodrun_from_the_job_file(hvdlm, tiny_job, tmp_path):
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--set", "launch.launcher=horovodrun")
    assert r.code == 0, r.out
    assert "horovodrun -np 2 -H localhost:" in r.out and "--gloo" in r.out


def test_job_preparation_does_not_import_torch_or_horovod():
    assert_imports_nothing_heavy(["launch", "jobs/demo.toml", "--dry-run"], modules=("torch", "horovod"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["launch", "jobs/missing.toml", "--dry-run"], "job file 'jobs/missing.toml' does not exist"),
        (["train", "jobs/missing.toml"], "job file 'jobs/missing.toml' does not exist"),
        (["launch", "jobs/demo.toml", "--dry-run", "--set", "train.lrr=1"], "Did you mean 'lr'"),
        (["launch", "jobs/demo.toml", "--dry-run", "--set", "train.max_steps=many"], "must be int"),
        (["launch", "jobs/demo.toml", "--np", "3", "--hosts", "localhost:2", "--dry-run"], "3 ranks do not fit"),
        (["launch", "jobs/demo.toml", "--np", "512", "--dry-run"], "512 ranks do not fit"),
        (["launch", "jobs/demo.toml", "--hosts", "a:1", "--hostfile", "x", "--dry-run"], "not both"),
    ],
)
def test_bad_input_is_one_clear_error_with_exit_code_2(hvdlm, args, message):
    r = hvdlm(*args)
    assert r.code == 2, r.out
    assert message in r.out
    assert "Traceback" not in r.out
    assert r.out.startswith("Error: ")


def test_training_refuses_to_overwrite_a_run(hvdlm, tiny_job, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    r = hvdlm("train", str(tiny_job), "--run-dir", str(run_dir))
    assert r.code == 2, r.out
    assert "already holds a run" in r.out and "Traceback" not in r.out
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_progress_bar_when_someone_watches(hvdlm, tiny_job, tmp_path, monkeypatch):
    # `hvdlm launch` sets HVDLM_PROGRESS=1 when its own output is a terminal; the ranks' output is a pipe.
    monkeypatch.setenv("HVDLM_PROGRESS", "1")
    r = hvdlm("train", str(tiny_job), "--run-dir", str(tmp_path / "run"))
    assert r.code == 0, r.out
    assert "train: 100%|" in r.out and "8/8" in r.out
    assert "step      4 | loss" in r.out  # log lines still come through beside the bar


def test_no_progress_bar_in_logs(hvdlm, tiny_job, tmp_path, monkeypatch):
    monkeypatch.delenv("HVDLM_PROGRESS", raising=False)
    r = hvdlm("train", str(tiny_job), "--run-dir", str(tmp_path / "run"))
    assert r.code == 0, r.out
    assert "%|" not in r.out and "step      8 | loss" in r.out


def test_make_test_treats_an_empty_selection_as_success():
    # pytest exits 5 when nothing is selected; the README's test command must not call that a failure.
    r = run_process(
        ["make", "-s", "test", "PYTEST_ARGS=-k no_test_has_this_name -p no:cacheprovider"], timeout=600, split=True
    )
    assert r.code == 0, r.out + r.err
    assert "no tests selected" in r.out
