"""Slurm's compressed host lists (`node[001-003,007],gpu-[1-2]`) and task counts (`2(x3),1`), expanded.

`scontrol show hostnames` is the reference: we ask it when it is on the PATH and configured, and otherwise expand
each bracket group with python-hostlist and put the groups together in Slurm's order (tests/test_hostlist.py
compares the two, ordered, on many expressions). Before either runs, the expression is checked here against
Slurm's grammar, so that both answer the same inputs the same way:

- Slurm refuses text after a host's last bracket group (`n[1-2]x`), which python-hostlist accepts.
- A name starting with `-` would reach scontrol as an option (`--version` printed Slurm's version as hosts).
- Numbers in brackets have at most 18 digits (they fit Slurm's 64-bit ranges; Python's int() refuses more than
  4300 digits with a ValueError), and a list names at most MAX_HOSTS hosts, counted before anything is expanded.
- With three or more bracket groups in one name, Slurm does not nest the groups left to right: its parser takes
  the last group as the innermost loop and walks the other groups from right to left, outermost first
  (`x[1-2]y[3-4]z[5-6]` gives x1y3z5, x1y3z6, x2y3z5, x2y3z6, x1y4z5, ...). python-hostlist nests them left to
  right, so the groups are combined here instead. Order matters: tasks per node apply in list order.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess

import hostlist

from hvdlm.errors import InputError
from hvdlm.launch.hosts import MAX_SLOTS
from hvdlm.launch.shell import HOSTNAME

# Far more than any allocation; bounds the memory that a typo such as node[1-99999999] could take. It is also
# Slurm's own limit for one range (MAX_RANGE in hostlist.c), so scontrol and the library refuse the same lists.
MAX_HOSTS = 65536
# 18 digits fit in Slurm's unsigned 64-bit range bounds. [0-9], not \d: \d also matches other scripts' digits.
MAX_DIGITS = 18
_EXPRESSION = re.compile(r"[A-Za-z0-9_.\-\[\],]+")
_PART = re.compile(r"\[([^\[\]]*)\]|([^\[\]]+)")  # a bracket group, or the literal text between groups
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_DEFAULT_CONFS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf", "/usr/local/etc/slurm.conf")
_TASKS_ITEM = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


def shown(text: str, limit: int = 80) -> str:
    """Text for an error message: a 5000-digit typo should not fill the terminal."""
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


def expand_nodelist(expression: str, use_scontrol: bool | None = None) -> list[str]:
    """`a,b[001,003],c` -> ['a', 'b001', 'b003', 'c'], in Slurm's order, duplicates kept (callers refuse them).

    use_scontrol: None asks scontrol when it is on the PATH; True / False force one implementation (tests).
    """
    expression = expression.strip()
    what = f"node list '{shown(expression)}'"
    if not expression:
        raise InputError("the node list is empty. Pass a Slurm node list such as node[01-04], or run inside a job.")
    if not _EXPRESSION.fullmatch(expression):
        raise InputError(
            f"{what} has characters a Slurm node list cannot have. Write names, ranges in brackets and commas, "
            "e.g. node[01-04,07],gpu-[1-2]."
        )
    items = _check_grammar(expression, what)
    if use_scontrol is True or (use_scontrol is None and _scontrol_usable()):
        names = _scontrol_hostnames(expression, what, required=use_scontrol is True)
    else:
        names = None
    if names is None:
        names = [name for item in items for name in _library_item(item, what)]
    if not names:
        raise InputError(f"{what} names no hosts.")
    for name in names:
        if not HOSTNAME.fullmatch(name):
            raise InputError(f"{what} expands to '{shown(name)}', which is not a valid host name. Check the brackets.")
    return names


def _check_grammar(expression: str, what: str) -> list[list[tuple[str, str]]]:
    """Each comma-separated item as its parts: ("lit", text) or ("group", bracket contents). Refuses, with the
    reason, whatever Slurm would refuse, and lists of more than MAX_HOSTS hosts (counted, not expanded)."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(expression + ","):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if depth not in (0, 1):
            raise InputError(f"{what} is malformed: brackets do not nest. Write e.g. node[01-04,07].")
        if c == "," and depth == 0:
            items.append(expression[start:i])
            start = i + 1
    if depth:
        raise InputError(f"{what} is malformed: a '[' is never closed. Write e.g. node[01-04,07].")
    parsed, total = [], 0
    for item in filter(None, items):  # Slurm skips empty items (`a,` is `a`)
        if item.startswith("-"):
            raise InputError(
                f"{what}: '{shown(item)}' starts with '-', which scontrol would read as an option; host names "
                "start with a letter, a digit or '_'."
            )
        parts = [("group", m.group(1)) if m.group(2) is None else ("lit", m.group(2)) for m in _PART.finditer(item)]
        if "[" in item and parts[-1][0] == "lit":
            raise InputError(
                f"{what} has text after a closing bracket, which Slurm refuses (write n[1-2] or x[1-2]y[3])."
            )
        count = 1
        for kind, text in parts:
            if kind == "group":
                count *= _group_size(text, what)
        total += count
        if total > MAX_HOSTS:
            raise _too_many(what)
        parsed.append(parts)
    return parsed


