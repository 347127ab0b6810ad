"""Hosts with slot counts, from a `--hosts` string or a hostfile, and the placement of ranks on them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hvdlm.errors import InputError, not_a_file
from hvdlm.launch.shell import HOSTNAME

LOCALHOST = "localhost"
# No node has a million slots; a bound also keeps int() away from pasted runs of thousands of digits.
MAX_SLOTS = 999_999


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
        hosts.append(make_host(name, slots or "1", f"--hosts entry '{item}'"))
    return refuse_duplicates(hosts, "--hosts")


def read_hostfile(path: str | Path) -> list[Host]:
    """Open MPI ('host slots=N'), MPICH ('host:N') or bare 'host' lines; blank lines and # comments allowed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"hostfile '{path}' {not_a_file(path)}. Pass an existing file, or use --hosts host:slots,...")
    hosts, lines = [], []
    for number, line in enumerate(read_text_lines(path, "hostfile"), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{number}"
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\S+)(?:\s+max[-_]slots\s*=\s*\S+)?", line)
        if m:
            hosts.append(make_host(m.group(1), m.group(2), where))
        elif re.fullmatch(r"\S+", line):
            name, _, slots = line.partition(":")
            hosts.append(make_host(name, slots or "1", where))
        else:
            raise InputError(f"{where}: cannot read '{line}'. Write 'host slots=N', 'host:N' or 'host'.")
        lines.append(number)
    if not hosts:
        raise InputError(f"hostfile '{path}' names no hosts. Add lines such as 'node1 slots=4'.")
    return refuse_duplicates(hosts, str(path), [f"{path}:{n}" for n in lines])


def read_text_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{what} '{path}' is not UTF-8 text.") from None
    except OSError as e:
        raise InputError(f"{what} '{path}' cannot be read: {e.strerror}.") from None


def make_host(name: str, slots: str, where: str) -> Host:
    if not HOSTNAME.fullmatch(name):
        raise InputError(
            f"{where}: '{name}' is not a valid host name (letters, digits, '.', '-' and '_'; shell metacharacters "
            "are refused)."
        )
    # ASCII digits only (str.isdigit also takes other scripts' digits), bounded length before int().
    if not re.fullmatch(r"[0-9]+", slots) or len(slots) > len(str(MAX_SLOTS)) or int(slots) <= 0:
        shown = slots if len(slots) <= 40 else f"{slots[:20]}...({len(slots)} characters)"
        raise InputError(f"{where}: slots must be a positive whole number, got '{shown}' (at most {MAX_SLOTS}).")
    return Host(name, int(slots))


def refuse_duplicates(hosts: list[Host], source: str, places: list[str] | None = None) -> list[Host]:
    """places: where each host was read (file:line), so that both copies can be named."""
    seen: dict[str, int] = {}
    for i, h in enumerate(hosts):
        if h.name in seen:
            where = f" ({places[seen[h.name]]} and {places[i]})" if places else ""
            raise InputError(
                f"host '{h.name}' appears twice in {source}{where}. List each host once with its total slots."
            )
        seen[h.name] = i
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
