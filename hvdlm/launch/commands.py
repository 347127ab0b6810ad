"""Launcher command lines as argv lists (shell-quoted only for display), and the environment ranks need.

Four launchers: Open MPI's mpirun, MPICH's (Hydra) mpirun, horovodrun, and srun. `build_command` is pure (the
launcher's executable, hosts and the caller's environment come in a CommandSpec), so the same code renders the
line of a batch script and the command `hvdlm launch` runs; `plan_launch` fills in this machine's facts.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvdlm.config import JobConfig, LaunchConfig, SlurmConfig, check_choice, choices
from hvdlm.devices import check_share_gpu
from hvdlm.errors import InputError
from hvdlm.launch.hosts import LOCALHOST, Host, local_cores, place_ranks
from hvdlm.launch.shared_memory import single_copy_works
from hvdlm.launch.shell import ENV_VAR, NAME, ShellVar, check_name, check_text, join

# Variables every rank needs to see; Open MPI forwards only the ones named with -x (when they are set).
_FORWARDED = (
    "PATH",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "OMP_NUM_THREADS",
    "HOROVOD_CYCLE_TIME",
    "HVDLM_PROGRESS",
    "HVDLM_CACHE",
)
# UCX_: the transport under Open MPI's UCX PML, which GPU ranks use for CUDA-aware MPI (see _openmpi_options).
_FORWARDED_PREFIXES = ("NCCL_", "HOROVOD_", "GLOO_", "UCX_")
# Open MPI refuses to start as root without both of these.
ROOT_VARIABLES = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


def root_env() -> dict[str, str]:
    """The variables this process's Open MPI programs (mpirun, an MPI child) need to start: ROOT_VARIABLES as root."""
    return dict(ROOT_VARIABLES) if os.geteuid() == 0 else {}


_LAUNCH_KEYS = {f.name for f in dataclasses.fields(LaunchConfig)}


@dataclass(init=False)
class LaunchOptions:
    """What shapes a launch beyond ranks and hosts: the job's [launch] section, and [slurm]'s choices for srun.

    It holds the two config sections themselves, so each setting is defined once, with its default and meaning,
    in hvdlm.config. Keywords set single keys: [launch]'s by name (mpi is launch.mpi), the others of [slurm] by
    theirs (slurm.ntasks_per_node also as tasks_per_node, the launch API's name for it). Without a job's
    [launch], nothing is added to Horovod's own settings (no cycle time).
    """

    launch: LaunchConfig
    slurm: SlurmConfig

    def __init__(self, launch: LaunchConfig | None = None, slurm: SlurmConfig | None = None, **keys: Any) -> None:
        if "tasks_per_node" in keys:
            keys["ntasks_per_node"] = keys.pop("tasks_per_node")
        srun = {k: keys.pop(k) for k in [*keys] if k not in _LAUNCH_KEYS}
        # Copies: a launch's choices (--mpi, --nic, -x) must not change the job's config.
        self.launch = dataclasses.replace(launch or LaunchConfig(cycle_time_ms=0.0), **keys)
        self.slurm = dataclasses.replace(slurm or SlurmConfig(), **srun)

    @classmethod
    def from_config(cls, cfg: JobConfig, **keys: Any) -> LaunchOptions:
        return cls(cfg.launch, cfg.slurm, **keys)

    @property
    def tasks_per_node(self) -> int:
        return self.slurm.ntasks_per_node

    def check(self) -> None:
        """Refuse values that would smuggle shell syntax into a command or a script."""
        la, sl = self.launch, self.slurm
        check_choice("MPI", la.mpi, choices(LaunchConfig, "mpi"))
        for what, value in (
            ("launch.nic", la.nic),
            ("slurm.mpi", sl.mpi),
            ("slurm.cpu_bind", sl.cpu_bind),
            ("slurm.gpu_bind", sl.gpu_bind),
        ):
            if value:
                check_name(what, value, NAME)
        for name in la.env:
            check_name("launch.env variable", name, ENV_VAR)
        for what, value in (("launch.timeline", la.timeline), ("launch.autotune_log", la.autotune_log)):
            if value:
                check_text(what, value)


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set on top of the caller's environment
    notes: list[str] = field(default_factory=list)  # what the user asked for and this launcher cannot do (stderr)

    def display(self) -> str:
        """A copy-pasteable shell line: the added variables, then the command."""
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env.items()] + [join(self.argv)])


