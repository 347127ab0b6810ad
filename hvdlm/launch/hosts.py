"""Hosts with slot counts, from a `--hosts` string or a hostfile, and the placement of ranks on them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hvdlm.errors import InputError

LOCALHOST = "localhost"
_HOSTNAME = re.compile(r"^[A-Za-z0-9_.\-\[\]]+$")


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def local_cores() -> int:
    """Cores this process may run on (respects cgroup/affinity limits, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parse_hosts(spec: str) -> list[Host]:
    """'node1:4,node2:4' (slots default to 1 when omitted) -> hosts."""
    hosts = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise InputError(f"--hosts '{spec}' has an empty entry. Write host:slots pairs separated by commas.")
        name, _, slots = item.partition(":")
        hosts.append(_host(name, slots or "1", f"--hosts entry '{item}'"))
    return _unique(hosts, "--hosts")


def read_hostfile(path: str | Path) -> list[Host]:
    """Open MPI ('host slots=N'), MPICH ('host:N') or bare 'host' lines; blank lines and # comments allowed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"hostfile '{path}' does not exist. Pass an existing file, or use --hosts host:slots,...")
    hosts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\S+)(?:\s+max[-_]slots\s*=\s*\S+)?", line)
        if m:
            hosts.append(_host(m.group(1), m.group(2), where))
        elif re.fullmatch(r"\S+", line):
            name, _, slots = line.partition(":")
            hosts.append(_host(name, slots or "1", where))
        else:
            raise InputError(f"{where}: cannot read '{line}'. Write 'host slots=N', 'host:N' or 'host'.")
    if not hosts:
        raise InputError(f"hostfile '{path}' names no hosts. Add lines such as 'node1 slots=4'.")
    return _unique(hosts, str(path))


def _host(name: str, slots: str, where: str) -> Host:
    if not _HOSTNAME.match(name):
        raise InputError(f"{where}: '{name}' is not a valid host name.")
    if not slots.isdigit() or int(slots) <= 0:
        raise InputError(f"{where}: slots must be a positive whole number, got '{slots}'.")
    return Host(name, int(slots))


def _unique(hosts: list[Host], source: str) -> list[Host]:
    seen = set()
    for h in hosts:
        if h.name in seen:
            raise InputError(f"host '{h.name}' appears twice in {source}. List each host once with its total slots.")
        seen.add(h.name)
    return hosts


def place_ranks(hosts: list[Host], np: int) -> list[int]:
    """Ranks per host when slots are filled in order (Open MPI's and horovodrun's default mapping)."""
    total = sum(h.slots for h in hosts)
    if np > total:
        listing = ",".join(f"{h.name}:{h.slots}" for h in hosts)
        raise InputError(
            f"{np} ranks do not fit the {total} slot(s) of {listing}. Lower --np to {total} or less, or give more "
            "hosts or slots (--hosts host:slots,... or --hostfile)."
        )
    placed, left = [], np
    for h in hosts:
        placed.append(min(h.slots, left))
        left -= placed[-1]
    return placed
