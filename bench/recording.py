"""Recording a benchmark's results, always with the command, the date and the machine:

- the section with its tables, appended to the dated log, bench/log/RESULTS.md;
- its headline figures, one JSON object a line, appended to bench/results.jsonl: what, figure, target, machine
  (cores and CPU), date, command, and the software versions. The documentation's Benchmarks page shows the newest
  line of each `what` (docs/hooks.py), so a figure keeps the same `what` from one run to the next.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "log" / "RESULTS.md"
FIGURES = BENCH / "results.jsonl"


@dataclass(frozen=True)
class Figure:
    """One headline figure: `what` was measured (the same words every time), the `figure` with its unit, and the
    `target` it is held to ("" where there is none)."""

    what: str
    figure: str
    target: str = ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cores() -> str:
    """This machine's cores and CPU, e.g. "2 cores (AMD EPYC 7B13)"."""
    return f"{os.cpu_count()} cores ({cpu_model()})"


def machine(software: str = "") -> str:
    """This machine in one line: cores, CPU, OS, Python and any `software` versions the figures depend on."""
    line = f"{cores()}, {platform.system()} {platform.machine()}; Python {platform.python_version()}"
    return f"{line}, {software}" if software else line


def command_line() -> str:
    """The command as it was typed (this script and its arguments)."""
    return "python bench/" + Path(sys.argv[0]).name + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")


def record(
    title: str,
    lines: list[str],
    software: str = "",
    figures: list[Figure] | tuple[Figure, ...] = (),
    log: Path = RESULTS,
    results: Path = FIGURES,
) -> None:
    """Append a section to the log (the title and today's date, the command, the machine, then `lines`), and each
    of `figures` to the results file."""
    today, command = date.today().isoformat(), command_line()
    block = [f"\n## {title}, {today}", f"- command: `{command}`", f"- machine: {machine(software)}", *lines]
    with open(log, "a") as f:
        f.write("\n".join(block) + "\n")
    versions = f"{platform.system()} {platform.machine()}; Python {platform.python_version()}"
    with open(results, "a") as f:
        for figure in figures:
            row = {"what": figure.what, "figure": figure.figure, "target": figure.target, "machine": cores()}
            row |= {"date": today, "command": command, "software": f"{versions}, {software}" if software else versions}
            f.write(json.dumps(row) + "\n")
