"""`hvdlm doctor`'s GPU checks, on a machine without GPUs: the verdicts are pure functions of what the probes and
tools printed (`horovodrun --check-build`, ldd, a ctypes load), so they are tested here with fake outputs, and the
real run on this CPU machine says each check is skipped and why."""

from __future__ import annotations

import sys

import pytest

from hvdlm.launch.doctor import (
    CUDA_CHECKS,
    _cuda_checks,
    check_build_check,
    cuda_toolkit_check,
    gpu_skip_reason,
    libcuda_check,
    nccl_library_check,
    ranks_per_gpu_check,
    ranks_per_node,
    report,
    tensor_operations,
)

CHECK_BUILD = """Horovod v0.28.1:

Available Frameworks:
    [ ] TensorFlow
    [X] PyTorch
    [ ] MXNet

Available Controllers:
    [X] MPI
    [X] Gloo

Available Tensor Operations:
    [{nccl}] NCCL
    [ ] DDL
    [ ] CCL
    [X] MPI
    [X] Gloo    
"""  # noqa: W291 - horovodrun prints the trailing blanks
LDD = """\tlinux-vdso.so.1 (0x00007ffd1d3f2000)
\tlibmpi.so.40 => /usr/lib/x86_64-linux-gnu/libmpi.so.40 (0x00007f0c9a000000)
{nccl}\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0c99c00000)
"""
GPU_TORCH = dict(version="2.11.0+cu130", cuda="13.0", gpus=1, names=["NVIDIA H200"], nccl="2.27.7")


def test_tensor_operations_reads_only_its_section():
    ops = tensor_operations(CHECK_BUILD.format(nccl=" "))
    assert ops == {"NCCL": False, "DDL": False, "CCL": False, "MPI": True, "Gloo": True}
    assert tensor_operations(CHECK_BUILD.format(nccl="X"))["NCCL"] is True
    assert tensor_operations("") == {}


def test_check_build_needs_nccl_when_cuda_is_present():
    assert check_build_check(CHECK_BUILD.format(nccl="X")).status == "ok"
    without = check_build_check(CHECK_BUILD.format(nccl=" "))
    assert without.status == "fail" and "built without NCCL" in without.detail and "Rebuild Horovod" in without.fix
    assert check_build_check(None).status == "fail"


def test_nccl_library_from_ldd():
    found = nccl_library_check(LDD.format(nccl="\tlibnccl.so.2 => /venv/nvidia/nccl/lib/libnccl.so.2 (0x1)\n"), True)
    assert found.status == "ok" and "/venv/nvidia/nccl/lib/libnccl.so.2" in found.detail
    missing = nccl_library_check(LDD.format(nccl="\tlibnccl.so.2 => not found\n"), True)
    assert missing.status == "fail" and "libnccl.so.2" in missing.detail and "LD_LIBRARY_PATH" in missing.fix
    assert nccl_library_check(LDD.format(nccl=""), True).status == "ok"  # NCCL linked statically
    assert nccl_library_check(LDD.format(nccl=""), False).status == "fail"  # no NCCL at all
    assert nccl_library_check(None, True).status == "warn"  # no ldd


def test_libcuda():
    assert libcuda_check("").status == "ok"
    bad = libcuda_check("libcuda.so.1: cannot open shared object file: No such file or directory")
    assert bad.status == "fail" and "cannot open" in bad.detail and "driver" in bad.fix


def test_cuda_toolkit():
    assert cuda_toolkit_check("/usr/local/cuda/bin/nvcc", "/usr/local/cuda", True).status == "ok"
    unset = cuda_toolkit_check("/usr/local/cuda/bin/nvcc", "", False)
    assert unset.status == "ok" and "make setup sets it" in unset.detail
    wrong = cuda_toolkit_check("/opt/cuda-13/bin/nvcc", "/usr/local/cuda-12", False)
    assert wrong.status == "warn" and "holds no bin/nvcc" in wrong.detail
    assert cuda_toolkit_check(None, "", False).status == "warn"


def test_ranks_per_node_against_visible_gpus():
    ok = ranks_per_gpu_check(2, 4, "Slurm's tasks per node")
    assert ok.status == "ok" and "cuda:0, cuda:1" in ok.detail
    too_many = ranks_per_gpu_check(4, 2, "Slurm's tasks per node")
    assert too_many.status == "fail" and "NCCL refuses" in too_many.fix
    assert ranks_per_gpu_check(2, 1, "launch.np's default").status == "warn"  # only a guess at the job


def test_ranks_per_node_source():
    assert ranks_per_node({"SLURM_NTASKS_PER_NODE": "4"}) == (4, "Slurm's tasks per node")
    assert ranks_per_node({"SLURM_TASKS_PER_NODE": "2(x3),1"})[0] == 2
    assert ranks_per_node({})[1].startswith("launch.np")


@pytest.mark.parametrize(
    "torch, reason",
    [
        (None, "torch does not import"),
        (dict(GPU_TORCH, cuda=None, gpus=0), "torch is CPU-only"),
        (dict(GPU_TORCH, gpus=0), "built for CUDA 13.0 but sees no GPU"),
        (GPU_TORCH, ""),
    ],
)
def test_gpu_skip_reason(torch, reason):
    assert (reason in gpu_skip_reason(torch)) if reason else gpu_skip_reason(torch) == ""


def test_this_cpu_machine_skips_the_gpu_checks_with_the_reason():
    checks = _cuda_checks(sys.executable, dict(GPU_TORCH, cuda=None, gpus=0), None)
    assert [c.name for c in checks] == list(CUDA_CHECKS) and {c.status for c in checks} == {"skip"}
    text = report(checks)
    assert "[skip] libcuda: no GPU: skipped (torch is CPU-only)" in text and "All checks passed." in text


def test_a_gpu_seen_with_this_machines_cpu_horovod_fails_where_it_should():
    """The impure half run for real (horovodrun --check-build, ldd, the ctypes load) with torch claiming a GPU:
    this machine's Horovod has no NCCL and there is no driver, so those checks fail with their fixes."""
    import horovod.torch.mpi_lib_v2 as lib

    hvd = dict(nccl=False, lib=lib.__file__)
    checks = {c.name: c for c in _cuda_checks(sys.executable, GPU_TORCH, hvd)}
    assert checks["horovodrun --check-build"].status == "fail"
    assert "built without NCCL" in checks["horovodrun --check-build"].detail
    assert checks["NCCL library"].status == "fail"
    assert checks["libcuda"].status in ("ok", "fail")  # "ok" only where a driver is installed without a GPU
    assert checks["ranks per node"].status in ("ok", "warn", "fail")