def _too_many(what: str) -> InputError:
    return InputError(f"{what} names more than {MAX_HOSTS} hosts, far more than any allocation. Check the ranges.")


def _group_size(text: str, what: str) -> int:
    """Hosts in one bracket group such as `01-04,07`."""
    size = 0
    for piece in text.split(","):
        m = _RANGE.fullmatch(piece)
        if not m:
            raise InputError(
                f"{what} is malformed at '[{shown(text)}]': brackets hold numbers and ranges separated by commas, "
                "e.g. node[01-04,07]."
            )
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if max(len(lo), len(hi)) > MAX_DIGITS:
            raise InputError(f"{what}: the numbers in brackets may have at most {MAX_DIGITS} digits.")
        if int(lo) > int(hi):
            raise InputError(f"{what} is malformed: range '{piece}' runs backwards. Write the lower number first.")
        size += int(hi) - int(lo) + 1
        if size > MAX_HOSTS:
            raise _too_many(what)
    return size


def _library_item(parts: list[tuple[str, str]], what: str) -> list[str]:
    """One item's hosts: each group expanded by python-hostlist (padding, lists), combined in Slurm's order."""
    values = []
    for kind, text in parts:
        if kind == "lit":
            values.append([text])
            continue
        try:
            # python-hostlist drops repeated hosts unless told otherwise; Slurm keeps them (callers refuse them).
            values.append(hostlist.expand_hostlist(f"[{text}]", allow_duplicates=True))
        except (hostlist.BadHostlist, ValueError) as e:
            raise InputError(f"{what} is malformed ({e}). Write e.g. node[01-04,07].") from None
    groups = [i for i, (kind, _) in enumerate(parts) if kind == "group"]
    # Slurm's loop order, outermost first: the groups before the last one from right to left, then the last.
    order = groups[-2::-1] + groups[-1:]
    names = []
    for combination in itertools.product(*(values[i] for i in order)):
        chosen = dict(zip(order, combination))
        names.append("".join(chosen.get(i, v[0]) for i, v in enumerate(values)))
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


def _scontrol_hostnames(expression: str, what: str, required: bool) -> list[str] | None:
    """scontrol's expansion; None when scontrol cannot run here (no slurm.conf), unless `required`."""
    try:
        # `--` ends scontrol's options; the grammar check has refused a leading '-' already, this is the second lock.
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", "--", expression], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        if required:
            raise InputError(f"scontrol could not expand {what}: {e}. Check that Slurm's tools work here.") from None
        return None
    if "Invalid hostlist" in proc.stderr or "Invalid range" in proc.stderr or "Too many hosts" in proc.stderr:
        raise InputError(f"{what} is malformed (scontrol: {shown(proc.stderr.strip().splitlines()[-1], 200)}).")
    if proc.returncode != 0:
        # scontrol without a slurm.conf (a login node of another cluster, a laptop) cannot even start.
        if required:
            raise InputError(
                f"scontrol could not expand {what}: {shown(proc.stderr.strip(), 300) or f'exit {proc.returncode}'}. "
                "Check SLURM_CONF, or run where Slurm is configured."
            )
        return None
    return proc.stdout.split()


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE: `2(x3),1` -> [2, 2, 2, 1] (counts in node-list order)."""
    counts: list[int] = []
    what = f"tasks per node '{shown(spec)}'"
    for item in spec.strip().split(","):
        m = _TASKS_ITEM.fullmatch(item.strip())
        if not m:
            raise InputError(
                f"{what} is malformed at '{shown(item)}'. Slurm writes counts like 2(x3),1: 2 tasks on each of 3 "
                "nodes, then 1."
            )
        count, repeat = m.group(1), m.group(2) or "1"
        # Counts are slots (capped like a hostfile's), repeats are nodes (capped like a node list); lengths are
        # checked before int() so that a pasted run of digits is an error, not a ValueError.
        if len(count) > len(str(MAX_SLOTS)) or int(count) > MAX_SLOTS:
            raise InputError(f"{what}: '{shown(count)}' tasks on a node is more than the {MAX_SLOTS} allowed.")
        if len(repeat) > len(str(MAX_HOSTS)) or len(counts) + int(repeat) > MAX_HOSTS:
            raise InputError(f"{what} covers more than {MAX_HOSTS} nodes.")
        if int(count) <= 0 or int(repeat) <= 0:
            raise InputError(f"{what}: counts and repeats must be positive, got '{item}'.")
        counts += [int(count)] * int(repeat)
    return counts
