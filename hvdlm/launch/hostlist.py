"""Slurm's compressed host lists (`node[001-003,007],gpu-[1-2]`) and task counts (`2(x3),1`), expanded.

`scontrol show hostnames` is the reference: we ask it when it is on the PATH and configured, and otherwise use
python-hostlist, which agrees with it on every form Slurm documents (tests/test_hostlist.py compares the two).
Two differences remain and are closed here: Slurm refuses text after a host's last bracket group (`n[1-2]x`),
which python-hostlist accepts, so we refuse it first; and for three or more bracket groups in one name Slurm
orders the product its own way (the same hosts, in another order).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import hostlist

from hvdlm.errors import InputError
from hvdlm.launch.shell import HOSTNAME

# Far more than any allocation; bounds the memory that a typo such as node[1-99999999] could take.
MAX_HOSTS = 65536
_EXPRESSION = re.compile(r"[A-Za-z0-9_.\-\[\],]+")
# Text after the closing bracket of a host's last group: `n[1-2]x` or `n[1-2].cluster` (Slurm: invalid hostlist).
_TRAILING_TEXT = re.compile(r"\][^\[\],]+(?=,|$)")
_DEFAULT_CONFS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf", "/usr/local/etc/slurm.conf")
_TASKS_ITEM = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def expand_nodelist(expression: str, use_scontrol: bool | None = None) -> list[str]:
    """`a,b[001,003],c` -> ['a', 'b001', 'b003', 'c'], in Slurm's order, duplicates kept (callers refuse them).

    use_scontrol: None asks scontrol when it is on the PATH; True / False force one implementation (tests).
    """
    expression = expression.strip()
    what = f"node list '{expression}'"
    if not expression:
        raise InputError("the node list is empty. Pass a Slurm node list such as node[01-04], or run inside a job.")
    if not _EXPRESSION.fullmatch(expression):
        raise InputError(
            f"{what} has characters a Slurm node list cannot have. Write names, ranges in brackets and commas, "
            "e.g. node[01-04,07],gpu-[1-2]."
        )
    if _TRAILING_TEXT.search(expression):
        raise InputError(f"{what} has text after a closing bracket, which Slurm refuses (write n[1-2] or x[1-2]y[3]).")
    names = None
    if use_scontrol is True or (use_scontrol is None and _scontrol_usable()):
        names = _scontrol_hostnames(expression, required=use_scontrol is True)
    if names is None:
        names = _library_hostnames(expression)
    if not names:
        raise InputError(f"{what} names no hosts.")
    for name in names:
        if not HOSTNAME.fullmatch(name):
            raise InputError(f"{what} expands to '{name}', which is not a valid host name. Check the brackets.")
    return names


def _scontrol_usable() -> bool:
    """scontrol on the PATH with a configuration it can read at once. Without one it first searches DNS for a
    configless controller, which can take half a minute: the library answers instantly instead."""
    if not shutil.which("scontrol"):
        return False
    conf = os.environ.get("SLURM_CONF")
    if conf:
        return os.path.isfile(conf)
    # Inside a job the node's slurmd holds the configuration (also in configless mode).
    return "SLURM_JOB_ID" in os.environ or any(os.path.isfile(p) for p in _DEFAULT_CONFS)


def _scontrol_hostnames(expression: str, required: bool) -> list[str] | None:
    """scontrol's expansion; None when scontrol cannot run here (no slurm.conf), unless `required`."""
    try:
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", expression], capture_output=True, text=True, timeout=10
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        if required:
            raise
        return None
    if "Invalid hostlist" in proc.stderr or "Invalid range" in proc.stderr or "Too many hosts" in proc.stderr:
        raise InputError(f"node list '{expression}' is malformed (scontrol: {proc.stderr.strip().splitlines()[-1]}).")
    if proc.returncode != 0:
        # scontrol without a slurm.conf (a login node of another cluster, a laptop) cannot even start.
        if required:
            raise RuntimeError(f"scontrol failed: {proc.stderr.strip()}")
        return None
    return proc.stdout.split()


def _library_hostnames(expression: str) -> list[str]:
    try:
        # python-hostlist drops repeated hosts unless told otherwise; Slurm keeps them (and we refuse them later).
        names = hostlist.expand_hostlist(expression, allow_duplicates=True)
    except hostlist.BadHostlist as e:
        raise InputError(f"node list '{expression}' is malformed ({e}). Write e.g. node[01-04,07].") from None
    if len(names) > MAX_HOSTS:
        raise InputError(f"node list '{expression}' names {len(names)} hosts, more than the {MAX_HOSTS} allowed.")
    return names


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE: `2(x3),1` -> [2, 2, 2, 1] (counts in node-list order)."""
    counts: list[int] = []
    for item in spec.strip().split(","):
        m = _TASKS_ITEM.fullmatch(item.strip())
        if not m:
            raise InputError(
                f"tasks per node '{spec}' is malformed at '{item}'. Slurm writes counts like 2(x3),1: 2 tasks on "
                "each of 3 nodes, then 1."
            )
        count, repeat = int(m.group(1)), int(m.group(2) or 1)
        if count <= 0 or repeat <= 0:
            raise InputError(f"tasks per node '{spec}': counts and repeats must be positive, got '{item}'.")
        if len(counts) + repeat > MAX_HOSTS:
            raise InputError(f"tasks per node '{spec}' covers more than {MAX_HOSTS} nodes.")
        counts += [count] * repeat
    return counts
