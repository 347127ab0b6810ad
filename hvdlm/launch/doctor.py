"""`hvdlm doctor`: is this environment able to train with Horovod and MPI, and if not, what to do about it.

The probes that import horovod, mpi4py or torch run in a child interpreter, one at a time, so a broken library
(a missing libmpi.so, a Horovod built against another torch) becomes one failed check with its fix, not a crash.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hvdlm.launch.commands import root_env

# Each probe prints one JSON object on its last line of output.
_HOROVOD_PROBE = """
import json, horovod.torch as hvd
info = dict(version=__import__("horovod").__version__, mpi=hvd.mpi_built(), gloo=hvd.gloo_built(),
            nccl=bool(hvd.nccl_built()), cuda=hvd.cuda_built(), ddl=hvd.ddl_built(), ccl=hvd.ccl_built(),
            lib=hvd.mpi_lib_v2.__file__ if hasattr(hvd, "mpi_lib_v2") else "")
hvd.init()
mpi = hvd.mpi_enabled()
info.update(size=hvd.size(), mpi_enabled=mpi, threads=hvd.mpi_threads_supported() if mpi else None)
print(json.dumps(info))
"""
_MPI4PY_PROBE = """
import json, mpi4py
mpi4py.rc.initialize = False
from mpi4py import MPI
MPI.Init_thread(MPI.THREAD_MULTIPLE)
levels = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled", MPI.THREAD_SERIALIZED: "serialized",
          MPI.THREAD_MULTIPLE: "multiple"}
info = dict(version=mpi4py.__version__, library=MPI.Get_library_version().strip().splitlines()[0].split(",")[0],
            thread=levels.get(MPI.Query_thread(), "?"), lib=MPI.__file__)
MPI.Finalize()
print(json.dumps(info))
"""
_TORCH_PROBE = """
import json, torch
info = dict(version=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
            names=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None)
