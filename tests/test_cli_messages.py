"""What the job-preparation commands say, from the real CLI: the choice a person meant ("gpu" is train.device's
"cuda"), the file -o wrote, a run directory that is not there (issue 29's second sweep)."""

from __future__ import annotations


def test_a_device_called_gpu_is_taken_for_cuda(hvdlm, tiny_job):
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--set", "train.device=gpu")
    assert r.code == 2 and "got 'gpu'. Did you mean 'cuda'?" in r.out, r.out
    r = hvdlm("launch", str(tiny_job), "--dry-run", "--set", "train.precision=bfloat16")
    assert r.code == 2 and "Did you mean 'bf16'?" in r.out, r.out
