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
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from hvdlm.config import LaunchConfig
from hvdlm.devices import choose_device
from hvdlm.errors import InputError
from hvdlm.launch.commands import root_env
from hvdlm.launch.shared_memory import single_copy_works

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
# The NVIDIA driver's library, which CUDA (and Horovod's GPU ops, which dlopen it) load at run time; the CUDA
# toolkit alone (a build node) has only a stub. Loaded in the child, like the other probes: nothing here starts
# CUDA, but a broken driver install must not take the doctor down.
_LIBCUDA_PROBE = """
import ctypes, json
try:
    ctypes.CDLL("libcuda.so.1")
    error = ""
except OSError as e:
    error = str(e)
print(json.dumps(dict(error=error)))
"""


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn", "fail", or "skip" (not applicable here, with the reason)
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
        *_cuda_checks(python, torch, hvd),
        *_launcher_checks(python),
        shared_memory_check(single_copy_works()),
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


# The checks a GPU machine gets beyond torch's view of its GPUs (_cuda_checks), in report order.
CUDA_CHECKS = ("CUDA toolkit", "horovodrun --check-build", "libcuda", "NCCL library", "ranks per node")


def _cuda_checks(python: str, torch: dict | None, hvd: dict | None) -> list[Check]:
    """What a GPU rank needs beyond torch seeing GPUs: the toolkit Horovod builds with, Horovod's NCCL as its
    runner reports it, the driver library, the NCCL library Horovod links, and a GPU for each rank of a node."""
    reason = gpu_skip_reason(torch)
    if reason:
        return [Check(name, "skip", f"no GPU: skipped ({reason})") for name in CUDA_CHECKS]
    nvcc = _find_nvcc()
    home = os.environ.get("CUDA_HOME", "")
    libcuda, libcuda_error = _probe(python, _LIBCUDA_PROBE)
    ranks, source = ranks_per_node(os.environ)
    return [
        cuda_toolkit_check(nvcc, home, os.path.isfile(os.path.join(home, "bin", "nvcc")) if home else False),
        check_build_check(_check_build_text(python)),
        libcuda_check(libcuda["error"] if libcuda else libcuda_error),
        nccl_library_check(_ldd(hvd.get("lib", "")) if hvd else None, bool(hvd and hvd["nccl"])),
        ranks_per_gpu_check(ranks, torch["gpus"], source),
    ]


def gpu_skip_reason(torch: dict | None) -> str:
    """Why the GPU checks do not apply to this machine ("" when they do)."""
    if torch is None:
        return "torch does not import"
    if not torch["cuda"]:
        return "torch is CPU-only"
    if not torch["gpus"]:
        return f"torch is built for CUDA {torch['cuda']} but sees no GPU"
    return ""


def _find_nvcc() -> str | None:
    """nvcc as Horovod's build looks for it: CUDA_HOME's, the PATH's, then the usual install place."""
    home = os.environ.get("CUDA_HOME", "")
    for candidate in [os.path.join(home, "bin", "nvcc") if home else "", shutil.which("nvcc") or ""]:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None


def cuda_toolkit_check(nvcc: str | None, cuda_home: str, home_has_nvcc: bool) -> Check:
    """nvcc and CUDA_HOME: what building Horovod with NCCL needs (a built Horovod runs without them)."""
    if not nvcc:
        return Check(
            "CUDA toolkit",
            "warn",
            "no nvcc (CUDA_HOME, PATH, /usr/local/cuda): Horovod cannot be rebuilt with NCCL here",
            "Load the CUDA toolkit (module load cuda) or install it, and set CUDA_HOME to its directory.",
        )
    if cuda_home and not home_has_nvcc:
        return Check(
            "CUDA toolkit",
            "warn",
            f"CUDA_HOME={cuda_home} holds no bin/nvcc (nvcc found at {nvcc})",
            f"Set CUDA_HOME to the toolkit that holds {nvcc} (its bin/ directory's parent).",
        )
    if not cuda_home:
        # A wrapper nvcc (conda, Spack, modules) leaves torch guessing the toolkit's home (/usr/local/cuda).
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        return Check(
            "CUDA toolkit",
            "ok",
            f"nvcc at {nvcc}; CUDA_HOME unset (make setup sets it and HOROVOD_CUDA_HOME to {home})",
        )
    return Check("CUDA toolkit", "ok", f"nvcc at {nvcc}; CUDA_HOME={cuda_home}")


