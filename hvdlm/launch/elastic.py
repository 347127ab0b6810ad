"""`hvdlm launch --elastic --min-np A --max-np B`: horovodrun's elastic mode with the Gloo controller, and the host
discovery script it polls (RUN_DIR/discover_hosts.sh), generated from the job's hosts: a hostfile is read again at
every poll (a host taken out of it is dropped), --hosts and this machine are fixed lists. The ranks' side is
hvdlm.training.elastic, whose docstring states the limits. Job preparation: no torch here.

What of horovodrun's elastic driver decides what hvdlm checks before it starts:
- Without --network-interface it finds the interface the workers share by comparing two hosts, and waits for a
  second host to come up (for ten minutes, with no worker started) when there is one: a job whose hosts are all
  this machine gets the loopback interface, and one on a single other host is refused (elastic_nic). The
  interface is chosen once, at the start: a host added to the hostfile later must be reachable on it.
- It blacklists the whole host of a failed worker and ends the job when every host is blacklisted: on one host
  the death of any worker ends the job, which `hvdlm launch` says before it starts (single_host_note), and after
  it with hvdlm.runfiles.WORKERS_LOST_EXIT_CODE.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from hvdlm.errors import InputError
from hvdlm.launch.commands import is_this_machine
from hvdlm.launch.hosts import LOCALHOST, Host, local_cores
from hvdlm.runfiles import WORKERS_LOST_EXIT_CODE

DISCOVERY_SCRIPT = "discover_hosts.sh"
# horovodrun's options that name fixed hosts: the discovery script replaces them.
_HOST_OPTIONS = ("-H", "--hosts", "--hostfile")
_NET = Path("/sys/class/net")
_ARPHRD_LOOPBACK = "772"  # a loopback device's /sys/class/net/NAME/type, from <linux/if_arp.h>


def check_elastic(launcher: str, controller: str, min_np: int | None, max_np: int, np: int) -> int:
    """The checked --min-np (default: np, no worker may be lost)."""
    if launcher != "horovodrun":
        raise InputError(
            f"--elastic runs horovodrun (Horovod's elastic driver), not {launcher}: use --launcher horovodrun."
        )
    if controller != "gloo":
        raise InputError(
            'Horovod elastic needs the Gloo controller, and launch.controller is "mpi": set launch.controller = '
            '"gloo" (--set launch.controller=gloo).'
        )
    low = np if min_np is None else min_np
    if not low <= np <= max_np:
        raise InputError(
            f"--elastic needs --min-np <= --np <= --max-np, got {low} <= {np} <= {max_np}: the job starts with --np "
            "workers and runs with any number in [min-np, max-np]."
        )
    return low


def elastic_nic(hosts: list[Host] | None, nic: str) -> str:
    """The network interface for horovodrun's --network-interface ("" lets it compare the hosts' own): the one
    asked for, else the loopback interface when every host is this machine."""
    if nic:
        return nic
    listed = hosts or [Host(LOCALHOST, 1)]
    if all(is_this_machine(h.name) for h in listed):
        return loopback_interface()
    if len({h.name for h in listed}) < 2:
        raise InputError(
            f"--elastic on the one host {listed[0].name} needs the network interface its workers use: horovodrun "
            "finds it only by comparing two hosts, and would wait ten minutes for a second one with no worker "
            "started. Give it with --nic IFACE (or launch.nic; `ip -brief address` on the host lists them)."
        )
    return ""


def loopback_interface() -> str:
    """This machine's loopback interface ("lo" on Linux), which reaches every worker when all run here."""
    try:
        names = sorted(entry.name for entry in _NET.iterdir())
    except OSError:  # no sysfs (a container without it): Linux's name
        return "lo"
    for name in names:
        try:
            if (_NET / name / "type").read_text().strip() == _ARPHRD_LOOPBACK:
                return name
        except OSError:
            continue
    return "lo"


def single_host_note(hosts: list[Host] | None) -> list[str]:
    """What an elastic job on one host cannot do, said before it starts (for standard error)."""
    names = {h.name for h in hosts or [Host(LOCALHOST, 1)]}
    if len(names) > 1:
        return []
    name = names.pop()
    # horovodrun tells hosts apart by name, so this machine under two names is two hosts to it.
    twice = " (this machine under two names: --hosts localhost:A,127.0.0.1:B)" if is_this_machine(name) else ""
    return [
        f"hvdlm launch: --elastic with one host ({name}): horovodrun drops the whole host of a failed worker, so the "
        f"death of any worker ends this job (exit {WORKERS_LOST_EXIT_CODE}). To survive one, give two or more hosts"
        f"{twice}, or use --max-restarts N, which starts the job again from its newest checkpoint."
    ]


def discovery_script(hosts: list[Host] | None, hostfile: str | None) -> str:
    """The script's text: one host:slots line per host, as horovodrun's --host-discovery-script expects."""
    if hostfile:
        read = (
            "import sys; from hvdlm.launch.hosts import read_hostfile; "
            "print('\\n'.join(f'{h.name}:{h.slots}' for h in read_hostfile(sys.argv[1])))"
        )
        line = f"exec {shlex.quote(sys.executable)} -c {shlex.quote(read)} {shlex.quote(str(Path(hostfile).resolve()))}"
    else:
        listed = hosts or [Host(LOCALHOST, local_cores())]
        line = "printf " + shlex.quote("".join(f"{h.name}:{h.slots}\\n" for h in listed))
    return f"#!/bin/sh\n# Written by hvdlm launch --elastic: the hosts horovodrun may use, host:slots.\n{line}\n"


def write_discovery_script(run_dir: Path, text: str) -> Path:
    path = Path(run_dir).resolve() / DISCOVERY_SCRIPT
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    except OSError as e:
        raise InputError(f"cannot write the host discovery script '{path}': {e.strerror or e}.") from None
    return path


def elastic_argv(argv: list[str], script: Path, min_np: int, max_np: int) -> list[str]:
    """horovodrun's argv with the fixed hosts replaced by the discovery script and the worker bounds."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _HOST_OPTIONS:
            i += 2
            continue
        out.append(argv[i])
        if argv[i] == "-np":
            out += [argv[i + 1], "--min-np", str(min_np), "--max-np", str(max_np)]
            out += ["--host-discovery-script", str(script)]
            i += 1
        i += 1
    return out


def refuse_unsupported(cfg) -> None:
    """What elastic cannot carry: layouts that need process sets, and state that is not in its commits."""
    p, t = cfg.parallel, cfg.train
    if p.tp > 1 or p.pp > 1:
        raise InputError(
            f"--elastic runs data-parallel jobs only, and this one has parallel.tp = {p.tp}, parallel.pp = {p.pp}: "
            "Horovod's process sets, which tensor and pipeline parallelism need, do not work under elastic (horovod "
            "issues #3501, #4021). Use --max-restarts N (restarts from checkpoints, on fewer replicas) instead."
        )
    unsupported = [
        ("train.ema_decay", t.ema_decay, "its state is not in elastic's commits"),
        ("train.local_sgd_interval", t.local_sgd_interval, "its state is not in elastic's commits"),
        ("train.zero", t.zero, "its optimizer slices are cut for one number of replicas"),
        ("train.spike_rollback", t.spike_rollback, "a rollback reloads a checkpoint, which elastic's commits miss"),
    ]
    for key, value, why in unsupported:
        if value:
            raise InputError(
                f"--elastic does not support {key} ({why}). Turn it off (0, false), or use --max-restarts N, which "
                "restarts from checkpoints that hold the whole state."
            )
