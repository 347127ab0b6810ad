"""What the job-preparation commands say, from the real CLI: the choice a person meant ("gpu" is train.device's
"cuda"), the file -o wrote, a run directory that is not there (issue 29's second sweep)."""

from __future__ import annotations


def test_a_device_called_gpu_is_taken_for_cuda(hvdlm, tiny_job):
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--set", "train.device=gpu")
    assert r.code == 2 and "got 'gpu'. Did you mean 'cuda'?" in r.out, r.out
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--set", "train.precision=bfloat16")
    assert r.code == 2 and "Did you mean 'bf16'?" in r.out, r.out


def test_hostfile_and_sbatch_say_which_file_they_wrote(hvdlm, tmp_path):
    hosts = tmp_path / "hosts"
    r = hvdlm("hostfile", "--from", "hosts", "a:2,b:4", "-o", str(hosts))
    assert r.code == 0 and r.out == f"wrote {hosts}: 2 host(s) with 6 slot(s), openmpi format\n", r.out
    script = tmp_path / "job.sbatch"
    r = hvdlm("sbatch", "jobs/demo.toml", "-o", str(script))
    assert r.code == 0 and script.read_text().startswith("#!"), r.out
    assert f"wrote {script}: the batch script; submit it with: sbatch {script}\n" in r.out, r.out
    r = hvdlm("hostfile", "--from", "hosts", "a:2", "-o", "-")  # a stream shows its own text
    assert r.out == "a slots=2\n", r.out


def test_export_of_a_run_directory_that_is_not_there(hvdlm, tmp_path):
    missing = tmp_path / "runs" / "nonexist"
    for out in ([], ["-o", str(tmp_path / "out")]):  # before a missing -o, too
        r = hvdlm("export", str(missing), *out)
        assert r.code == 2 and f"run directory '{missing}' does not exist" in r.out, r.out
        assert "Traceback" not in r.out and not (tmp_path / "out").exists()
