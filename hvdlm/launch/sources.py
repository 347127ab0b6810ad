"""Hosts and slots from where an allocation is described: Slurm, PBS/Torque, LSF, a --hosts string, a hostfile.

Each reader takes its text explicitly or falls back to the scheduler's environment variable, and returns hosts in
the scheduler's order with one slot per task it granted (unless `slots` overrides the count per host).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from hvdlm.errors import InputError, not_a_file
from hvdlm.launch.hostlist import expand_nodelist, expand_tasks_per_node, shown
from hvdlm.launch.hosts import (
    MAX_SLOTS,
    Host,
    make_host,
    parse_hosts,
    read_hostfile,
    read_text_lines,
    refuse_duplicates,
)

SOURCES = ("slurm", "pbs", "lsf", "hosts", "file")


def hosts_from(
    source: str,
    spec: str | None,
    slots: int | None = None,
    env: Mapping[str, str] | None = None,
    tasks_per_node: str | None = None,
) -> list[Host]:
    """Hosts from `source` (one of SOURCES); `spec` is its text (a node list, a file, ...) or None for the env."""
    env = os.environ if env is None else env
    if slots is not None and slots <= 0:
        raise InputError(f"--slots must be positive, got {slots}.")
    if slots is not None and slots > MAX_SLOTS:  # the cap of a hostfile's slots and of Slurm's task counts
        raise InputError(f"--slots {slots} is more than the {MAX_SLOTS} slots a host may have.")
    if source == "slurm":
        hosts = from_slurm(spec, tasks_per_node, env)
    elif source == "pbs":
        hosts = from_pbs(spec, env)
    elif source == "lsf":
        hosts = from_lsf(spec, env)
    elif source in ("hosts", "file"):
        if not spec:
            example = "node1:4,node2:4" if source == "hosts" else "FILE"
            raise InputError(f"--from {source} needs its text: hvdlm hostfile --from {source} {example}.")
        hosts = parse_hosts(spec) if source == "hosts" else read_hostfile(spec)
    else:
        raise InputError(f"unknown host source '{source}'. Use one of {', '.join(SOURCES)}.")
    return [Host(h.name, slots) for h in hosts] if slots else hosts


def from_slurm(nodelist: str | None, tasks_per_node: str | None, env: Mapping[str, str]) -> list[Host]:
    """SLURM_JOB_NODELIST + SLURM_TASKS_PER_NODE (inside a job), or an explicit node list (one slot per node
    unless tasks per node are given)."""
    if nodelist is None:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if nodelist is None:
            raise InputError(
                "SLURM_JOB_NODELIST is not set: this is not a Slurm job. Run inside one (sbatch, salloc), or pass "
                "the node list: hvdlm hostfile --from slurm 'node[01-04]' --slots 4."
            )
        tasks_per_node = tasks_per_node or env.get("SLURM_TASKS_PER_NODE")
    names = expand_nodelist(nodelist)
    counts = expand_tasks_per_node(tasks_per_node) if tasks_per_node else [1] * len(names)
    if len(counts) != len(names):
        raise InputError(
            f"tasks per node '{tasks_per_node}' gives {len(counts)} count(s) for the {len(names)} node(s) of "
            f"'{nodelist}'. Give one count per node (2(x3) is 2,2,2)."
        )
    return refuse_duplicates([Host(n, c) for n, c in zip(names, counts)], f"node list '{nodelist}'")


def from_pbs(nodefile: str | None, env: Mapping[str, str]) -> list[Host]:
    """PBS_NODEFILE: one line per granted slot, hosts repeated; counted in order of first appearance."""
    path = nodefile or env.get("PBS_NODEFILE")
    if not path:
        raise InputError("PBS_NODEFILE is not set: this is not a PBS job. Run inside one, or pass the node file.")
    if not Path(path).is_file():
        raise InputError(f"PBS node file '{path}' {not_a_file(path)}. Pass the node file of a PBS job.")
    counts: Counter[str] = Counter()
    for number, line in enumerate(read_text_lines(Path(path), "PBS node file"), start=1):
        name = line.split("#", 1)[0].strip()
        if name:
            counts[make_host(name, "1", f"{path}:{number}").name] += 1
    if not counts:
        raise InputError(f"PBS node file '{path}' names no hosts.")
    return [Host(name, n) for name, n in counts.items()]


def from_lsf(spec: str | None, env: Mapping[str, str]) -> list[Host]:
    """LSB_MCPU_HOSTS ('host1 4 host2 4') or LSB_HOSTS ('host1 host1 host2', one word per slot)."""
    if spec is None:
        if env.get("LSB_MCPU_HOSTS"):
            return _lsf_pairs(env["LSB_MCPU_HOSTS"], "LSB_MCPU_HOSTS")
        if env.get("LSB_HOSTS"):
            return _lsf_repeated(env["LSB_HOSTS"], "LSB_HOSTS")
        raise InputError(
            "neither LSB_MCPU_HOSTS nor LSB_HOSTS is set: this is not an LSF job. Run inside one, or pass the hosts: "
            "hvdlm hostfile --from lsf 'host1 4 host2 4'."
        )
    words = spec.split()
    # 'h1 4 h2 4' has a count after every host; 'h1 h1 h2' has none.
    # ASCII digits: str.isdigit also takes other scripts' digits (make_host refuses those with a clear message).
    if len(words) % 2 == 0 and words and all(re.fullmatch("[0-9]+", w) for w in words[1::2]):
        return _lsf_pairs(spec, "LSF hosts")
    counts = [w for w in words if re.fullmatch("[0-9]+", w)]
    if counts:  # a bare number among host names is a count whose pair is broken
        raise InputError(
            f"LSF hosts '{spec}': '{counts[0]}' looks like a slot count, but not every host has one. Write "
            "'host1 4 host2 4' (LSB_MCPU_HOSTS) or 'host1 host1 host2' (LSB_HOSTS)."
        )
    return _lsf_repeated(spec, "LSF hosts")


def _lsf_pairs(text: str, what: str) -> list[Host]:
    words = text.split()
    if not words or len(words) % 2:
        raise InputError(f"{what} '{text}' must be pairs of host and slot count, e.g. 'host1 4 host2 4'.")
    hosts = [
        make_host(name, count, f"{what} entry '{shown(name, 40)} {shown(count, 40)}'")
        for name, count in zip(words[::2], words[1::2])
    ]
    return refuse_duplicates(hosts, what)


def _lsf_repeated(text: str, what: str) -> list[Host]:
    counts: Counter[str] = Counter()
    for name in text.split():
        counts[make_host(name, "1", f"{what} entry '{name}'").name] += 1
    if not counts:
        raise InputError(f"{what} '{text}' names no hosts.")
    return [Host(name, n) for name, n in counts.items()]