print(json.dumps(info))
"""


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" or "fail"
    detail: str
    fix: str = ""


def _probe(python: str, code: str) -> tuple[dict | None, str]:
    """Run `code` in a child `python` as one rank; returns (its JSON, or None, and its last error line)."""
    env = {**os.environ}
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")  # containers forbid ptrace
    env.update(root_env())  # mpi4py and Horovod start Open MPI in the child
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1]), ""
        except json.JSONDecodeError:
            pass
    errors = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return None, errors[-1] if errors else f"exit code {proc.returncode}"


def _linked_mpi(shared_object: str) -> str | None:
    """The libmpi a compiled module loads (its real path), from ldd."""
    if not shared_object or not shutil.which("ldd"):
        return None
    out = subprocess.run(["ldd", shared_object], capture_output=True, text=True).stdout
    # libmpi.so (Open MPI, Intel MPI) or libmpich.so; not libmpi_cxx and other companions.
    m = re.search(r"\blib(?:mpi|mpich)\.so[.\d]*\s+=>\s+(\S+)", out)
    return os.path.realpath(m.group(1)) if m else None


REBUILD = "Rebuild Horovod: delete ~/.cache/hvdlm/wheels and .venv, then run 'make setup'."
MPI4PY_REBUILD = (
    "Rebuild mpi4py against that MPI: pip install --no-binary mpi4py --force-reinstall mpi4py, with the MPI's "
    "mpicc first on the PATH (load your MPI module first)."
)


def run_checks(python: str) -> list[Check]:
    # The probes are independent child processes: run them side by side (each takes seconds to import torch).
    with ThreadPoolExecutor(max_workers=3) as pool:
        probes = [pool.submit(_probe, python, code) for code in (_HOROVOD_PROBE, _MPI4PY_PROBE, _TORCH_PROBE)]
        (hvd, hvd_error), (mpi, mpi_error), (torch, torch_error) = (p.result() for p in probes)
    return [
        *_horovod_checks(hvd, hvd_error),
        *_mpi4py_checks(mpi, mpi_error),
        *_same_mpi_checks(hvd, mpi),
        *_gpu_checks(torch, torch_error, hvd),
        *_launcher_checks(python),
    ]


def _horovod_checks(hvd: dict | None, error: str) -> list[Check]:
    if hvd is None:
        return [Check("horovod", "fail", f"cannot import or start horovod.torch: {error}", REBUILD)]
    controllers = [c.upper() for c in ("mpi", "gloo") if hvd[c]]
    ops = [n.upper() for n in ("mpi", "gloo", "nccl", "ddl", "ccl") if hvd[n]]
    complete = hvd["mpi"] and hvd["gloo"]
    detail = (
        f"Horovod {hvd['version']}: frameworks PyTorch; controllers {', '.join(controllers) or 'none'}; "
        f"tensor operations {', '.join(ops) or 'none'}"
    )
    checks = [
        Check(
            "horovod build",
            "ok" if complete else "fail",
            detail,
            "" if complete else REBUILD + " (MPI needs its headers: libopenmpi-dev)",
        )
    ]
    if hvd.get("threads") is False:
        fix = "Use an MPI built with thread support (Open MPI >= 3 is), or horovodrun's Gloo controller."
        checks.append(Check("MPI threads", "fail", "Horovod's MPI lacks MPI_THREAD_MULTIPLE", fix))
    elif hvd.get("threads"):
        checks.append(Check("MPI threads", "ok", "Horovod's MPI supports MPI_THREAD_MULTIPLE"))
    return checks


def _mpi4py_checks(mpi: dict | None, error: str) -> list[Check]:
    if mpi is None:
        return [Check("mpi4py", "fail", f"cannot import or start mpi4py: {error}", MPI4PY_REBUILD)]
    detail = f"mpi4py {mpi['version']} on {mpi['library']}; thread level {mpi['thread']}"
    if mpi["thread"] != "multiple":
        return [Check("mpi4py", "warn", detail, "Use an MPI built with thread support (MPI_THREAD_MULTIPLE).")]
    return [Check("mpi4py", "ok", detail)]


def _same_mpi_checks(hvd: dict | None, mpi: dict | None) -> list[Check]:
    """Two MPI libraries in one process crash or deadlock in MPI_Init; the tensor-parallel layers need both."""
    if not (hvd and mpi):
        return []
    a, b = _linked_mpi(hvd.get("lib", "")), _linked_mpi(mpi.get("lib", ""))
    if a and b and a != b:
        return [Check("one MPI", "fail", f"Horovod loads {a} but mpi4py loads {b}", MPI4PY_REBUILD)]
    if a and b:
        return [Check("one MPI", "ok", f"Horovod and mpi4py both load {a}")]
    return [Check("one MPI", "warn", "could not tell which libmpi Horovod and mpi4py load (no ldd?)")]


def _gpu_checks(torch: dict | None, error: str, hvd: dict | None) -> list[Check]:
    if torch is None:
        return [Check("torch", "fail", f"cannot import torch: {error}", "Run 'make setup'.")]
    if not torch["gpus"]:
        cuda = f"torch {torch['version']} is built for CUDA {torch['cuda']}" if torch["cuda"] else "torch is CPU-only"
        fix = (
            "Expected on a login or CPU node. On a GPU node: check CUDA_VISIBLE_DEVICES and the driver "
            "(nvidia-smi), and install a CUDA build of torch (TORCH_SPEC=...)."
        )
        return [Check("GPUs", "warn", f"no GPU visible ({cuda}): ranks train on CPU cores", fix)]
    names = ", ".join(torch["names"])
    checks = [Check("GPUs", "ok", f"{torch['gpus']} GPU(s): {names}; CUDA {torch['cuda']}; NCCL {torch['nccl']}")]
    if hvd and not hvd["nccl"]:
        detail = "GPUs are present but Horovod was built without NCCL: gradients would go through host memory"
        checks.append(Check("NCCL", "fail", detail, REBUILD + " (with CUDA's nvcc on the PATH)"))
    elif hvd:
        checks.append(Check("NCCL", "ok", "Horovod uses NCCL for GPU allreduce"))
    return checks


def _launcher_checks(python: str) -> list[Check]:
    checks = []
    for name, needed, fix in (
        ("mpirun", True, "Load your MPI (module load openmpi) or apt-get install openmpi-bin."),
        ("horovodrun", True, "Run 'make setup' and use .venv/bin (horovodrun comes with Horovod)."),
        ("srun", False, "Only on Slurm clusters: fine to lack elsewhere."),
        ("sbatch", False, "Only on Slurm clusters: fine to lack elsewhere."),
    ):
        path = shutil.which(name, path=os.path.dirname(python)) or shutil.which(name)
        if path:
            checks.append(Check(f"launcher {name}", "ok", path))
        else:
            checks.append(Check(f"launcher {name}", "fail" if needed else "warn", "not found", fix))
    return checks


def report(checks: list[Check]) -> str:
    mark = {"ok": "[ok]  ", "warn": "[warn]", "fail": "[FAIL]"}
    lines = []
    for c in checks:
        lines.append(f"{mark[c.status]} {c.name}: {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"       fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    lines.append(f"{failed} problem(s) found." if failed else "All checks passed.")
    return "\n".join(lines)