def threads_per_rank(ranks_on_busiest_host: int, cores: int | None = None) -> int:
    """Cores per rank on a node, so that CPU ranks do not oversubscribe it."""
    return max(1, (cores or local_cores()) // max(1, ranks_on_busiest_host))


def find_executable(name: str) -> str:
    """A launcher from beside this Python first (horovodrun must match the Horovod that hvdlm imports, even in a
    venv that is not activated), else from the PATH (mpirun, srun)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        hint = {"srun": "srun exists where Slurm does: run this on a cluster node, inside an allocation."}.get(
            name, "Load your MPI (e.g. 'module load openmpi'), or run 'make setup' and use the hvdlm of .venv/bin."
        )
        raise InputError(f"'{name}' is not on the PATH. {hint}")
    return found


# The device kind of the ranks, which picks the launcher's tuning: CPU ranks share a node's cores, GPU ranks each
# drive a GPU and have cores to spare. Decided on the launching machine, which may be a login node without GPUs.
CPU, GPU = "cpu", "gpu"
# Horovod's cycle time that launch.cycle_time_ms defaults to: tuned for CPU ranks (see rank_env).
CPU_CYCLE_TIME_MS = LaunchConfig().cycle_time_ms
_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one entry per GPU the driver drives (a PCI address)


def visible_gpus(physical: int, cuda_visible_devices: str | None) -> int:
    """The GPUs a process started here sees: the machine's `physical` GPUs as CUDA_VISIBLE_DEVICES narrows them.

    CUDA reads the list up to its first invalid entry; empty, "-1" (or any negative) hides every GPU."""
    if cuda_visible_devices is None:
        return physical
    listed = 0
    for item in cuda_visible_devices.split(","):
        if not item.strip() or item.strip().startswith("-"):
            break
        listed += 1
    return min(physical, listed)


def count_nvidia_smi(text: str) -> int:
    """GPUs in `nvidia-smi -L` output ("GPU 0: NVIDIA H100 ... (UUID: GPU-...)"; MIG devices are indented)."""
    return sum(1 for line in text.splitlines() if line.startswith("GPU "))


def local_gpus() -> int:
    """NVIDIA GPUs this machine shows its processes, without importing torch (a launcher answers at once): the
    driver's /proc entries, else `nvidia-smi -L`, narrowed by CUDA_VISIBLE_DEVICES."""
    try:
        physical = sum(1 for _ in _NVIDIA_GPUS.iterdir())
    except OSError:  # no NVIDIA driver loaded, or a container without its /proc entries
        physical = 0
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                out = ""
            physical = count_nvidia_smi(out)
    return visible_gpus(physical, os.environ.get("CUDA_VISIBLE_DEVICES"))


def rank_device(train_device: str, launcher: str, gpus_here: int, gpus_per_node: int = 0) -> str:
    """CPU or GPU ranks, from the job's train.device ("auto" | "cuda" | "cpu") and what the launcher can see.

    "auto" is what the ranks will find: srun with slurm.gpus_per_node > 0 gives them GPUs; otherwise this
    machine's GPUs stand for the hosts' (a login node without GPUs that launches onto GPU nodes cannot know:
    train.device = "cuda" says so)."""
    if train_device in (CPU, "cuda"):
        return CPU if train_device == CPU else GPU
    if launcher == "srun" and gpus_per_node > 0:
        return GPU
    return GPU if gpus_here > 0 else CPU


def is_this_machine(name: str) -> bool:
    """Whether a host name in --hosts / a hostfile means the machine `hvdlm launch` runs on."""
    me = socket.gethostname()
    return name in (LOCALHOST, "127.0.0.1", "::1", me, me.split(".")[0])


def check_local_gpus(train_device: str, ranks_here: int, gpus_here: int, only_here: bool) -> None:
    """A GPU job (train.device = "cuda") needs a GPU for each rank this machine runs; refuse it before it starts.

    `only_here`: every host is this machine, so no GPU here means none anywhere."""
    if train_device != "cuda" or ranks_here <= gpus_here:
        return
    if gpus_here == 0:
        where = "the job runs only here" if only_here else f"{ranks_here} of its ranks would run here"
        raise InputError(
            f'train.device = "cuda" asks for GPUs, but this machine ({socket.gethostname()}) shows none (no NVIDIA '
            f"driver GPUs, or CUDA_VISIBLE_DEVICES hides them) and {where}. Run it on a GPU machine, give GPU "
            'hosts with --hosts / --hostfile, or train on CPUs with --set train.device=cpu (or "auto").'
        )
    raise InputError(
        f'train.device = "cuda" runs one rank per GPU, but {ranks_here} ranks would run on this machine, which '
        f"shows {gpus_here} GPU(s). Use --np {gpus_here} (or fewer slots here), or train on CPUs with --set "
        "train.device=cpu."
    )


def check_gpus_per_node(train_device: str, tasks_per_node: int, gpus_per_node: int, share: bool = False) -> None:
    """Batch jobs: GPU nodes hold one rank per GPU (NCCL refuses two ranks on one GPU; `share`: train.share_gpu
    lets them share); a GPU job needs GPUs."""
    if train_device == "cuda" and gpus_per_node == 0:
        raise InputError(
            'train.device = "cuda" asks for GPUs, but the job asks Slurm for none (slurm.gpus_per_node = 0). '
            'Give --gpus-per-node N, or train on CPUs with --set train.device=cpu (or "auto").'
        )
    if train_device != CPU and 0 < gpus_per_node < tasks_per_node and not share:
        raise InputError(
            f"--ntasks-per-node {tasks_per_node} is more than the {gpus_per_node} GPU(s) per node: hvdlm runs one "
            f"rank per GPU, and two ranks cannot share one (NCCL refuses it). Use --ntasks-per-node {gpus_per_node} "
            "or less, more --gpus-per-node, or CPU ranks with --set train.device=cpu."
        )


def check_tp_layout(
    tp: int, np: int, launcher: str, controller: str, ranks_per_node: int | None = None, pp: int = 1
) -> None:
    """Refuse rank layouts that tensor and pipeline parallelism cannot use, before anything starts.

    TP and pipeline stages need MPI between ranks (mpi4py carries the sharded layers' collectives and the stages'
    sends): horovodrun's Gloo controller starts ranks without any MPI, so their COMM_WORLD would hold one rank
    each. A job is pp x dp x tp ranks with the tp ranks of a replica's stage adjacent, so np must be a multiple of
    pp x tp, and where ranks per node are known, a multiple of tp, or a stage's layers would talk across nodes in
    every layer (stage boundaries may cross nodes: one message per micro-batch)."""
    if pp > 1:
        _check_pipeline_layout(pp, tp, np, launcher, controller)
    if tp <= 1:
        return
    if launcher == "horovodrun" and controller == "gloo":
        raise InputError(
            f"parallel.tp = {tp} needs an MPI launcher: the tensor-parallel layers talk through mpi4py, and "
            "horovodrun with the Gloo controller starts ranks without MPI. Use --launcher mpirun, srun "
            '(--mpi=pmix), or horovodrun with launch.controller = "mpi" (--set launch.controller=mpi).'
        )
    if np % tp:
        raise InputError(
            f"parallel.tp = {tp} does not divide the {np} ranks: a job is tp x dp ranks, tp per model replica. "
            f"Use a rank count that is a multiple of {tp} (--np {tp * max(1, np // tp)}), or change parallel.tp."
        )
    if ranks_per_node is not None and ranks_per_node % tp:
        raise InputError(
            f"parallel.tp = {tp} does not divide the {ranks_per_node} ranks per node: a replica's {tp} shards "
            f"would talk across nodes in every layer. Give a number of ranks per node that is a multiple of {tp}."
        )


def _check_pipeline_layout(pp: int, tp: int, np: int, launcher: str, controller: str) -> None:
    if launcher == "horovodrun" and controller == "gloo":
        raise InputError(
            f"parallel.pp = {pp} needs an MPI launcher: pipeline stages send activations through mpi4py, and "
            "horovodrun with the Gloo controller starts ranks without MPI. Use --launcher mpirun, srun "
            '(--mpi=pmix), or horovodrun with launch.controller = "mpi" (--set launch.controller=mpi).'
        )
    if np % (pp * tp):
        raise InputError(
            f"parallel.pp x parallel.tp = {pp} x {tp} = {pp * tp} does not divide the {np} ranks: a job is pp x dp x "
            f"tp ranks, every stage of every replica on tp ranks. Use a rank count that is a multiple of {pp * tp} "
            f"(--np {pp * tp * max(1, np // (pp * tp))}), or change parallel.pp."
        )


def cycle_time_ms(la: LaunchConfig, device: str) -> float:
    """Horovod's cycle time for these ranks; 0 keeps Horovod's default (1 ms).

    The default launch.cycle_time_ms (5 ms) is tuned for CPU ranks (see rank_env). GPU ranks keep Horovod's 1 ms:
    a GPU step is short and each cycle's wait delays the start of its allreduce, the overlap that NCCL exists
    for, while the polling costs only a core that a GPU rank has to spare. A value set apart from the default
    is the user's own and applies to either."""
    if device == GPU and la.cycle_time_ms == CPU_CYCLE_TIME_MS:
        return 0.0
    return la.cycle_time_ms


def rank_env(
    opts: LaunchOptions, launcher: str, threads: int | str, progress: bool = False, device: str = CPU
) -> dict[str, str]:
    """Variables every rank gets, whatever starts it; `device`: CPU or GPU ranks (rank_device)."""
    la = opts.launch
    env = {"OMP_NUM_THREADS": threads if isinstance(threads, str) else str(threads)}  # keeps a ShellVar
    # Each rank runs its compute threads plus Horovod's background thread, so CPU ranks share cores. Open MPI
    # busy-polls inside blocking calls unless told to yield, and Horovod's 1 ms default cycle makes that thread
    # negotiate (and spin) a thousand times a second; both steal the core from the math. Measured on 2 cores:
    # about 270 -> 195 ms per step of the demo model with 2 ranks (bench/log/RESULTS.md). GPU ranks do their math on
    # the GPU and get cores of their own (4 per rank in batch jobs): there, busy-polling answers MPI messages
    # (Horovod's negotiation, mpi4py's tensor-parallel collectives) sooner, and yielding would only add latency.
    if device == CPU:
        env["OMPI_MCA_mpi_yield_when_idle"] = "1"
    if launcher != "horovodrun":  # horovodrun takes these as options and sets them itself
        if cycle_time_ms(la, device):
            env["HOROVOD_CYCLE_TIME"] = f"{cycle_time_ms(la, device):g}"
        if la.fusion_threshold_mb:
            env["HOROVOD_FUSION_THRESHOLD"] = str(int(la.fusion_threshold_mb * 1024 * 1024))
        if la.timeline:
            env["HOROVOD_TIMELINE"] = la.timeline
        if la.autotune:
            env["HOROVOD_AUTOTUNE"] = "1"
            if la.autotune_log:
                env["HOROVOD_AUTOTUNE_LOG"] = la.autotune_log
    if la.nic:
        # One interface for everything: NCCL's and Gloo's sockets here, MPI's through the launcher's options.
        env["NCCL_SOCKET_IFNAME"] = la.nic
        env["GLOO_SOCKET_IFNAME"] = la.nic
        if launcher == "srun":  # no mpirun to pass -mca to: Open MPI ranks read their MCA parameters from here
            env["OMPI_MCA_btl_tcp_if_include"] = la.nic
    if progress:
        env["HVDLM_PROGRESS"] = "1"
    return env


@dataclass
class CommandSpec:
    """Everything `build_command` turns into a launcher's argv besides the LaunchOptions, given as values so
    that it stays pure: the same spec renders a batch script's launch line and the command `hvdlm launch` runs.

    np and hosts may be ShellVars, a batch script's variables filled at run time (hosts: host:slots,...).
    """

    launcher: str
    executable: str  # the launcher's path (find_executable), or its bare name in a batch script
    np: int | str
    program: list[str]
    # None (and no hostfile) lets the launcher find them (this machine, or the Slurm allocation).
    hosts: list[Host] | ShellVar | None = None
    hostfile: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # what rank_env set
    present: Collection[str] = ()  # the caller's variable names (which Open MPI's -x may forward)
    # Every rank on this machine, which forbids Open MPI's single-copy shared memory (hvdlm.launch.shared_memory).
    no_single_copy: bool = False
    device: str = CPU  # CPU or GPU ranks (rank_device)
    slurm_export: str | None = None  # the caller's SLURM_EXPORT_ENV (srun's --export when not given); None: unset


def build_command(spec: CommandSpec, opts: LaunchOptions) -> list[str]:
    """The launcher's argv.

    launch.env (-x NAME) reaches the ranks with every launcher, each in its own way (see env_notes for the
    names one cannot pass).
    """
    opts.check()
    check_choice("launcher", spec.launcher, choices(LaunchConfig, "launcher"))
    argv, hosts, hostfile = [spec.executable], spec.hosts, spec.hostfile
    if spec.launcher == "srun":
        srun = _srun_options(spec.np, hosts, hostfile, opts) + _srun_export(spec.slurm_export, opts, spec.env)
        return argv + srun + spec.program
    argv += ["-np", str(spec.np)] if not isinstance(spec.np, ShellVar) else ["-np", spec.np]
    if spec.launcher == "horovodrun":
        argv += ["--hostfile", hostfile] if hostfile else ["-H", _host_list(hosts)] if hosts else []
        return argv + _horovodrun_options(opts, spec.device) + spec.program
    if opts.launch.mpi == "mpich":
        argv += ["-f", hostfile] if hostfile else ["-hosts", _host_list(hosts)] if hosts else []
        return argv + _mpich_options(opts) + spec.program
    argv += ["--hostfile", hostfile] if hostfile else ["-H", _host_list(hosts)] if hosts else []
    return argv + _openmpi_options(opts, spec.env, spec.present, spec.no_single_copy, spec.device) + spec.program


def _mpich_options(opts: LaunchOptions) -> list[str]:
    la = opts.launch
    # Hydra passes the launcher's whole environment on by itself (-genvall is its default), so launch.env's
    # names reach the ranks when set. Named, that default is spelled out, so that a site's HYDRA_ENV cannot
    # narrow it; not -genvlist, which would pass only the listed names and drop PATH and the rest.
    argv = ["-genvall"] if la.env else []
    # Its -iface picks the network for MPI traffic.
    return argv + (["-iface", la.nic] if la.nic else [])


def _srun_export(slurm_export: str | None, opts: LaunchOptions, env: Mapping[str, str]) -> list[str]:
    """srun passes its whole environment to the tasks (--export=ALL, its default), launch.env's names and the rank
    variables included. A SLURM_EXPORT_ENV without ALL (e.g. set by `sbatch --export=NONE`) narrows that: the
    names the ranks need are then added to it."""
    if slurm_export is None or "ALL" in slurm_export.upper().split(","):
        return []
    kept = [n for n in slurm_export.split(",") if n and n.upper() not in ("NONE", "NIL")]
    wanted = [*kept, *env, *opts.launch.env]
    return ["--export=" + ",".join(dict.fromkeys(wanted))]


# Horovod: horovodrun hands its environment to every rank (Gloo: as VAR=value on each rank's command line, also
# over ssh; --mpi: an mpirun -x for each variable), except the names its runner's env.IGNORE_REGEXES drop.
_HOROVODRUN_DROPS = re.compile(r"BASH_FUNC_.*|OLDPWD|.*CUDA_VISIBLE_DEVICES|HOROVOD_SECRET_KEY")


def env_notes(launcher: str, opts: LaunchOptions) -> list[str]:
    """Why names in launch.env (-x) cannot reach the ranks under this launcher, one line each (for stderr)."""
    if launcher != "horovodrun":
        return []
    return [
        f"hvdlm launch: -x {name} is ignored for other hosts' ranks: horovodrun hands them every variable but this "
        "one, which it drops on purpose (ranks on this machine inherit it). Use mpirun or srun to pass it."
        for name in opts.launch.env
        if _HOROVODRUN_DROPS.fullmatch(name)
    ]


def _openmpi_options(
    opts: LaunchOptions, env: Mapping[str, str], present: Collection[str], no_single_copy: bool, device: str = CPU
) -> list[str]:
    la = opts.launch
    # One rank per slot, no pinning: a rank's torch threads need the cores that OMP_NUM_THREADS promises.
    argv = ["-bind-to", "none", "-map-by", "slot"]
    names = [n for n in _FORWARDED if n in env or n in present]
    names += sorted(n for n in {*env, *present} if n.startswith(_FORWARDED_PREFIXES) and n not in names)
    names += [n for n in la.env if n not in names]
    for name in names:
        argv += ["-x", name]
    if device == CPU:
        # ob1 with the TCP / shared-memory BTLs; the openib BTL is deprecated and warns or hangs on many clusters.
        argv += ["-mca", "pml", "ob1", "-mca", "btl", "^openib"]
    else:
        # GPU ranks: no forced PML, so that Open MPI picks UCX where it is built with it, and with UCX comes
        # CUDA-aware MPI (mpi4py's tensor-parallel collectives on GPU buffers, without a copy through the host;
        # ob1's TCP BTL cannot read GPU memory). Without UCX Open MPI falls back to ob1 by itself. Horovod's own
        # allreduce goes through NCCL either way. openib stays off for the reason above.
        argv += ["-mca", "btl", "^openib"]
    if la.nic:
        # MPI's data (btl) and Open MPI's own out-of-band channel (oob) on the chosen interface.
        argv += ["-mca", "btl_tcp_if_include", la.nic, "-mca", "oob_tcp_if_include", la.nic]
    if no_single_copy:
        # Open MPI would fail at the first large message instead of falling back to copying through a buffer.
        argv += ["-mca", "btl_vader_single_copy_mechanism", "none"]
    return argv


def _horovodrun_options(opts: LaunchOptions, device: str = CPU) -> list[str]:
    la = opts.launch
    # Horovod: with --mpi, horovodrun's mpirun forces `-mca pml ob1` itself (its runner's _OMPI_FLAGS), which GPU
    # ranks cannot change from here: for CUDA-aware MPI (tensor parallelism on GPUs) launch with mpirun or srun.
    argv = ["--gloo"] if la.controller == "gloo" else ["--mpi"]
    if la.nic:
        argv += ["--network-interface", la.nic]
    if cycle_time_ms(la, device):
        argv += ["--cycle-time-ms", f"{cycle_time_ms(la, device):g}"]
    if la.fusion_threshold_mb:
        argv += ["--fusion-threshold-mb", f"{la.fusion_threshold_mb:g}"]
    if la.timeline:
        argv += ["--timeline-filename", la.timeline]
    if la.autotune:
        argv += ["--autotune"] + (["--autotune-log-file", la.autotune_log] if la.autotune_log else [])
    return argv


def _srun_options(np: int | str, hosts: list[Host] | None, hostfile: str | None, opts: LaunchOptions) -> list[str]:
    if hostfile:
        raise InputError("srun takes its hosts from the Slurm allocation, not a hostfile: drop --hostfile.")
    sl = opts.slurm
    argv = [f"--mpi={sl.mpi}"]
    if not isinstance(np, ShellVar):  # in a batch script srun starts every task of the allocation by itself
        argv.append(f"--ntasks={np}")
    if sl.ntasks_per_node:
        argv.append(f"--ntasks-per-node={sl.ntasks_per_node}")
    if hosts:
        argv.append("--nodelist=" + ",".join(h.name for h in hosts))
    if sl.gpus_per_node:
        argv.append(f"--gpus-per-node={sl.gpus_per_node}")
    if sl.cpu_bind:
        argv.append(f"--cpu-bind={sl.cpu_bind}")
    if sl.gpu_bind:
        argv.append(f"--gpu-bind={sl.gpu_bind}")
    return argv


@dataclass
class LaunchRequest:
    """What `plan_launch` is asked to start: `np` ranks of `program` under `launcher`, here or on the given hosts.

    `hosts` is None for this machine alone (srun: the allocation); with `hostfile` (a file already in the
    launcher's own format), `hosts` holds what it lists (for the slot check) and the launcher is handed the file.
    `hvdlm launch --hostfile` does not pass its file on: it reads any of the formats read_hostfile accepts, which
    no launcher reads in full, and hands the launcher the parsed hosts instead (-H / -hosts).
    """

    launcher: str
    np: int
    program: list[str]
    hosts: list[Host] | None = None
    hostfile: str | None = None
    threads: int = 0  # OMP_NUM_THREADS per rank; 0: this machine's cores shared by its ranks
    progress: bool = False  # rank 0 draws a progress bar (a person watches the launcher's output)
    tp: int = 1  # parallel.tp: the rank layout must hold whole tensor-parallel groups
    pp: int = 1  # parallel.pp: ... and whole pipelines
    train_device: str = CPU  # the job's train.device ("auto" | "cuda" | "cpu"); CPU ranks when left out
    share_gpu: bool = False  # train.share_gpu: ranks may share a GPU (one replica, no NCCL), checked here

    @classmethod
    def from_config(cls, cfg: JobConfig, launcher: str, np: int, program: list[str], **keys: Any) -> LaunchRequest:
        """The job's ranks: its train.threads, parallel.tp and train.device; `keys` set the other fields."""
        return cls(
            launcher,
            np,
            program,
            threads=cfg.train.threads,
            tp=cfg.parallel.tp,
            pp=cfg.parallel.pp,
            train_device=cfg.train.device,
            share_gpu=cfg.train.share_gpu,
            **keys,
        )


def plan_launch(request: LaunchRequest, options: LaunchOptions | None = None, gpus: int | None = None) -> LaunchPlan:
    """The full command for the request, with this machine's facts filled in: the launcher's path, the cores
    per rank, the GPUs, the caller's environment.

    `options` is the job's [launch] and [slurm] (None: Horovod's own settings). `gpus` is this machine's visible
    GPUs (None: look, when the job's train.device needs it); with train.device it chooses CPU or GPU tuning
    (rank_device), and a "cuda" job that this machine's GPUs cannot hold is refused before anything starts.
    """
    opts = options or LaunchOptions()
    launcher, np, hosts, local = request.launcher, request.np, request.hosts, request.hosts is None
    check_choice("launcher", launcher, choices(LaunchConfig, "launcher"))
    check_tp_layout(request.tp, np, launcher, opts.launch.controller, pp=request.pp)
    per_host, cores = _ranks_per_host(request, opts)
    if not local:  # slots fill in host order: each host's share of the ranks must hold whole TP groups
        for count in per_host:
            if count:
                check_tp_layout(request.tp, np, launcher, opts.launch.controller, ranks_per_node=count)
    kind = _check_devices(request, opts, per_host, gpus)
    threads = request.threads or threads_per_rank(max(per_host), cores)
    env = rank_env(opts, launcher, threads, request.progress, kind)
    if launcher != "srun":  # srun starts the ranks without Open MPI's launcher
        env.update(root_env())
    spec = CommandSpec(
        launcher,
        find_executable(launcher),
        np,
        request.program,
        hosts=hosts if launcher == "srun" else hosts or [Host(LOCALHOST, local_cores())],
        hostfile=request.hostfile,
        env=env,
        present=os.environ.keys(),
        no_single_copy=local and not single_copy_works(),
        device=kind,
        slurm_export=os.environ.get("SLURM_EXPORT_ENV"),
    )
    return LaunchPlan(argv=build_command(spec, opts), env=env, notes=env_notes(launcher, opts))


def _ranks_per_host(request: LaunchRequest, opts: LaunchOptions) -> tuple[list[int], int | None]:
    """How many of the ranks each host runs, and the cores of a node when Slurm says (None: this machine's)."""
    if request.launcher == "srun":
        local = request.hosts is None
        per_host = [opts.slurm.ntasks_per_node or request.np] if local else place_ranks(request.hosts, request.np)
        return per_host, int(os.environ.get("SLURM_CPUS_ON_NODE", "0")) or None
    return place_ranks(request.hosts or [Host(LOCALHOST, local_cores())], request.np), None


def _check_devices(request: LaunchRequest, opts: LaunchOptions, per_host: list[int], gpus: int | None) -> str:
    """CPU or GPU ranks (rank_device); refuses a GPU job whose ranks here this machine's GPUs cannot hold."""
    device, launcher = request.train_device, request.launcher
    gpus_here = (local_gpus() if gpus is None else gpus) if device != CPU else 0
    kind = rank_device(device, launcher, gpus_here, opts.slurm.gpus_per_node)
    if request.share_gpu:  # the job's ranks may share this machine's GPUs: only their layout is checked
        check_share_gpu(request.np // (request.tp * request.pp))
        return kind
    if launcher != "srun":  # srun's ranks run on the allocation's nodes, whose GPUs Slurm hands out
        placed = list(zip(request.hosts or [Host(LOCALHOST, 0)], per_host))
        here = sum(count for host, count in placed if is_this_machine(host.name))
        check_local_gpus(device, here, gpus_here, only_here=all(is_this_machine(h.name) for h, _ in placed))
    return kind


# Linux refuses a single argument longer than 128 KiB (MAX_ARG_STRLEN) when it starts a program.
_MAX_ARGUMENT = 128 * 1024 - 1


def _host_list(hosts: list[Host] | ShellVar) -> str:
    if isinstance(hosts, ShellVar):  # a batch script's variable, filled at run time
        return hosts
    text = ",".join(f"{h.name}:{h.slots}" for h in hosts)
    if len(text) > _MAX_ARGUMENT:
        raise InputError(
            f"the {len(hosts)} hosts make a host list of {len(text)} characters, more than Linux passes in one "
            "argument (128 KiB). Start the launcher yourself with a hostfile in its format (hvdlm hostfile -o)."
        )
    return text
