"""A real one-node Slurm for the tests: Debian's slurm-wlm and munge, installed when missing (as root), daemons
started in the foreground from a temporary directory and stopped by their pids.

Nothing here touches the machine's own Slurm or munge configuration: the munge key, socket, slurm.conf, state
and logs all live in the temporary directory, on ports that were free, and clients find them through SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurm-client", "munge")
# A requeued job may start again only after the step credentials of its last start expired: cred_expire, 120 s by
# default (slurm.conf(5), AuthInfo). The tests' requeued jobs should not wait that long; Slurm refuses values < 5.
REQUEUE_DELAY_S = 10
# And once eligible, a pending job waits for the scheduler's next full pass over the queue (sched_interval, 60 s by
# default) unless an event (a submission, a job's end) starts one sooner.
SCHED_INTERVAL_S = 2
# Binaries each package brings; all must be there for the tests that need them.
CLIENT_TOOLS = ("scontrol", "srun", "sbatch")
CLUSTER_TOOLS = ("scontrol", "sbatch", "srun", "squeue", "slurmctld", "slurmd", "munged", "mungekey")


def _missing(tools: tuple[str, ...]) -> list[str]:
    # Daemons live in /usr/sbin, which a non-login root shell may lack on its PATH.
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in tools if not shutil.which(t, path=path)]


def ensure_installed(tools: tuple[str, ...]) -> str | None:
    """Install the Slurm and munge packages when tools are missing; returns why they cannot be had, or None."""
    missing = _missing(tools)
    if not missing:
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{', '.join(missing)} missing, and installing {' '.join(PACKAGES)} needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Wait for another apt (a developer's, unattended upgrades) instead of failing on its lock.
    install = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:  # a fresh machine's package lists may be missing or stale
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)  # then once more
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"apt-get could not install {' '.join(PACKAGES)}:\n{proc.stdout}\n{proc.stderr}")
    return None if not _missing(tools) else f"still missing after apt-get: {', '.join(_missing(tools))}"


def sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") or name


def minimal_conf(directory: Path) -> Path:
    """The smallest slurm.conf with which `scontrol show hostnames` works offline."""
    conf = directory / "slurm.conf"
    conf.write_text(
        "ClusterName=offline\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1 State=UNKNOWN\n"
        "PartitionName=debug Nodes=ALL Default=YES\n"
    )
    return conf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    directory: Path
    conf: Path
    node: str
    cpus: int
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float) -> str:
        """Wait until the job has ended; returns its final state (COMPLETED, FAILED, TIMEOUT, ...)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "UNKNOWN"):
                return state
            time.sleep(1)
        self.run("scancel", job_id)
        return f"still {self.job_state(job_id)} after {timeout:.0f} s (cancelled)"

    def logs(self) -> str:
        files = sorted([*self.directory.glob("*.log"), *self.directory.glob("*.out")])
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in files)

    def stop(self) -> None:
        """Stop the daemons this cluster started, by their pids: slurmd, slurmctld, munged."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def start_cluster(directory: Path) -> Cluster:
    """munged, slurmctld and slurmd in the foreground (children of this process), one node with this machine's
    cores; returns once the node accepts jobs."""
    node = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    for sub in ("state", "spool", "munge"):
        (directory / sub).mkdir(mode=0o700)
    key, munge_socket = directory / "munge" / "munge.key", directory / "munge" / "socket"
    subprocess.run([sbin("mungekey"), "--create", "--keyfile", str(key)], check=True, capture_output=True)
    conf = directory / "slurm.conf"
    conf.write_text(
        f"""ClusterName=hvdlmtest
SlurmctldHost={node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={REQUEUE_DELAY_S}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/slurmctld.log
SlurmdLogFile={directory}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SchedulerParameters=sched_interval={SCHED_INTERVAL_S}
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SlurmdTimeout=60
NodeName={node} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    cluster = Cluster(directory, conf, node, cpus)
    daemons = [
        [
            sbin("munged"),
            "--foreground",
            "--force",
            "--key-file",
            str(key),
            "--socket",
            str(munge_socket),
            "--pid-file",
            str(directory / "munge" / "munged.pid"),
            "--log-file",
            str(directory / "munged.log"),
            "--seed-file",
            str(directory / "munge" / "seed"),
        ],
        [sbin("slurmctld"), "-D", "-i", "-f", str(conf)],
        [sbin("slurmd"), "-D", "-f", str(conf)],
    ]
    try:
        for argv in daemons:
            out = open(directory / f"{Path(argv[0]).name}.out", "w")
            cluster.processes.append(subprocess.Popen(argv, env=cluster.env, stdout=out, stderr=subprocess.STDOUT))
            if argv[0].endswith("munged"):
                _wait_for(lambda: munge_socket.exists(), 30, "munged's socket", cluster)
        _wait_for(lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%T").stdout, 90, "an idle node", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(ready, timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        dead = [p.args[0] for p in cluster.processes if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited while waiting for {what}:\n{cluster.logs()}")
        time.sleep(0.5)
    raise RuntimeError(f"no {what} after {timeout} s:\n{cluster.logs()}")