def _check_build_text(python: str) -> str | None:
    """`horovodrun --check-build` of the Horovod beside `python` (None when it cannot be run)."""
    horovodrun = shutil.which("horovodrun", path=os.path.dirname(python)) or shutil.which("horovodrun")
    if not horovodrun:
        return None
    try:
        proc = subprocess.run([horovodrun, "--check-build"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def tensor_operations(check_build: str) -> dict[str, bool]:
    """The "Available Tensor Operations" of `horovodrun --check-build` output, as {"NCCL": True, ...}.

    Only that section: MPI and Gloo appear among the controllers too."""
    ops: dict[str, bool] = {}
    section = False
    for line in check_build.splitlines():
        if line.strip().endswith(":"):
            section = line.strip() == "Available Tensor Operations:"
            continue
        m = re.fullmatch(r"\s*\[([ X])\]\s+(\S+)\s*", line)
        if section and m:
            ops[m.group(2)] = m.group(1) == "X"
    return ops


def check_build_check(check_build: str | None) -> Check:
    """Horovod's runner must show `[X] NCCL`: without it a GPU job's gradients go through host memory."""
    name = "horovodrun --check-build"
    if check_build is None:
        return Check(name, "fail", "horovodrun --check-build could not be run", REBUILD)
    if tensor_operations(check_build).get("NCCL"):
        return Check(name, "ok", "shows [X] NCCL")
    detail = "shows [ ] NCCL: this Horovod was built without NCCL although CUDA is present"
    return Check(name, "fail", detail, REBUILD + " (with CUDA's nvcc found: set CUDA_HOME)")


def libcuda_check(error: str) -> Check:
    if not error:
        return Check("libcuda", "ok", "the driver's libcuda.so.1 loads")
    return Check(
        "libcuda",
        "fail",
        f"libcuda.so.1 does not load ({error}): GPU ranks cannot start CUDA",
        "Install the NVIDIA driver (its libcuda.so.1), or add its directory to LD_LIBRARY_PATH; a CUDA toolkit's "
        "stubs/libcuda.so does not run anything.",
    )


def _ldd(shared_object: str) -> str | None:
    if not shared_object or not shutil.which("ldd"):
        return None
    try:
        return subprocess.run(["ldd", shared_object], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def nccl_library_check(ldd_output: str | None, nccl_built: bool) -> Check:
    """Horovod's torch extension (horovod/torch/mpi_lib_v2*.so) must find libnccl.so.2 by itself, not only when
    torch happened to load NCCL first."""
    name = "NCCL library"
    if ldd_output is None:
        return Check(name, "warn", "could not run ldd on Horovod's torch extension")
    m = re.search(r"^\s*(libnccl\.so[.\d]*)\s+=>\s+(.+?)(?:\s+\(0x[0-9a-f]+\))?\s*$", ldd_output, re.MULTILINE)
    if m and m.group(2) == "not found":
        return Check(
            name,
            "fail",
            f"Horovod's torch extension needs {m.group(1)}, which the loader does not find",
            REBUILD + " (setup.sh links pip's NCCL with an rpath); or add the NCCL lib directory (e.g. "
            "site-packages/nvidia/nccl/lib) to LD_LIBRARY_PATH.",
        )
    if m:
        return Check(name, "ok", f"Horovod's torch extension loads {m.group(1)} from {m.group(2)}")
    if nccl_built:
        return Check(name, "ok", "Horovod's torch extension holds NCCL (statically linked)")
    return Check(name, "fail", "Horovod's torch extension links no NCCL", REBUILD + " (with CUDA's nvcc found)")


def ranks_per_node(env: Mapping[str, str]) -> tuple[int, str]:
    """The ranks a node will run: Slurm's tasks per node inside a job, else launch.np's default (the demo's)."""
    m = re.match(r"[0-9]+", env.get("SLURM_NTASKS_PER_NODE", "") or env.get("SLURM_TASKS_PER_NODE", ""))
    if m and int(m.group()) > 0:
        return int(m.group()), "Slurm's tasks per node"
    return LaunchConfig().np, "launch.np's default, as `make demo` runs"


def ranks_per_gpu_check(ranks: int, visible: int, source: str) -> Check:
    """One GPU per rank, as the ranks will choose them (hvdlm.devices.choose_device, without the node's
    exchange of GPU identities: ranks narrowed to their own GPU each see one, which this process cannot see)."""
    name = "ranks per node"
    try:
        devices = [choose_device(r, ranks, visible, gpus_required=True).name for r in range(ranks)]
    except InputError as e:
        # Slurm's count is the job's; launch.np's default only a guess at what will be run here.
        status = "fail" if source.startswith("Slurm") else "warn"
        return Check(name, status, f"{ranks} rank(s) per node ({source}) on {visible} visible GPU(s)", str(e))
    return Check(name, "ok", f"{ranks} rank(s) per node ({source}): {', '.join(devices)}")


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


def shared_memory_check(works: bool) -> Check:
    """Whether ranks here may read each other's memory (hvdlm.launch.shared_memory): Open MPI's single copy."""
    if works:
        return Check(
            "shared memory", "ok", "ranks on this machine may read each other's memory (Open MPI's single copy)"
        )
    return Check(
        "shared memory",
        "warn",
        "ranks on this machine may not read each other's memory (cross-memory attach): `hvdlm launch` turns Open "
        "MPI's single copy off, so a large message between them is copied twice and a posted send waits for its "
        "sender's next MPI call",
        "In a container: allow process_vm_readv (docker run --cap-add SYS_PTRACE); on a host: sysctl "
        "kernel.yama.ptrace_scope=0. Training works without it, a little slower.",
    )


def report(checks: list[Check]) -> str:
    mark = {"ok": "[ok]  ", "warn": "[warn]", "fail": "[FAIL]", "skip": "[skip]"}
    lines = []
    for c in checks:
        lines.append(f"{mark[c.status]} {c.name}: {c.detail}")
        if c.fix and c.status in ("warn", "fail"):
            lines.append(f"       fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    lines.append(f"{failed} problem(s) found." if failed else "All checks passed.")
    return "\n".join(lines)
